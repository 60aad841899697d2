"""Does a caption name what the image shows? Attribute accuracy on `capfast synth` scenes.

`capfast synth` records every image's shapes (colour, kind, size, position) beside its captions, and
`capfast convert` copies them into the data directory as attributes_SPLIT.json. A generated caption is parsed
into shape mentions ("a small red circle on the left" -> red, circle, left): a colour word directly before a
shape word is a mention (colours in "a red and blue gradient background" are not), and the first position word
after it, before the next mention, is its position. Per image and attribute, the caption is right when it
mentions as many shapes as the image has and, pairing each mention with the image's shape it agrees with most,
every pair has the same colour (resp. kind, position). A model that ignores the image says the same caption for
every image and scores near chance: `capfast eval` reports that "blind" control beside the real score.
"""

import itertools
from pathlib import Path

from capfast.store.ptb_tokenizer import tokenize
from capfast.store.schema import COLORS, POSITIONS, SHAPES

ATTRIBUTES = ("color", "shape", "position")
POSITION_WORDS = {**{position: position for position in POSITIONS}, "middle": "center"}


def load_attributes(path: Path) -> dict[int, list[dict]]:
    """{image id: [{"color", "shape", "position"}, ...]} from an attributes JSON of `capfast synth`."""
    from capfast.common.io import read_json

    raw = read_json(Path(path), "image attributes (written by `capfast synth`)")
    return {int(image_id): [{"color": s["color"], "shape": s["kind"], "position": s["position"]}
                            for s in scene["shapes"]] for image_id, scene in raw.items()}


def mentions(caption: str) -> list[dict]:
    """The shapes a caption names, in order: [{"color", "shape", "position" (None when not said)}]."""
    words = tokenize(caption)
    found = []
    for i, word in enumerate(words):
        if word in POSITION_WORDS and found and found[-1]["position"] is None:
            found[-1]["position"] = POSITION_WORDS[word]
        elif word in COLORS and i + 1 < len(words) and words[i + 1] in SHAPES:
            found.append({"color": word, "shape": words[i + 1], "position": None})
    return found


def image_correct(named: list[dict], truth: list[dict]) -> dict[str, bool]:
    """Per attribute: does the caption's list of mentions name the image's shapes right?"""
    if len(named) != len(truth):
        return {a: False for a in ATTRIBUTES}

    def agreement(pairs):
        return sum(m[a] == t[a] for m, t in pairs for a in ATTRIBUTES)

    best = max((list(zip(order, truth)) for order in itertools.permutations(named)), key=agreement)
    return {a: all(m[a] == t[a] for m, t in best) for a in ATTRIBUTES}


def attribute_accuracy(results: dict[int, str], attributes: dict[int, list[dict]]) -> dict[str, float]:
    """{"accuracy/color": ..., "accuracy/shape": ..., "accuracy/position": ...} over the captioned images
    that have attributes; {} when none has."""
    scored = [image_correct(mentions(caption), attributes[i]) for i, caption in results.items() if i in attributes]
    if not scored:
        return {}
    return {f"accuracy/{a}": sum(s[a] for s in scored) / len(scored) for a in ATTRIBUTES}

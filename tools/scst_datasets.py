"""Small captioned sets unlike the demo's, for checking that an SCST recipe is not tuned to one dataset.

Photo-like (textured, any aspect) images of `capfast synth`'s scenes, with captions in another style and another
number of references per image than the demo's five paraphrases:

  templates  five fixed templates per image naming colour and kind ("a photo of a red circle."), as a user's
             set of photos with template captions (issue #22)
  narrative  two long, spoken-style captions per image (14-26 words: the longer ones run past convert's 16
             kept tokens and the recipe's scst.max_len)

Writes OUT/images/{train,val}/*.jpg and OUT/annotations/{captions,attributes}_{train,val}.json, as `capfast
synth` does, so that the demo's `capfast convert` commands apply:

  python tools/scst_datasets.py templates /tmp/templates/coco --train 240 --val 48 --seed 1
"""

import json
import random
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capfast.pack.synth import (  # noqa: E402
    TEXTURED_SIDE_RANGE,
    WHERE,
    article,
    jpeg_bytes,
    random_scene,
    render,
    scene_attributes,
)

SIDES = {"left": "left side", "right": "right side", "top": "upper part", "bottom": "lower part",
         "center": "middle"}


def template_captions(scene) -> list[str]:
    things = [f"{s.color} {s.kind}" for s in scene.shapes]
    listed = " and ".join(f"{article(t)} {t}" for t in things)
    where = " and ".join(f"{article(t)} {t} {WHERE[s.position]}" for t, s in zip(things, scene.shapes))
    return [f"a photo of {listed}.", f"a picture of {where}.", f"an image showing {listed}.",
            f"a close-up photo of {listed}.", f"this is {where}."]


def narrative_captions(scene) -> list[str]:
    shapes = " and ".join(f"{article(s.size)} {s.size} {s.color} {s.kind} on the {SIDES[s.position]}"
                          for s in scene.shapes)
    return [f"in this picture we can see {shapes}, in front of a {scene.background} background.",
            f"here we can see {shapes} of the image."]


STYLES = {"templates": template_captions, "narrative": narrative_captions}


def write_split(out: Path, split: str, image_ids: list[int], style, rng: random.Random) -> None:
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, attributes = [], [], {}
    for image_id in image_ids:
        scene = random_scene(rng, TEXTURED_SIDE_RANGE)
        file_name = f"{split}_{image_id:06d}.jpg"
        (image_dir / file_name).write_bytes(jpeg_bytes(render(scene, texture_seed=rng.getrandbits(64))))
        images.append({"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height})
        annotations += [{"id": image_id * 10 + k, "image_id": image_id, "caption": text}
                        for k, text in enumerate(style(scene))]
        attributes[str(image_id)] = scene_attributes(scene)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    coco = {"images": images, "annotations": annotations}
    (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco, indent=1))
    (out / "annotations" / f"attributes_{split}.json").write_text(json.dumps(attributes, indent=1))


@click.command()
@click.argument("style", type=click.Choice(sorted(STYLES)))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(min=1), default=240, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(style, out, n_train, n_val, seed):
    """Write a STYLE captioned set of photo-like shapes to OUT (same seed, same bytes)."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10 * (n_train + n_val)), n_train + n_val)
    write_split(out, "train", ids[:n_train], STYLES[style], rng)
    write_split(out, "val", ids[n_train:], STYLES[style], rng)
    click.echo(f"wrote {n_train} train + {n_val} val {style} images to {out}", err=True)


if __name__ == "__main__":
    main()

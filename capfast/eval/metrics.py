"""Caption metrics exactly as the COCO caption evaluation computes them (pycocoevalcap's scorers).

score() tokenizes like pycocoevalcap's PTBTokenizer -- with capfast.store.ptb_tokenizer by default, or with the
Java tokenizer itself (ptb_java=True) -- and then runs pycocoevalcap's Bleu(4), Meteor(), Rouge() and Cider() on
the same inputs COCOEvalCap would give them. "CIDEr" is pycocoevalcap's CIDEr-D, with document frequencies taken
from the references being scored. METEOR is a Java program (meteor-1.5.jar, 2 GB heap, about 10 s to start), so it
is computed only when Java is available; SPICE is not computed.

The writers produce COCO-format files, so results can also be scored with the official
COCO(reference_file).loadRes(results_file) + COCOEvalCap pipeline.
"""

import contextlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

from capfast.common.io import atomic_write_text
from capfast.errors import CapfastError

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METEOR_MODES = ("auto", True, False)

log = logging.getLogger(__name__)
_warned_meteor_skipped = False


def score(results: dict[int, str], references: dict[int, list[str]], *, ptb_java: bool = False,
          meteor="auto") -> dict[str, float]:
    """{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} for one caption per image against its references.

    Only images in `results` are scored; each needs references. meteor: "auto" (when Java is on PATH; otherwise,
    or if the jar fails, warn and leave the key out), True (require it), False (skip).
    """
    if meteor not in METEOR_MODES:
        raise ValueError(f"meteor must be one of {METEOR_MODES}, not {meteor!r}")
    _check_inputs(results, references)
    gts, res = _tokenized(results, references, ptb_java)
    metrics = _bleu(gts, res)
    if _meteor_wanted(meteor):
        try:
            metrics["METEOR"] = _meteor(gts, res)
        except CapfastError as e:
            if meteor is True:
                raise
            log.warning("%s; METEOR left out", e)
    metrics["ROUGE-L"] = _rouge(gts, res)
    metrics["CIDEr"] = _cider(gts, res)
    return metrics


def write_results(results: dict[int, str], path: Path) -> None:
    """COCO results format, [{"image_id": int, "caption": str}], written atomically."""
    entries = [{"image_id": int(image_id), "caption": caption} for image_id, caption in results.items()]
    atomic_write_text(Path(path), json.dumps(entries))


def write_reference_annotations(references: dict[int, list[str]], path: Path) -> None:
    """A COCO captions annotation file holding `references`, loadable by pycocotools.coco.COCO."""
    images = [{"id": int(image_id)} for image_id in references]
    pairs = [(int(image_id), caption) for image_id, captions in references.items() for caption in captions]
    annotations = [{"id": n, "image_id": image_id, "caption": caption}
                   for n, (image_id, caption) in enumerate(pairs, start=1)]
    dataset = {"info": {"description": "capfast references"}, "licenses": [], "type": "captions",
               "images": images, "annotations": annotations}
    atomic_write_text(Path(path), json.dumps(dataset))


def java_available() -> bool:
    return shutil.which("java") is not None


def _check_inputs(results, references) -> None:
    if not results:
        raise CapfastError("no captions to score: the results are empty")
    missing = [image_id for image_id in results if not references.get(image_id)]
    if missing:
        raise CapfastError(f"{len(missing)} of {len(results)} result image ids have no reference captions "
                           f"(first: {missing[0]}); results and references must come from the same split")


def _tokenized(results, references, ptb_java):
    """gts and res as COCOEvalCap hands them to the scorers: {image_id: [tokenized caption, ...]}, in the order
    of `results` (the tokenizer's lookahead crosses from one caption into the next, so order matters)."""
    if ptb_java:
        return _java_tokenized(results, references)
    from capfast.store.ptb_tokenizer import tokenize_batch, tokenize_references

    image_ids = list(results)
    reference_tokens = tokenize_references({i: references[i] for i in image_ids})
    result_tokens = tokenize_batch([results[i] for i in image_ids])
    gts = {i: [" ".join(tokens) for tokens in captions] for i, captions in reference_tokens.items()}
    res = {i: [" ".join(tokens)] for i, tokens in zip(image_ids, result_tokens)}
    return gts, res


def _java_tokenized(results, references):
    if not java_available():
        raise CapfastError("ptb_java needs `java` on PATH (pycocoevalcap runs Stanford's PTBTokenizer jar); "
                           "leave it off to use capfast's identical Python tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in results})
    res = tokenizer.tokenize({i: [{"caption": results[i]}] for i in results})
    return gts, res


def _meteor_wanted(meteor) -> bool:
    global _warned_meteor_skipped
    if meteor is False:
        return False
    if java_available():
        return True
    if meteor is True:
        raise CapfastError("METEOR needs `java` on PATH (pycocoevalcap runs meteor-1.5.jar)")
    if not _warned_meteor_skipped:
        log.warning("METEOR skipped: `java` is not on PATH (pycocoevalcap's METEOR is a Java program)")
        _warned_meteor_skipped = True
    return False


def _bleu(gts, res) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {key: float(value) for key, value in zip(BLEU_KEYS, bleu)}


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as e:  # the jar died: its stdout ran dry or its stdin closed
        raise CapfastError(f"METEOR failed: java -jar meteor-1.5.jar stopped ({_first_stderr_line(meteor, e)})") \
            from None
    finally:
        _stop_meteor(meteor)


def _stop_meteor(meteor) -> None:
    """Ends the Java process now rather than at garbage collection. A failed compute_score leaves the wrapper's
    lock held, and its __del__ would then wait on that lock forever."""
    process = meteor.meteor_p
    with contextlib.suppress(OSError):  # a dead jar's stdin may fail to flush
        process.stdin.close()
    process.kill()
    process.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def _first_stderr_line(meteor, error) -> str:
    process = meteor.meteor_p
    try:
        process.wait(timeout=5)  # its stdout closes a moment before it exits
    except subprocess.TimeoutExpired:
        return error.__class__.__name__
    lines = process.stderr.read().decode(errors="replace").strip().splitlines()
    return lines[0] if lines else f"exit status {process.returncode}"


def _rouge(gts, res) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    return float(Rouge().compute_score(gts, res)[0])


def _cider(gts, res) -> float:
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(gts, res)[0])

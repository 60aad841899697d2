"""`capfast synth`: a small, learnable COCO-format captions dataset of colored shapes.

Each image shows one or two shapes (circle/square/triangle; a few colors; small or large) at a position
(left/right/top/bottom/center) on a plain or gradient background, with five paraphrased captions naming
them. Output is deterministic for a given seed (byte-identical JPEGs and JSON).

Flat shapes compress to ~5 KB per 256² JPEG, which flatters a JPEG decoder; `texture=True` (`--textured`)
overlays photo-like multi-scale noise on larger images so that, converted at 256² q90, they average ~19 KB,
close to COCO photos (~20 KB): the data for loader benchmarks.
"""

import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw

from capfast.common.progress import track
from capfast.errors import CapfastError
from capfast.store import schema
from capfast.store.ptb_tokenizer import tokenize
from capfast.store.schema import POSITIONS, SHAPES

COLORS = dict(zip(schema.COLORS, ((220, 30, 30), (30, 170, 50), (30, 60, 220), (240, 220, 30), (140, 40, 170),
                                   (250, 140, 20)), strict=True))  # the RGB of each colour word
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
PAIRED_POSITIONS = (("left", "right"), ("top", "bottom"))
SIZES = {"small": 0.2, "large": 0.38}  # shape extent as a fraction of the shorter image side
MAX_SHAPE_SIZE = 0.5  # two shapes side by side sit half the image apart: any larger and they may overlap
SIDE_RANGE, TEXTURED_SIDE_RANGE = (64, 160), (256, 480)
# Photo-like texture: luminance noise at these cell sizes (px) and weights, a coarse colour noise, all scaled to
# +-TEXTURE_LEVELS levels. Tuned for ~19 KB (16-21 KB) per image converted at 256² q90.
TEXTURE_OCTAVES = ((48, 0.8), (12, 0.6), (3, 0.45), (1, 0.3))
TEXTURE_COLOR_CELL, TEXTURE_COLOR_WEIGHT, TEXTURE_LEVELS = 32, 0.4, 45

# Where on the canvas each position puts a shape's center, as (x, y) fractions.
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "center": (0.5, 0.5)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
TOWARD = {"left": "to the left", "right": "to the right", "top": "near the top", "bottom": "near the bottom",
          "center": "in the middle"}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str  # a BACKGROUNDS or COLORS name
    gradient_to: str | None  # second background color for a gradient, else None
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random, side_range: tuple[int, int], square: bool = False) -> Scene:
    long_side = rng.randint(*side_range)
    short_side = rng.randint(side_range[0], long_side)
    width, height = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    if square:
        width = height = long_side
    background = rng.choice(sorted(BACKGROUNDS))
    gradient_to = rng.choice(sorted(set(COLORS) - {background})) if rng.random() < 0.3 else None
    n_shapes = 1 if rng.random() < 0.6 else 2
    positions = (rng.choice(POSITIONS),) if n_shapes == 1 else rng.choice(PAIRED_POSITIONS)
    colors = rng.sample(sorted(set(COLORS) - {gradient_to}), n_shapes)
    shapes = tuple(Shape(rng.choice(SHAPES), color, rng.choice(sorted(SIZES)), position)
                   for color, position in zip(colors, positions))
    return Scene(width, height, background, gradient_to, shapes)


def render(scene: Scene, texture_seed: int | None = None, sizes: dict | None = None) -> Image.Image:
    img = Image.fromarray(background_pixels(scene))
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        draw_shape(draw, shape, scene.width, scene.height, sizes or SIZES)
    if texture_seed is not None:
        img = Image.fromarray(textured(np.asarray(img), np.random.default_rng(texture_seed)))
    return img


def textured(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3] pixels with photo-like texture added: smooth blotches down to per-pixel grain in
    brightness, plus coarse colour variation. Vectorized (a few ms per image) and deterministic per rng."""
    height, width = pixels.shape[:2]
    luma = sum(weight * noise(rng, height, width, cell) for cell, weight in TEXTURE_OCTAVES)
    color = TEXTURE_COLOR_WEIGHT * noise(rng, height, width, TEXTURE_COLOR_CELL, channels=3)
    texture = TEXTURE_LEVELS * (luma[..., None] + color)
    return np.clip(pixels + texture, 0, 255).astype(np.uint8)


def noise(rng: np.random.Generator, height: int, width: int, cell: int, channels: int = 1) -> np.ndarray:
    """float32 [h, w] (or [h, w, channels]) value noise in [-1, 1]: uniform values on a grid of `cell` px,
    bilinearly interpolated; cell 1 is per-pixel grain. numpy only: OpenCV's thread pool, once started in this
    process, deadlocks the forked workers of `capfast convert` when they resize."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    if cell == 1:
        return rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32) * (2 / 255) - 1
    grid = rng.random((height // cell + 2, width // cell + 2) + shape[2:], dtype=np.float32) * 2 - 1
    x0, fx = _cells(width, cell)
    y0, fy = _cells(height, cell)
    if channels > 1:
        fx, fy = fx[:, None], fy[:, None]
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # [grid rows, width]
    return rows[y0] * (1 - fy)[:, None] + rows[y0 + 1] * fy[:, None]


def _cells(size: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel: the grid point before it and its fractional distance from it."""
    position = np.arange(size, dtype=np.float32) / cell
    first = position.astype(np.int64)
    return first, position - first


def background_pixels(scene: Scene) -> np.ndarray:
    start = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.gradient_to is None:
        return np.broadcast_to(start.astype(np.uint8), (scene.height, scene.width, 3)).copy()
    end = np.array(COLORS[scene.gradient_to], dtype=np.float32)
    t = np.linspace(0.0, 1.0, scene.width, dtype=np.float32)[None, :, None]
    row = start + (end - start) * t
    return np.broadcast_to(row, (scene.height, scene.width, 3)).round().astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, width: int, height: int, sizes: dict) -> None:
    half = max(2, sizes[shape.size] * min(width, height) / 2)
    cx, cy = ANCHORS[shape.position][0] * width, ANCHORS[shape.position][1] * height
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(scene: Scene) -> str:
    if scene.gradient_to is None:
        return f"{article(scene.background)} {scene.background} background"
    return f"a {scene.background} and {scene.gradient_to} gradient background"


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five paraphrases naming every shape's color, kind and position (and size or background in some)."""
    nouns = [f"{s.color} {s.kind}" for s in scene.shapes]
    sized = [f"{s.size} {s.color} {s.kind}" for s in scene.shapes]
    where = [WHERE[s.position] for s in scene.shapes]
    toward = [TOWARD[s.position] for s in scene.shapes]
    background = background_phrase(scene)
    if len(scene.shapes) == 1:
        texts = [
            f"{article(nouns[0]).capitalize()} {nouns[0]} {where[0]} of {background}.",
            f"{article(sized[0])} {sized[0]} {toward[0]}",
            f"There is {article(nouns[0])} {nouns[0]} {where[0]} of the picture.",
            f"{article(sized[0]).capitalize()} {sized[0]} sits {where[0]}, over {background}.",
            f"{background.capitalize()} with {article(nouns[0])} {nouns[0]} {toward[0]}.",
        ]
    else:
        texts = [
            f"{article(nouns[0]).capitalize()} {nouns[0]} {where[0]} and {article(nouns[1])} {nouns[1]} "
            f"{where[1]} of {background}.",
            f"{article(sized[0])} {sized[0]} {toward[0]} and {article(sized[1])} {sized[1]} {toward[1]}",
            f"Two shapes: {article(nouns[0])} {nouns[0]} {where[0]}, {article(nouns[1])} {nouns[1]} {where[1]}.",
            f"{article(nouns[1]).capitalize()} {nouns[1]} {where[1]} with {article(nouns[0])} {nouns[0]} "
            f"{where[0]}.",
            f"{background.capitalize()} showing {article(sized[0])} {sized[0]} and {article(sized[1])} "
            f"{sized[1]}.",
        ]
    rng.shuffle(texts)
    return texts


def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def scene_attributes(scene: Scene) -> dict:
    """What an image shows, for scoring captions (capfast/eval/attributes.py)."""
    return {"background": scene.background, "gradient_to": scene.gradient_to,
            "shapes": [asdict(shape) for shape in scene.shapes]}


def make_split(out: Path, split: str, image_ids: list[int], rng: random.Random, side_range: tuple[int, int],
               texture: bool = False, square: bool = False, sizes: dict | None = None) -> tuple[dict, list[dict], dict]:
    """Writes the split's images; returns its COCO captions JSON, the per-image records for Karpathy and
    {image id: scene attributes}."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, records, attributes = [], [], [], {}
    for image_id in track(image_ids, len(image_ids), f"synth {split}", "img"):
        scene = random_scene(rng, side_range, square)
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        texture_seed = rng.getrandbits(64) if texture else None
        (image_dir / file_name).write_bytes(jpeg_bytes(render(scene, texture_seed, sizes)))
        texts = captions(scene, rng)
        images.append({"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height,
                       "license": 1, "date_captured": "2024-01-01 00:00:00"})
        for text in texts:
            annotations.append({"id": 0, "image_id": image_id, "caption": text})
        records.append({"image_id": image_id, "file_name": file_name, "captions": texts, "split": split})
        attributes[str(image_id)] = scene_attributes(scene)
    coco = {
        "info": {"description": f"capfast synthetic shapes ({split})", "version": "1.0", "year": 2024,
                 "contributor": "capfast synth", "date_created": "2024-01-01"},
        "licenses": [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
    }
    return coco, records, attributes


def karpathy_split(record: dict, index_in_split: int) -> str:
    """Karpathy's split puts all COCO train images in "train" and spreads COCO val over val/test/restval."""
    if record["split"] == "train":
        return "train"
    return ("val", "test", "restval")[index_in_split % 3]


def karpathy_json(records: list[dict]) -> dict:
    images, sentence_id = [], 0
    val_index = 0
    for imgid, record in enumerate(records):
        split = karpathy_split(record, val_index)
        val_index += record["split"] != "train"
        sentences = []
        for raw in record["captions"]:
            sentences.append({"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": sentence_id})
            sentence_id += 1
        images.append({"filepath": record["split"], "filename": record["file_name"], "imgid": imgid,
                       "cocoid": record["image_id"], "split": split,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return {"images": images, "dataset": "coco"}


def make_synthetic_coco(out, n_train: int, n_val: int, seed: int = 0, karpathy: bool = False,
                        side_range: tuple[int, int] | None = None, texture: bool = False, square: bool = False,
                        shape_sizes: tuple[float, float] | None = None) -> Path:
    """Writes OUT/images/{train,val}/*.jpg, OUT/annotations/captions_{train,val}.json (COCO captions format) and
    OUT/annotations/attributes_{train,val}.json ({image id: {background, gradient_to, shapes: [{kind, color,
    size, position}]}}); with karpathy=True also OUT/dataset_coco.json. Image ids are unique across splits, not
    sorted. texture=True: photo-like texture on 256-480 px images (default side range), for loader benchmarks.
    square=True: every image square, so that resizing to a square keeps the shapes' proportions. shape_sizes:
    (small, large) shape extents as fractions of the shorter side (default SIZES)."""
    side_range = side_range or (TEXTURED_SIDE_RANGE if texture else SIDE_RANGE)
    if n_train < 0 or n_val < 0:
        raise CapfastError("--train and --val must be >= 0")
    sizes = dict(zip(("small", "large"), shape_sizes)) if shape_sizes else SIZES
    if not 0 < sizes["small"] <= sizes["large"] <= MAX_SHAPE_SIZE:
        raise CapfastError(f"shape sizes must be 0 < small <= large <= {MAX_SHAPE_SIZE} (larger shapes overlap), "
                           f"got {sizes['small']:g}, {sizes['large']:g}")
    if not 8 <= side_range[0] <= side_range[1]:
        raise CapfastError(f"invalid image side range {side_range}")
    out = Path(out)
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10 * (n_train + n_val) + 10), n_train + n_val)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    records = []
    annotation_id = 1
    for split, split_ids in (("train", ids[:n_train]), ("val", ids[n_train:])):
        coco, split_records, attributes = make_split(out, split, split_ids, rng, side_range, texture, square, sizes)
        for annotation in coco["annotations"]:
            annotation["id"] = annotation_id
            annotation_id += 1
        (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco, indent=1))
        (out / "annotations" / f"attributes_{split}.json").write_text(json.dumps(attributes, indent=1))
        records += split_records
    if karpathy:
        (out / "dataset_coco.json").write_text(json.dumps(karpathy_json(records)))
    return out


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(min=0), default=400, show_default=True,
              help="Number of training images.")
@click.option("--val", "n_val", type=click.IntRange(min=0), default=100, show_default=True,
              help="Number of validation images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--karpathy", is_flag=True, help="Also write OUT/dataset_coco.json (Karpathy split format).")
@click.option("--textured", is_flag=True,
              help="Photo-like texture on 256-480 px images: ~19 KB per JPEG once converted at 256² q90, like COCO "
                   "photos (flat shapes: ~5 KB). For loader benchmarks.")
@click.option("--square", is_flag=True,
              help="Square images only: converted to squares, shapes keep their proportions (circles stay round).")
@click.option("--shape-sizes", type=(float, float), default=None, metavar="SMALL LARGE",
              help=f"Extent of small and large shapes as fractions of the shorter side [default: "
                   f"{SIZES['small']} {SIZES['large']}; at most {MAX_SHAPE_SIZE}].")
def command(out, n_train, n_val, seed, karpathy, textured, square, shape_sizes):
    """Write a synthetic COCO captions dataset of colored shapes to OUT."""
    try:
        make_synthetic_coco(out, n_train, n_val, seed, karpathy, texture=textured, square=square,
                            shape_sizes=shape_sizes)
    except OSError as e:
        raise CapfastError(f"cannot write synthetic dataset to {out}: {e.strerror or e}") from None
    click.echo(f"wrote {n_train} train + {n_val} val images to {out}", err=True)

"""A built-in semantic segmentation set (``dinokit synth segment``), in the PASCAL VOC 2012 layout or
dinokit's folder layout, so that ``dinokit segment`` runs end to end without a download.

Each scene is a textured background (a crop of a photograph or procedural clutter) with two to four
textured shapes of several classes, partly overlapping; the class is the shape (colours and
textures are drawn independently of it). The label map is exact, with a two-pixel void (255) band on
every boundary between regions, as VOC's annotators draw them::

    voc2012: DIR/JPEGImages/STEM.jpg, DIR/SegmentationClass/STEM.png (palette, 255 void),
             DIR/ImageSets/Segmentation/{train,val}.txt
    folder:  DIR/{train,val}/images/STEM.jpg, DIR/{train,val}/masks/STEM.png, DIR/classes.txt

Label 0 is the background, k the k-th shape of :data:`SHAPES`.
"""

from __future__ import annotations

import colorsys
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DinokitError
from ..io import atomic_write_text, write_json
from ..progress import NULL_PROGRESS, Progress
from .palette import DAVIS_PALETTE, VOID_LABEL
from .synth import (
    SHAPE_NAMES,
    class_hue,
    class_pattern,
    item_rng,
    jitter_photo,
    pattern_map,
    photo_crop,
    place_parts,
    procedural_scene,
    random_colour,
    random_texture,
    rasterize,
    shape_parts,
    smooth_noise,
    write_file,
)
from .synth_output import prepare_synth_output

LAYOUTS = ("voc2012", "folder")
STYLES = ("cluttered", "simple")
#: the simple style's class cues follow ``synth classify --style simple --classes 10`` (the demo's set):
#: the same hue per shape (for 70% of the objects) and the same surface pattern
SIMPLE_HUE_CLASSES = 10
SIMPLE_CLASS_COLOUR = 0.7
#: the shapes of the classes 1..K, chosen to differ in outline at a few patches across
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")


def void_borders(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every pixel that touches (4-neighbourhood) a pixel of another label set to void:
    a band two pixels wide on each boundary."""
    out = labels.copy()
    edge = np.zeros(labels.shape, bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    out[edge] = VOID_LABEL
    return out


def draw_scene(
    rng: np.random.Generator, height: int, width: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 (H, W, 3), labels uint8 (H, W) with void borders)."""
    if rng.random() < 0.6:
        canvas = jitter_photo(rng, photo_crop(rng, height, width)[1])
    else:
        canvas = procedural_scene(rng, height, width).astype(np.float32)
    labels = np.zeros((height, width), np.uint8)
    size = min(height, width)
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(1, classes + 1))
        radius = size * rng.uniform(0.14, 0.3)
        cx, cy = (
            rng.uniform(radius * 0.6, width - radius * 0.6),
            rng.uniform(radius * 0.6, height - radius * 0.6),
        )
        parts = place_parts(shape_parts(SHAPES[k - 1]), cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = rasterize(parts, height, width)
        canvas[mask] = random_texture(rng, height, width)[mask]
        labels[mask] = k
    return np.clip(canvas, 0, 255).astype(np.uint8), void_borders(labels)


def draw_simple_scene(
    rng: np.random.Generator, height: int, width: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene in the simple style: a smooth grey background (a gentle gradient and soft noise) and
    flat shapes carrying their class's hue (70% of them) and surface pattern, as ``synth classify
    --style simple`` draws single objects; (RGB uint8, labels uint8 with void borders)."""
    size = max(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / size
    a = rng.uniform(0, 2 * np.pi)
    grad = (xx * np.cos(a) + yy * np.sin(a) - 0.5) * rng.uniform(0, 40)
    noise = (smooth_noise(rng, height, width, cells=int(rng.integers(2, 5))) - 0.5) * rng.uniform(0, 30)
    canvas = 118.0 + (grad + noise)[..., None] * np.ones(3, np.float32)
    labels = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(1, classes + 1))
        ci = SHAPE_NAMES.index(SHAPES[k - 1])
        radius = min(height, width) * rng.uniform(0.16, 0.3)
        cx, cy = (
            rng.uniform(radius * 0.6, width - radius * 0.6),
            rng.uniform(radius * 0.6, height - radius * 0.6),
        )
        mask = rasterize(
            place_parts(shape_parts(SHAPES[k - 1]), cx, cy, radius, rng.uniform(0, 2 * np.pi)), height, width
        )
        if rng.random() < SIMPLE_CLASS_COLOUR:
            hue = (class_hue(ci, SIMPLE_HUE_CLASSES) + rng.normal(0, 0.03)) % 1.0
            colour = (
                np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0))) * 255.0
            )
        else:
            colour = random_colour(rng)
        kind, period = class_pattern(ci)
        t = pattern_map(rng, kind, max(2.0, period * size), size)[:height, :width, None]
        other = colour * 0.45 if colour.mean() > 110 else colour * 0.45 + 140
        texture = colour * (1 - t) + other * t + rng.normal(0, 2, size=(height, width, 1))
        canvas[mask] = texture[mask]
        labels[mask] = k
    return np.clip(canvas, 0, 255).astype(np.uint8), void_borders(labels)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _label_png(labels: np.ndarray) -> bytes:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(DAVIS_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SegmentSummary:
    """What :func:`make_segment_dataset` wrote."""

    root: Path
    layout: str
    classes: list[str]
    n_train: int
    n_val: int
    seed: int
    seconds: float


def make_segment_dataset(
    out: str | Path,
    layout: str = "folder",
    classes: int = 3,
    train: int = 48,
    val: int = 16,
    size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress = NULL_PROGRESS,
    style: str = "cluttered",
) -> SegmentSummary:
    """Write the synthetic segmentation set (see the module's text). Scenes are ``size`` pixels on
    their longer side with a random aspect (3:4 to 4:3). ``style``: ``cluttered`` (textured shapes over
    photographs or clutter) or ``simple`` (:func:`draw_simple_scene`, the domain of the demo's model)."""
    if style not in STYLES:
        raise DinokitError(f"--style must be one of {', '.join(STYLES)}, not {style!r}.")
    if layout not in LAYOUTS:
        raise DinokitError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}.")
    if not 1 <= classes <= len(SHAPES):
        raise DinokitError(f"--classes must lie in 1..{len(SHAPES)}, not {classes}.")
    if train < 1 or val < 1:
        raise DinokitError("--train and --val must each be at least 1.")
    if size < 32:
        raise DinokitError(f"--image-size must be at least 32, not {size}.")
    names = ["background", *SHAPES[:classes]]
    root = prepare_synth_output(out, "segment", overwrite)
    start = time.perf_counter()
    task = progress.task("Drawing scenes", total=train + val)
    stems: dict[str, list[str]] = {"train": [], "val": []}
    for split, count, code in (("train", train, 0), ("val", val, 1)):
        for i in range(count):
            rng = item_rng(seed, "segment", code, i)
            long, short = size, int(round(size * rng.uniform(0.75, 1.0)))
            h, w = (short, long) if rng.random() < 0.6 else (long, short)
            draw = draw_simple_scene if style == "simple" else draw_scene
            image, labels = draw(rng, h, w, classes)
            stem = f"synth_{split}_{i:05d}"
            stems[split].append(stem)
            if layout == "voc2012":
                write_file(root / "JPEGImages" / f"{stem}.jpg", _jpeg(image))
                write_file(root / "SegmentationClass" / f"{stem}.png", _label_png(labels))
            else:
                write_file(root / split / "images" / f"{stem}.jpg", _jpeg(image))
                write_file(root / split / "masks" / f"{stem}.png", _label_png(labels))
            task.advance(1)
    task.close()
    if layout == "voc2012":
        for split, listed in stems.items():
            atomic_write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(listed) + "\n")
    else:
        atomic_write_text(root / "classes.txt", "\n".join(names) + "\n")
    write_json(root / "synth.json", {
        "kind": "segment", "layout": layout, "classes": names, "train": train, "val": val, "size": size,
        "seed": seed, "style": style, "void": VOID_LABEL, "complete": True,
    })  # fmt: skip
    return SegmentSummary(root, layout, names, train, val, seed, time.perf_counter() - start)


__all__ = [
    "LAYOUTS",
    "SHAPES",
    "STYLES",
    "SegmentSummary",
    "draw_scene",
    "draw_simple_scene",
    "make_segment_dataset",
    "void_borders",
]

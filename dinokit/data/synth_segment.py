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
    item_rng,
    jitter_photo,
    photo_crop,
    place_parts,
    procedural_scene,
    random_texture,
    rasterize,
    shape_parts,
    write_file,
)
from .synth_output import prepare_synth_output

LAYOUTS = ("voc2012", "folder")
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


def draw_scene(rng: np.random.Generator, height: int, width: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
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
        cx, cy = rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6)
        parts = place_parts(shape_parts(SHAPES[k - 1]), cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = rasterize(parts, height, width)
        canvas[mask] = random_texture(rng, height, width)[mask]
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


def make_segment_dataset(out: str | Path, layout: str = "folder", classes: int = 3, train: int = 48, val: int = 16,
                         size: int = 160, seed: int = 0, overwrite: bool = False,
                         progress: Progress = NULL_PROGRESS) -> SegmentSummary:
    """Write the synthetic segmentation set (see the module's text). Scenes are ``size`` pixels on
    their longer side with a random aspect (3:4 to 4:3)."""
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
            image, labels = draw_scene(rng, h, w, classes)
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
        "seed": seed, "void": VOID_LABEL, "complete": True,
    })  # fmt: skip
    return SegmentSummary(root, layout, names, train, val, seed, time.perf_counter() - start)


__all__ = ["LAYOUTS", "SHAPES", "SegmentSummary", "draw_scene", "make_segment_dataset", "void_borders"]

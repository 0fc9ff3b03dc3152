"""What a segmentation run leaves for people: label PNGs (the VOC palette), per_class.csv, and the
pictures image | ground truth | prediction with a colour key of the class names."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.palette import DAVIS_PALETTE, VOID_LABEL, voc_colormap
from ..io import atomic_open, atomic_write_text, inert_cell
from ..viz import legend, load_font, save_png, stack_vertical

COLOURS = voc_colormap(256)  # class k in VOC's colour k; void (255) in VOC's cream


def save_label_png(labels: np.ndarray, path: str | os.PathLike) -> None:
    """(H, W) class ids (0..254, 255 void) as a palette PNG whose indices are the classes."""
    img = Image.fromarray(np.asarray(labels).astype(np.uint8), mode="P")
    img.putpalette(DAVIS_PALETTE)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")


def write_per_class(
    path: str | os.PathLike,
    classes: Sequence[str],
    iou: Sequence[float],
    acc: Sequence[float],
    pixels: Sequence[int],
) -> None:
    """per_class.csv: class, IoU and accuracy in percent (empty where undefined), labelled pixels."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "class", "iou_percent", "accuracy_percent", "pixels"])
    for k, name in enumerate(classes):
        w.writerow([k, inert_cell(name), _cell(iou[k]), _cell(acc[k]), int(pixels[k])])
    atomic_write_text(path, buf.getvalue())


def _cell(v: float) -> str:
    return "" if v != v else f"{v:.4f}"


def colourise(labels: np.ndarray) -> np.ndarray:
    return COLOURS[np.asarray(labels).astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The prediction's colours over the photo (the background class 0 left clear)."""
    out = image.astype(np.float32)
    fg = (labels != 0) & (labels != VOID_LABEL)
    out[fg] = out[fg] * (1 - alpha) + colourise(labels)[fg] * alpha
    return out.clip(0, 255).astype(np.uint8)


def _captioned(tile: np.ndarray, text: str) -> np.ndarray:
    font = load_font(13)
    bar = Image.new("RGB", (tile.shape[1], 18), (255, 255, 255))
    ImageDraw.Draw(bar).text((3, 2), text, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(bar), tile], axis=0)


def comparison_picture(
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    tile_width: int = 320,
) -> Path:
    """image | ground truth | prediction side by side (each ``tile_width`` wide at most, aspect kept),
    with the colour key of the classes that appear (void in VOC's cream)."""
    h, w = pred.shape
    scale = min(1.0, tile_width / w) if w > tile_width else max(1.0, min(3.0, 160 / w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    photo = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))

    def lab(x):
        return np.asarray(Image.fromarray(colourise(x)).resize(size, Image.Resampling.NEAREST))

    tiles = [_captioned(photo, "image")]
    if truth is not None:
        tiles.append(_captioned(lab(truth), "ground truth"))
    tiles.append(_captioned(lab(pred), "prediction"))
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([t if i == 0 else np.concatenate([gap, t], 1) for i, t in enumerate(tiles)], 1)
    present = sorted(
        set(np.unique(pred).tolist()) | (set(np.unique(truth).tolist()) if truth is not None else set())
    )
    keys = [k for k in present if k < len(classes)]
    names = [f"{k} {classes[k]}" for k in keys]
    colours = [COLOURS[k] for k in keys]
    if VOID_LABEL in present:
        names.append("void (not scored)")
        colours.append(COLOURS[VOID_LABEL])
    key = legend(np.array(colours), names, row.shape[1]) if names else None
    return save_png(path, stack_vertical([row, key]) if key is not None else row)


__all__ = ["COLOURS", "colourise", "comparison_picture", "overlay", "save_label_png", "write_per_class"]

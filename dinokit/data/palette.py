"""Indexed (palette) PNG label maps: the DAVIS / PASCAL VOC colour map (shipped rather than
downloaded), the void label, and the one reader and writer of such masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..io import atomic_open

#: "don't care" pixels of DAVIS and VOC masks (and COCO crowd regions): neither object nor background
VOID_LABEL = 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (DAVIS uses the same): (n, 3) uint8, label 0 black, 1 dark red, ..."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


DAVIS_PALETTE: list[int] = voc_colormap().reshape(-1).tolist()


def save_indexed_png(labels: np.ndarray, path, palette: list[int] | None = None) -> None:
    """Write an (H, W) integer label array as an indexed PNG with the DAVIS palette, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 for an indexed PNG")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette or DAVIS_PALETTE)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")


def read_label_png(path: str | os.PathLike, what: str = "mask") -> np.ndarray:
    """An indexed (palette) or greyscale PNG as an (H, W) integer label map.

    RGB masks are refused with one sentence: their colours would have to be guessed back to labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {what} {path} does not exist.")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("P", "L", "1", "I", "I;16"):
                return np.array(img).astype(np.int64)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"The {what} {path} cannot be read as an image ({e}).") from e
    raise DataError(
        f"The {what} {path} is an {mode} image, not an indexed (palette) PNG of object labels; "
        "save the labels (0 = background, k = object k) with a palette as DAVIS masks are, with PIL "
        "for instance: img = Image.fromarray(labels.astype('uint8'), mode='P'); img.putpalette(palette); "
        "img.save(path)."
    )

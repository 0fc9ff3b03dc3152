"""The DAVIS / PASCAL VOC colour map for indexed (palette) PNG masks, shipped rather than downloaded."""

from __future__ import annotations

import numpy as np
from PIL import Image


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
    from ..io import atomic_open

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in 0..255 for an indexed PNG")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette or DAVIS_PALETTE)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")

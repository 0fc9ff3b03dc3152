"""Phone-size and small JPEGs made from scikit-image's bundled photographs, for benchmarks/photos.py.

Each picture is a bundled photograph (cropped, flipped and tinted differently for each file) resized
up with Lanczos to the phone size, with Gaussian sensor noise added (sigma 3 grey levels per channel),
and saved as a baseline JPEG at quality 90 with 4:2:0 chroma, as phone cameras write them. Every
``exif_every``-th phone picture is stored the way a phone stores a portrait: the pixels landscape,
EXIF orientation 6 (turn 90 degrees clockwise to view).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

#: colour photographs bundled with scikit-image (no download); the grey ones are turned into RGB
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
           "immunohistochemistry", "camera", "coins", "clock", "moon")
PHONE = (4032, 3024)
SMALL = (500, 375)


def source_photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SOURCES:
            a = getattr(skimage.data, name)()
            a = a[0] if isinstance(a, tuple) else a
            if a.ndim == 2:
                a = np.stack([a] * 3, axis=-1)
            out.append(np.ascontiguousarray(a[..., :3]))
    return out


def make_photos(folder: str | Path, n: int, size: tuple[int, int], exif_every: int = 0, seed: int = 0,
                quality: int = 90) -> list[Path]:
    """``n`` JPEGs of ``size`` (width, height, as viewed landscape) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = source_photos()
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        # a different crop, flip and tint for each file, so no two files are the same picture
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        a = src[y : y + ch, x : x + cw].astype(np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = np.clip(a * rng.uniform(0.85, 1.15, size=3), 0, 255).astype(np.uint8)
        img = Image.fromarray(a).resize(size, Image.LANCZOS)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 3.0, (size[1], size[0], 3)).astype(np.float32)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = folder / f"photo{i:04d}.jpg"
        exif = Image.Exif()
        if exif_every and i % exif_every == exif_every - 1:
            # a portrait as a phone stores it: landscape pixels that EXIF orientation 6 turns upright
            img = img.resize((size[1], size[0]), Image.BILINEAR).transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
        img.save(path, quality=quality, subsampling="4:2:0", exif=exif.tobytes())
        paths.append(path)
    return paths

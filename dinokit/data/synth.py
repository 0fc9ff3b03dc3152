"""Built-in synthetic data sets: nothing to download, deterministic per seed.

This module holds the drawing pieces every generator shares (shape outlines, textures, photographic
backgrounds from scikit-image's bundled pictures) and the classification set written by
``dinokit synth classify``: one textured shape per image over a cluttered or photographic
background, the class being the *shape* (colours, textures, backgrounds, scales, positions and
rotations are drawn independently of the class), with each image's exact foreground mask.

The video (DAVIS layout) and copy-detection (Copydays layout) sets live in
:mod:`dinokit.data.synth_video` and :mod:`dinokit.data.synth_copydays`.

Every image gets its own random generator seeded from ``(seed, kind, split, class, index)``, so an
image does not depend on how many others are drawn, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DinokitError
from ..io import atomic_write_bytes, write_json
from ..progress import NULL_PROGRESS, Progress
from .synth_output import prepare_synth_output

log = logging.getLogger("dinokit")

# --------------------------------------------------------------------------------------------------
# Random generators
# --------------------------------------------------------------------------------------------------

_KIND_CODES = {"classify": 1, "video": 2, "copydays": 3, "segment": 4}


def item_rng(seed: int, kind: str, *keys: int) -> np.random.Generator:
    """A generator for one item, independent of every other item and of the order they are drawn in."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _KIND_CODES[kind], *keys]))


# --------------------------------------------------------------------------------------------------
# Shapes: a shape is a list of (polygon, fill) parts in unit coordinates (inside the unit disc),
# drawn in order; fill 1 adds area, fill 0 cuts a hole.
# --------------------------------------------------------------------------------------------------

Part = tuple[np.ndarray, int]


def _regular(n: int, r: float = 1.0, phase: float = 0.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max() * 0.98


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def _base_shapes() -> dict[str, list[Part]]:
    circle = _regular(48)
    w = 0.3  # arm half-width of the cross, L and T
    return {
        "circle": [(circle, 1)],
        "square": [(_regular(4, phase=np.pi / 4), 1)],
        "triangle": [(_regular(3, phase=-np.pi / 2, cy=0.2), 1)],
        "star": [(_star(5, 0.42), 1)],
        "cross": [
            (_poly(-w, -1, w, -1, w, -w, 1, -w, 1, w, w, w, w, 1, -w, 1, -w, w, -1, w, -1, -w, -w, -w), 1)
        ],
        "ring": [(circle, 1), (_regular(48, 0.58), 0)],
        "hexagon": [(_regular(6), 1)],
        "crescent": [(circle, 1), (_regular(48, 0.85, cx=0.45), 0)],
        "heart": [(_heart(), 1)],
        "arrow": [(_poly(-1, -0.22, 0.15, -0.22, 0.15, -0.62, 1, 0, 0.15, 0.62, 0.15, 0.22, -1, 0.22), 1)],
        "semicircle": [(np.concatenate([_regular(48)[:25], [[-1.0, 0.0]]]) - [0, 0.4], 1)],
        "lshape": [
            (_poly(-0.7, -1, -0.7 + 2 * w * 1.1, -1, -0.7 + 2 * w * 1.1, 0.34, 0.7, 0.34, 0.7, 1, -0.7, 1), 1)
        ],
        "tshape": [(_poly(-1, -0.9, 1, -0.9, 1, -0.3, w, -0.3, w, 0.95, -w, 0.95, -w, -0.3, -1, -0.3), 1)],
        "frame": [(_regular(4, phase=np.pi / 4), 1), (_regular(4, 0.62, phase=np.pi / 4), 0)],
        "bowtie": [(_poly(-0.95, -0.8, 0, -0.08, 0.95, -0.8, 0.95, 0.8, 0, 0.08, -0.95, 0.8), 1)],
        "star6": [(_star(6, 0.6), 1)],
        "trapezoid": [(_poly(-1, 0.5, 1, 0.5, 0.45, -0.5, -0.45, -0.5), 1)],
        "pentagon": [(_regular(5, phase=-np.pi / 2), 1)],
    }


BASE_SHAPES: dict[str, list[Part]] = _base_shapes()
SHAPE_NAMES: tuple[str, ...] = tuple(BASE_SHAPES)
VARIANTS: tuple[str, ...] = ("", "_stretched", "_pair", "_pair_stretched")
MAX_CLASSES = len(SHAPE_NAMES) * len(VARIANTS)


def _variant_parts(base: list[Part], variant: str) -> list[Part]:
    parts = [(p.copy(), f) for p, f in base]
    if "pair" in variant:
        parts = [(p * 0.47 + [dx, 0.0], f) for dx in (-0.52, 0.52) for p, f in parts]
    if "stretched" in variant:
        parts = [(p * [1.0, 0.5], f) for p, f in parts]
    return parts


def class_names(n: int) -> list[str]:
    """The first ``n`` class names: the base shapes, then their stretched, paired and stretched-paired variants."""
    if not 1 <= n <= MAX_CLASSES:
        raise DinokitError(
            f"The synthetic classification set has between 1 and {MAX_CLASSES} classes, not {n}."
        )
    names = [s + v for v in VARIANTS for s in SHAPE_NAMES]
    return names[:n]


def shape_parts(name: str) -> list[Part]:
    """The outline of a class (``"star"``, ``"ring_pair"``, ...) as (polygon, fill) parts in unit coordinates."""
    for v in VARIANTS[1:][::-1]:
        if name.endswith(v):
            return _variant_parts(BASE_SHAPES[name[: -len(v)]], v)
    return _variant_parts(BASE_SHAPES[name], "")


def place_parts(parts: Sequence[Part], cx: float, cy: float, radius: float, angle: float) -> list[Part]:
    """Rotate by ``angle`` (radians), scale the unit disc to ``radius`` pixels and move it to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]]) * radius
    return [(p @ rot + [cx, cy], f) for p, f in parts]


def rasterize(
    parts: Sequence[Part], height: int, width: int, canvas: Image.Image | None = None
) -> np.ndarray:
    """The pixels a placed shape covers, as an (H, W) bool array (hard edges, so the mask is exact)."""
    img = canvas if canvas is not None else Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly, fill in parts:
        draw.polygon([tuple(p) for p in poly.tolist()], fill=int(fill))
    return np.asarray(img, dtype=np.uint8) > 0


# --------------------------------------------------------------------------------------------------
# Colours and textures
# --------------------------------------------------------------------------------------------------


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255] (float), drawn in HSV so that hues are spread evenly."""
    h = rng.random()
    s = rng.uniform(0.25, 1.0)
    v = rng.uniform(0.2, 1.0)
    return _hsv_colour(h, s, v)


def smooth_noise(
    rng: np.random.Generator, height: int, width: int, cells: int, channels: int = 1
) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid (about ``cells`` across) upsampled bicubically."""
    ch = max(2, round(cells * height / max(height, width)) + 1)
    cw = max(2, round(cells * width / max(height, width)) + 1)
    grid = (rng.random((ch, cw, channels)) * 255).astype(np.uint8)
    out = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        out[..., c] = np.asarray(
            Image.fromarray(grid[..., c]).resize((width, height), Image.Resampling.BICUBIC), np.float32
        )
    out /= 255.0
    return out if channels > 1 else out[..., 0]


TEXTURES = ("stripes", "checks", "dots", "noise", "plain")


def random_texture(
    rng: np.random.Generator, height: int, width: int, scale: float | None = None
) -> np.ndarray:
    """An (H, W, 3) float texture: stripes, checks, dots, noise or a shaded plain colour, two random colours.

    ``scale`` is the pattern period in pixels (random around a tenth of the size when not given).
    """
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    c1, c2 = random_colour(rng), random_colour(rng)
    period = scale if scale is not None else max(3.0, min(height, width) * rng.uniform(0.06, 0.2))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)
    v = -xx * np.sin(a) + yy * np.cos(a) + rng.uniform(0, period)
    if kind == "stripes":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif kind == "checks":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        t = (du * du + dv * dv < (period * rng.uniform(0.2, 0.4)) ** 2).astype(np.float32)
    elif kind == "noise":
        t = smooth_noise(rng, height, width, cells=max(2, int(min(height, width) / period)))
    else:
        t = np.clip(u / max(height, width, 1) * rng.uniform(0.0, 0.6), 0, 1).astype(np.float32)
    tex = c1 * (1 - t[..., None]) + c2 * t[..., None]
    # a little grain so that no region is perfectly flat
    tex += rng.normal(0, rng.uniform(1, 8), size=(height, width, 1)).astype(np.float32)
    return tex


# --------------------------------------------------------------------------------------------------
# Photographic backgrounds
# --------------------------------------------------------------------------------------------------

_PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
    "page",
    "text",
    "colorwheel",
    "motorcycle",
)


@functools.lru_cache(maxsize=1)
def photographs() -> tuple[tuple[str, np.ndarray], ...]:
    """scikit-image's bundled photographs as (name, (H, W, 3) uint8) pairs, largest side at most 640 px.

    These ship with scikit-image, so no download is needed; any that cannot be read are skipped.
    """
    try:
        import skimage.data as skd
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        return ()
    out = []
    for name in _PHOTO_NAMES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "motorcycle":  # the left view only: the right one is nearly the same picture
                    img = skd.stereo_motorcycle()[0]
                else:
                    img = getattr(skd, name)()
        except Exception:  # noqa: BLE001 - a picture missing from this installation is skipped
            continue
        img = np.asarray(img)
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        pil = Image.fromarray(np.ascontiguousarray(img))
        if max(pil.size) > 640:
            r = 640 / max(pil.size)
            pil = pil.resize((round(pil.width * r), round(pil.height * r)), Image.Resampling.BILINEAR)
        out.append((name, np.asarray(pil)))
    return tuple(out)


def photo_crop(
    rng: np.random.Generator, height: int, width: int, min_frac: float = 0.3, photo: int | None = None
) -> tuple[str, np.ndarray]:
    """A random crop of a random bundled photograph, resized to (height, width): (name, uint8 array).

    Falls back to a procedural scene when scikit-image's pictures are unavailable.
    """
    photos = photographs()
    if not photos:
        return "scene", procedural_scene(rng, height, width)
    name, img = photos[photo % len(photos) if photo is not None else rng.integers(len(photos))]
    ph, pw = img.shape[:2]
    aspect = width / height
    frac = rng.uniform(min_frac, 1.0)
    ch = min(ph, pw / aspect) * frac
    cw = ch * aspect
    y0 = rng.uniform(0, ph - ch)
    x0 = rng.uniform(0, pw - cw)
    pil = Image.fromarray(img).resize(
        (width, height), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)
    )
    arr = np.asarray(pil)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return name, np.ascontiguousarray(arr)


def random_blob(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[Part]:
    """An irregular polygon (not one of the classes' shapes) used as clutter."""
    n = int(rng.integers(5, 10))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.35, 1.0, n)
    return [(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1), 1)]


def paste(canvas: np.ndarray, mask: np.ndarray, texture: np.ndarray) -> None:
    """canvas[mask] = texture[mask] (float canvas, in place)."""
    canvas[mask] = texture[mask]


def procedural_scene(
    rng: np.random.Generator, height: int, width: int, n_blobs: int | None = None
) -> np.ndarray:
    """A cluttered synthetic scene: a textured ground covered with textured blobs and bars (uint8 RGB)."""
    canvas = random_texture(rng, height, width)
    n = int(rng.integers(6, 16)) if n_blobs is None else n_blobs
    size = min(height, width)
    for _ in range(n):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.75:
            parts = random_blob(rng, cx, cy, size * rng.uniform(0.08, 0.3))
        else:
            half_len, half_w = size * rng.uniform(0.15, 0.5), size * rng.uniform(0.01, 0.04)
            bar = _poly(-half_len, -half_w, half_len, -half_w, half_len, half_w, -half_len, half_w)
            parts = place_parts([(bar, 1)], cx, cy, 1.0, rng.uniform(0, np.pi))
        mask = rasterize(parts, height, width)
        paste(canvas, mask, random_texture(rng, height, width))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def jitter_photo(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random brightness/contrast/saturation change of a uint8 image (float result)."""
    x = img.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.4, 1.3)
    x = (x - 128) * rng.uniform(0.6, 1.2) + 128 + rng.uniform(-30, 30)
    return x


def write_file(path: Path, data: bytes) -> None:
    """Write through a temporary name and a rename, so a stopped run never leaves half a file.

    No fsync per file: a data set of thousands of small images would spend most of its time
    waiting on the disk; ``synth.json`` (rewritten last, atomically, with the set's description) marks a
    finished set.
    """
    atomic_write_bytes(path, data, fsync=False)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a PNG through :func:`write_file` (PIL's PNG output is deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    write_file(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# The classification set
# --------------------------------------------------------------------------------------------------


STYLES = ("cluttered", "simple")
#: backgrounds of the ``simple`` style. ``random``: a random colour per image, which is then the
#: cheapest thing that tells one image from another: DINO, asked to recognise an image across its
#: crops, learns the background colour and attends to the background. ``grey``: one shared colour, so
#: that the object is what sets an image apart (a few hundred steps then learn shape, colour and
#: texture and attend to the object; measured in docs/demo.md)
BACKGROUNDS = ("random", "grey")


def _hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.asarray([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]) * 255.0


def class_hue(class_index: int, n_classes: int) -> float:
    """The hue (in [0, 1)) of a class's palette: classes spread evenly round the colour wheel."""
    return (class_index + 0.5) / max(1, n_classes)


CLASS_PATTERNS = tuple(
    (kind, period) for period in (0.04, 0.07, 0.11, 0.16) for kind in ("stripes", "checks", "dots")
)


def class_pattern(class_index: int) -> tuple[str, float]:
    """A class's surface pattern: (kind, period as a fraction of the image side); 12 distinct ones, then reused."""
    return CLASS_PATTERNS[class_index % len(CLASS_PATTERNS)]


def pattern_map(rng: np.random.Generator, kind: str, period: float, size: int) -> np.ndarray:
    """A (size, size) 0/1 map of stripes, checks or dots with the given period (pixels), random angle and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)
    v = -xx * np.sin(a) + yy * np.cos(a) + rng.uniform(0, period)
    if kind == "stripes":
        return (np.floor(u / period) % 2).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    return (du * du + dv * dv < (period * 0.35) ** 2).astype(np.float32)


def _place_shape(
    rng: np.random.Generator, shape: str, size: int, min_scale: float
) -> tuple[np.ndarray, float]:
    """``shape`` at a random scale (radius min_scale..0.44 of the image), position and rotation, kept
    inside the image: (mask bool (size, size), radius)."""
    radius = size * rng.uniform(min_scale, 0.44)
    margin = radius * 0.75
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    parts = place_parts(shape_parts(shape), cx, cy, radius, rng.uniform(0, 2 * np.pi))
    return rasterize(parts, size, size), radius


def draw_simple_image(
    rng: np.random.Generator,
    shape: str,
    size: int,
    object_colour: Sequence[int] | None = None,
    hue: float | None = None,
    pattern: tuple[str, float] | None = None,
    background: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """One picture of ``shape`` in the ``simple`` style: (RGB uint8, foreground mask bool).

    A smooth, low-contrast background (one colour with a gentle gradient and soft value noise, no
    clutter) and the object in one flat colour with light shading, clearly apart from the
    background; random scale, position and rotation. ``hue`` (in [0, 1)) sets the object's hue
    (plus a little noise) instead of a random one, for class-correlated palettes. ``pattern``
    ((kind, period as a fraction of ``size``), see :func:`class_pattern`) paints the object with that
    two-tone pattern (its colour and a darker or lighter one) instead of flat, for class-correlated surfaces.
    ``background``: ``"random"`` (one random colour per image) or ``"grey"`` (the same mid grey for
    every image; the gradient and noise stay the image's own): see :data:`BACKGROUNDS`.
    """
    bg = random_colour(rng)  # drawn either way, so that both settings place the same objects
    if background == "grey":
        bg = np.full(3, 118.0, dtype=bg.dtype)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = rng.uniform(0, 2 * np.pi)
    grad = (xx * np.cos(a) + yy * np.sin(a) - 0.5) * rng.uniform(0, 40)
    noise = (smooth_noise(rng, size, size, cells=int(rng.integers(2, 5))) - 0.5) * rng.uniform(0, 30)
    canvas = bg[None, None, :] + (grad + noise)[..., None]

    mask, radius = _place_shape(rng, shape, size, min_scale=0.25)
    for _ in range(20):  # an object colour that stands out from the background
        if hue is not None:
            colour = _hsv_colour(
                (hue + rng.normal(0, 0.03)) % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)
            )
        else:
            colour = random_colour(rng)
        if np.abs(colour - bg).sum() > 150:
            break
    shade = (xx * np.cos(a + 1.0) + yy * np.sin(a + 1.0) - 0.5) * rng.uniform(0, 30)
    texture = colour[None, None, :] + shade[..., None]
    if pattern is not None:
        kind, period = pattern
        t = pattern_map(rng, kind, max(2.0, period * size), size)
        other = colour * 0.45 if colour.mean() > 110 else colour * 0.45 + 140
        texture = texture * (1 - t[..., None]) + (other[None, None, :] + shade[..., None]) * t[..., None]
    texture = texture + rng.normal(0, 2, size=(size, size, 1)).astype(np.float32)
    if object_colour is not None:
        texture[:] = np.asarray(object_colour, np.float32)
    canvas = canvas.astype(np.float32)
    paste(canvas, mask, texture.astype(np.float32))
    return np.clip(canvas, 0, 255).astype(np.uint8), mask


def draw_classify_image(
    rng: np.random.Generator, shape: str, size: int, object_colour: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One picture of ``shape``: (RGB uint8 (size, size, 3), foreground mask bool (size, size)).

    The background is a jittered crop of a photograph (70%) or a procedural clutter scene (30%),
    with a few clutter blobs on top; the object gets a random texture, colours, scale, position
    and rotation. The mask is the exact set of pixels painted with the object.
    ``object_colour`` paints the object in one flat colour instead (to check the masks).
    """
    if rng.random() < 0.7:
        _, bg = photo_crop(rng, size, size)
        canvas = jitter_photo(rng, bg)
        n_clutter = int(rng.integers(0, 4))
    else:
        canvas = procedural_scene(rng, size, size, n_blobs=int(rng.integers(3, 9))).astype(np.float32)
        n_clutter = 0
    for _ in range(n_clutter):
        parts = random_blob(rng, rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.06, 0.18))
        paste(canvas, rasterize(parts, size, size), random_texture(rng, size, size))

    mask, radius = _place_shape(rng, shape, size, min_scale=0.22)
    texture = random_texture(rng, size, size, scale=max(2.5, radius * rng.uniform(0.2, 0.6)))
    if object_colour is not None:
        texture[:] = np.asarray(object_colour, np.float32)
    paste(canvas, mask, texture)
    return np.clip(canvas, 0, 255).astype(np.uint8), mask


@dataclass
class ClassifySummary:
    """What :func:`make_classify_dataset` wrote."""

    root: Path
    classes: list[str]
    n_train: int
    n_val: int
    size: int
    seed: int
    seconds: float
    train_dir: Path = field(init=False)
    val_dir: Path = field(init=False)
    mask_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.train_dir = self.root / "train"
        self.val_dir = self.root / "val"
        self.mask_dir = self.root / "masks"


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise DinokitError(f"--{name} must be at least {minimum}, not {value}.")


def make_classify_dataset(
    out: str | Path,
    classes: int = 10,
    per_class: int = 100,
    val_fraction: float = 0.2,
    size: int = 96,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress = NULL_PROGRESS,
    style: str = "cluttered",
    class_colour: float = 0.0,
    class_texture: float = 0.0,
    background: str = "random",
) -> ClassifySummary:
    """Write the synthetic shape-classification set.

    ``style``: ``"cluttered"`` (default: textured objects over photographs or clutter, nothing but
    the shape tells the class) or ``"simple"`` (flat-coloured objects on smooth low-contrast
    backgrounds, see :func:`draw_simple_image`). ``class_colour`` (simple style only): the fraction
    of images whose object hue follows the class (each class has its own hue, plus noise), as in
    real classes where colour is a noisy cue; the other images get random colours.
    ``class_texture`` (simple style only): the fraction of images whose object carries its class's
    surface pattern (stripes, checks or dots at a class-specific period, see :func:`class_pattern`),
    the others being flat: a noisy appearance cue that colour augmentations do not remove.
    ``background`` (simple style only): ``"random"`` or ``"grey"``, see :data:`BACKGROUNDS`.

    Layout: ``out/train/<class>/<NNNNN>.png`` and ``out/val/<class>/<NNNNN>.png`` (ImageFolder
    roots), each image's foreground mask at ``out/masks/<split>/<class>/<NNNNN>.png`` (8-bit,
    0 = background, 1 = the object) and ``out/synth.json`` describing the set. Of each class's
    ``per_class`` images, ``round(per_class * val_fraction)`` go to val.
    """
    _check_positive("classes", classes)
    _check_positive("per-class", per_class)
    _check_positive("size", size, 16)
    if not 0.0 <= val_fraction < 1.0:
        raise DinokitError(f"--val-fraction must lie in [0, 1), not {val_fraction}.")
    if style not in STYLES:
        raise DinokitError(f"--style must be one of {', '.join(STYLES)}, not {style!r}.")
    if not 0.0 <= class_colour <= 1.0:
        raise DinokitError(f"--class-colour must lie in [0, 1], not {class_colour}.")
    if not 0.0 <= class_texture <= 1.0:
        raise DinokitError(f"--class-texture must lie in [0, 1], not {class_texture}.")
    if (class_colour > 0 or class_texture > 0) and style != "simple":
        raise DinokitError(
            "--class-colour and --class-texture need --style simple (the cluttered style keeps "
            "colours and textures random)."
        )
    if background not in BACKGROUNDS:
        raise DinokitError(f"--background must be one of {', '.join(BACKGROUNDS)}, not {background!r}.")
    if background != "random" and style != "simple":
        raise DinokitError(
            "--background needs --style simple (the cluttered style's backgrounds are photographs "
            "and clutter)."
        )
    names = class_names(classes)
    n_val = int(round(per_class * val_fraction))
    n_train = per_class - n_val
    if n_train < 1:
        raise DinokitError("--val-fraction leaves no training image; lower it or raise --per-class.")
    root = prepare_synth_output(out, "classify", overwrite)

    start = time.perf_counter()
    photographs()  # load once, outside the timed loop's first step
    task = progress.task("Drawing shapes", total=classes * per_class)
    for ci, name in enumerate(names):
        for i in range(per_class):
            split = "train" if i < n_train else "val"
            rng = item_rng(seed, "classify", ci, i)
            if style == "simple":
                hue = class_hue(ci, classes) if rng.random() < class_colour else None
                pattern = class_pattern(ci) if class_texture > 0 and rng.random() < class_texture else None
                image, mask = draw_simple_image(
                    rng, name, size, hue=hue, pattern=pattern, background=background
                )
            else:
                image, mask = draw_classify_image(rng, name, size)
            fname = f"{i:05d}.png"
            write_png(root / split / name / fname, image)
            write_png(root / "masks" / split / name / fname, mask.astype(np.uint8))
            task.advance(1)
    task.close()
    seconds = time.perf_counter() - start
    summary = ClassifySummary(root, names, n_train * classes, n_val * classes, size, seed, seconds)
    write_json(
        root / "synth.json",
        {
            "kind": "classify",
            "classes": names,
            "per_class": per_class,
            "train_per_class": n_train,
            "val_per_class": n_val,
            "size": size,
            "seed": seed,
            "style": style,
            "class_colour": class_colour,
            "class_texture": class_texture,
            "background": background,
            "layout": {
                "train": "train/<class>/<name>.png",
                "val": "val/<class>/<name>.png",
                "masks": "masks/<split>/<class>/<name>.png (0 = background, 1 = object)",
            },
        },
    )
    return summary

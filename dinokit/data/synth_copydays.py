"""A built-in copy-detection set in the Copydays layout (``dinokit synth copydays``).

Originals are photographs (scikit-image's bundled pictures, each used once) and procedurally drawn
scenes (landscapes, clutter, scattered shapes), all distinct from each other. Each original gets
the Copydays kinds of copy::

    DIR/copydays/original/200000.jpg            group 2000, the original (suffix 00)
    DIR/copydays/strong/200001.jpg, 200002.jpg   1-3 heavily edited copies of group 2000
    DIR/copydays/jpegqual/<q>/200000.jpg         re-encoded as JPEG at quality q (3 ... 75)
    DIR/copydays/crops/<c>/200000.jpg            central crop with c% of the area removed (10 ... 80)
    DIR/distractors/*.jpg                        other distinct images, for the database
    DIR/whitening/*.jpg                          yet other distinct images, to learn a whitening
    DIR/synth.json                               what was generated (written last)

A strong query's positives are the originals that share its first 4 characters; every other
query's positive is the original of the same name, as in the Copydays protocol.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from ..errors import DinokitError
from ..io import write_json
from ..progress import NULL_PROGRESS, Progress
from ..viz import load_font
from .synth import (
    SHAPE_NAMES,
    item_rng,
    photo_crop,
    photographs,
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

JPEG_QUALITIES = (3, 5, 8, 10, 15, 20, 30, 50, 75)
CROP_PERCENTS = (10, 15, 20, 30, 40, 50, 60, 70, 80)
FIRST_GROUP = 2000
ORIGINAL_QUALITY = 95
STRONG_EDITS = ("colour", "blur", "text", "logo", "rotation", "collage", "print_scan", "reframe")
_ASPECTS = (1.0, 4 / 3, 3 / 2, 3 / 4, 2 / 3)
_ROLES = {"original": 0, "strong": 1, "distractor": 2, "whitening": 3}
_WORDS = (
    "SALE",
    "copy",
    "dinokit",
    "2026",
    "holiday",
    "(c) photo",
    "sample",
    "NEWS",
    "trip",
    "summer",
    "hello",
    "draft",
    "www.example.org",
    "LIVE",
    "#42",
)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def _landscape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky gradient, a sun, layered ridges filled with textures."""
    top, bottom = random_colour(rng), random_colour(rng)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.float32).copy()
    if rng.random() < 0.7:
        sun = place_parts(
            shape_parts("circle"),
            rng.uniform(0, w),
            rng.uniform(0, h * 0.5),
            min(h, w) * rng.uniform(0.05, 0.15),
            0,
        )
        canvas[rasterize(sun, h, w)] = random_colour(rng)
    yy = np.arange(h)[:, None]
    n_layers = int(rng.integers(2, 5))
    for layer in range(n_layers):
        base = h * (0.3 + 0.6 * (layer + rng.uniform(0.2, 0.8)) / n_layers)
        ridge = base + (smooth_noise(rng, 1, w, cells=int(rng.integers(3, 12)))[0] - 0.5) * h * rng.uniform(
            0.15, 0.5
        )
        mask = yy >= ridge[None, :]
        tex = random_texture(rng, h, w, scale=min(h, w) * rng.uniform(0.03, 0.12))
        canvas[mask] = tex[mask] * rng.uniform(0.5, 1.0)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _shapes_scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Many textured shapes of all kinds scattered over a textured ground."""
    canvas = random_texture(rng, h, w)
    for _ in range(int(rng.integers(5, 14))):
        parts = place_parts(
            shape_parts(SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]),
            rng.uniform(0, w),
            rng.uniform(0, h),
            min(h, w) * rng.uniform(0.06, 0.25),
            rng.uniform(0, 2 * np.pi),
        )
        m = rasterize(parts, h, w)
        canvas[m] = random_texture(rng, h, w)[m]
    return np.clip(canvas, 0, 255).astype(np.uint8)


def procedural_picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A distinct synthetic picture (uint8 RGB): a landscape, a clutter scene or a scene of shapes."""
    kind = int(rng.integers(3))
    if kind == 0:
        return _landscape(rng, h, w)
    if kind == 1:
        return procedural_scene(rng, h, w)
    return _shapes_scene(rng, h, w)


def _picture_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
    if aspect >= 1:
        return max(8, round(size / aspect)), size
    return size, max(8, round(size * aspect))


def original_picture(seed: int, index: int, size: int) -> tuple[str, np.ndarray]:
    """Original ``index``: (source, uint8 RGB (h, w, 3)) with long side ``size``.

    Even indices take the next bundled photograph while there are any left (each photograph is used
    for one original only, so no two originals share content); the others are procedural pictures.
    """
    rng = item_rng(seed, "copydays", _ROLES["original"], index)
    h, w = _picture_size(rng, size)
    n_photos = len(photographs())
    if index % 2 == 0 and index // 2 < n_photos:
        name, img = photo_crop(rng, h, w, min_frac=0.75, photo=index // 2)
        return f"photo:{name}", img
    return "procedural", procedural_picture(rng, h, w)


def other_picture(seed: int, role: str, index: int, size: int) -> np.ndarray:
    """A distractor or whitening picture: procedural, so that it shares nothing with any original."""
    rng = item_rng(seed, "copydays", _ROLES[role], index)
    h, w = _picture_size(rng, size)
    return procedural_picture(rng, h, w)


# --------------------------------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------------------------------


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def central_crop(img: Image.Image, percent_removed: float) -> Image.Image:
    """The central crop that keeps (100 - c)% of the area, same aspect (the Copydays ``crops/<c>``)."""
    s = math.sqrt(1 - percent_removed / 100)
    w, h = img.size
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _edit_colour(rng, img: Image.Image, size: int) -> Image.Image:
    kind = int(rng.integers(5))
    if kind == 0:  # hue rotation
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(40, 216))) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if kind == 1:
        return ImageOps.grayscale(img).convert("RGB")
    if kind == 2:  # sepia / tint
        grey = np.asarray(ImageOps.grayscale(img), np.float32)[..., None] / 255
        tint = random_colour(rng) * 0.5 + 127
        return Image.fromarray(np.clip(grey * tint * 1.3, 0, 255).astype(np.uint8))
    if kind == 3:
        img = ImageEnhance.Color(img).enhance(rng.uniform(1.8, 3.0))
        return ImageEnhance.Contrast(img).enhance(rng.uniform(1.3, 1.8))
    return ImageOps.posterize(
        ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5)), int(rng.integers(2, 4))
    )


def _edit_blur(rng, img: Image.Image, size: int) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=size * rng.uniform(0.008, 0.02)))


def _edit_text(rng, img: Image.Image, size: int) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 4))):
        font = load_font(max(8, int(h * rng.uniform(0.08, 0.18))))
        words = " ".join(
            _WORDS[i] for i in rng.choice(len(_WORDS), size=int(rng.integers(1, 3)), replace=False)
        )
        xy = (float(rng.uniform(0, w * 0.6)), float(rng.uniform(0, h * 0.85)))
        fill = tuple(int(c) for c in random_colour(rng))
        draw.text(
            xy, words, fill=fill, font=font, stroke_width=int(rng.integers(0, 3)), stroke_fill=(0, 0, 0)
        )
    return img


def _edit_logo(rng, img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    out = np.asarray(img, np.float32).copy()
    r = min(w, h) * rng.uniform(0.1, 0.2)
    cx = float(rng.choice([r * 1.1, w - r * 1.1]))
    cy = float(rng.choice([r * 1.1, h - r * 1.1]))
    parts = place_parts(
        shape_parts(SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]), cx, cy, r, rng.uniform(0, 6.3)
    )
    m = rasterize(parts, h, w)
    alpha = rng.uniform(0.6, 1.0)
    out[m] = out[m] * (1 - alpha) + random_texture(rng, h, w)[m] * alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _edit_rotation(rng, img: Image.Image, size: int) -> Image.Image:
    angle = float(rng.uniform(8, 35) * rng.choice([-1, 1]))
    if rng.random() < 0.5:  # keep the black corners, as a rotated scan would
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    w, h = img.size
    rotated = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    a = math.radians(abs(angle))
    s = 1 / (math.cos(a) + math.sin(a) * max(w, h) / min(w, h))  # the largest corner-free central part
    cw, ch = max(8, int(w * s)), max(8, int(h * s))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return rotated.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)


def _edit_collage(rng, img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if rng.random() < 0.5:  # the picture shrunk and pasted into another one
        bw, bh = int(w * rng.uniform(1.2, 1.6)), int(h * rng.uniform(1.2, 1.6))
        canvas = Image.fromarray(procedural_picture(rng, bh, bw))
        s = rng.uniform(0.6, 0.8)
        small = img.resize((max(8, int(bw * s)), max(8, int(bh * s))), Image.Resampling.BILINEAR)
        canvas.paste(
            small, (int(rng.integers(0, bw - small.width + 1)), int(rng.integers(0, bh - small.height + 1)))
        )
        return canvas
    # a piece of another picture pasted over a part of this one
    out = img.copy()
    pw, ph = int(w * rng.uniform(0.3, 0.5)), int(h * rng.uniform(0.3, 0.5))
    piece = Image.fromarray(procedural_picture(rng, ph, pw))
    out.paste(piece, (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    return out


def _edit_print_scan(rng, img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    # a white paper margin, a slight perspective, faded contrast, blur, sensor noise
    margin = int(min(w, h) * rng.uniform(0.03, 0.08))
    paper = Image.new(
        "RGB", (w + 2 * margin, h + 2 * margin), tuple(int(v) for v in rng.integers(215, 256, 3))
    )
    paper.paste(img, (margin, margin))
    pw, ph = paper.size
    j = min(pw, ph) * 0.06
    src = [
        (rng.uniform(-j, j), rng.uniform(-j, j)),
        (pw + rng.uniform(-j, j), rng.uniform(-j, j)),
        (pw + rng.uniform(-j, j), ph + rng.uniform(-j, j)),
        (rng.uniform(-j, j), ph + rng.uniform(-j, j)),
    ]
    dst = [(0, 0), (pw, 0), (pw, ph), (0, ph)]
    coeffs = _perspective_coeffs(dst, src)
    warped = paper.transform(
        (pw, ph),
        Image.Transform.PERSPECTIVE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(40, 40, 40),
    )
    warped = warped.filter(ImageFilter.GaussianBlur(radius=size * rng.uniform(0.002, 0.006)))
    arr = np.asarray(warped, np.float32)
    arr = 128 + (arr - 128) * rng.uniform(0.6, 0.85) + rng.uniform(-15, 25)
    arr += rng.normal(0, rng.uniform(4, 12), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _perspective_coeffs(dst, src) -> list[float]:
    """PIL's 8 perspective coefficients mapping output points ``dst`` to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64)).tolist()


def _edit_reframe(rng, img: Image.Image, size: int) -> Image.Image:
    """An off-centre crop of half to three quarters of the picture, stretched to a new aspect."""
    w, h = img.size
    s = rng.uniform(0.5, 0.75)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    nh, nw = _picture_size(rng, size)
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((nw, nh), Image.Resampling.BICUBIC)


_EDITS = {
    "colour": _edit_colour,
    "blur": _edit_blur,
    "text": _edit_text,
    "logo": _edit_logo,
    "rotation": _edit_rotation,
    "collage": _edit_collage,
    "print_scan": _edit_print_scan,
    "reframe": _edit_reframe,
}


def strong_copy(rng: np.random.Generator, img: Image.Image, size: int) -> tuple[Image.Image, list[str]]:
    """A heavily edited copy: 2-3 different edits among :data:`STRONG_EDITS`, in random order."""
    n = int(rng.integers(2, 4))
    chosen = [STRONG_EDITS[i] for i in rng.choice(len(STRONG_EDITS), size=n, replace=False)]
    out = img
    for name in chosen:
        out = _EDITS[name](rng, out, size).convert("RGB")
    return out, chosen


# --------------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------------


@dataclass
class CopydaysSummary:
    """What :func:`make_copydays_dataset` wrote."""

    root: Path
    copydays: Path
    n_originals: int
    n_strong: int
    n_distractors: int
    n_whitening: int
    size: int
    seed: int
    seconds: float

    @property
    def distractors(self) -> Path:
        return self.root / "distractors"

    @property
    def whitening(self) -> Path:
        return self.root / "whitening"


def group_name(index: int, k: int = 0) -> str:
    """Copydays file stem: group ``FIRST_GROUP + index`` (4 digits) and copy number ``k`` (2 digits)."""
    return f"{FIRST_GROUP + index:04d}{k:02d}"


def make_copydays_dataset(
    out: str | Path,
    originals: int = 30,
    distractors: int = 100,
    whitening: int = 100,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> CopydaysSummary:
    """Write a Copydays-layout set with distractor and whitening folders (see the module docstring)."""

    if not 1 <= originals <= 9999 - FIRST_GROUP:
        raise DinokitError(f"--originals must lie in 1..{9999 - FIRST_GROUP}, not {originals}.")
    for opt, value in (("distractors", distractors), ("whitening", whitening)):
        if value < 0:
            raise DinokitError(f"--{opt} must be 0 or more, not {value}.")
    if size < 32:
        raise DinokitError(f"--image-size must be at least 32, not {size}.")
    root = prepare_synth_output(out, "copydays", overwrite)
    cd = root / "copydays"
    start = time.perf_counter()
    photographs()
    sources: dict[str, str] = {}
    strong_edits: dict[str, list[str]] = {}
    task = progress.task("Drawing originals and their copies", total=originals + distractors + whitening)
    for g in range(originals):
        source, arr = original_picture(seed, g, size)
        stem = group_name(g)
        sources[stem] = source
        data = jpeg_bytes(Image.fromarray(arr), ORIGINAL_QUALITY)
        write_file(cd / "original" / f"{stem}.jpg", data)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        for q in JPEG_QUALITIES:
            write_file(cd / "jpegqual" / str(q) / f"{stem}.jpg", jpeg_bytes(img, q))
        for c in CROP_PERCENTS:
            write_file(
                cd / "crops" / str(c) / f"{stem}.jpg", jpeg_bytes(central_crop(img, c), ORIGINAL_QUALITY)
            )
        rng = item_rng(seed, "copydays", _ROLES["strong"], g)
        n_strong = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        for k in range(1, n_strong + 1):
            copy, edits = strong_copy(rng, img, size)
            name = group_name(g, k)
            strong_edits[name] = edits
            write_file(cd / "strong" / f"{name}.jpg", jpeg_bytes(copy, int(rng.integers(50, 91))))
        task.advance(1)
    for role, count, folder in (
        ("distractor", distractors, "distractors"),
        ("whitening", whitening, "whitening"),
    ):
        for i in range(count):
            arr = other_picture(seed, role, i, size)
            write_file(
                root / folder / f"{role}_{i:05d}.jpg", jpeg_bytes(Image.fromarray(arr), ORIGINAL_QUALITY)
            )
            task.advance(1)
    task.close()
    seconds = time.perf_counter() - start
    write_json(
        root / "synth.json",
        {
            "kind": "copydays",
            "originals": originals,
            "strong": len(strong_edits),
            "distractors": distractors,
            "whitening": whitening,
            "size": size,
            "seed": seed,
            "jpeg_qualities": list(JPEG_QUALITIES),
            "crop_percents": list(CROP_PERCENTS),
            "sources": sources,
            "strong_edits": strong_edits,
            "layout": "copydays/{original,strong,jpegqual/<q>,crops/<c>}/<group><kk>.jpg, distractors/, whitening/",
        },
    )
    return CopydaysSummary(
        root, cd, originals, len(strong_edits), distractors, whitening, size, seed, seconds
    )

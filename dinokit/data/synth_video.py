"""A built-in video object segmentation set in the DAVIS 2017 layout (``dinokit synth video``).

Each sequence shows one to a few textured shapes moving over a slowly panning crop of a
photograph: smooth trajectories that bounce off the frame edges, a slow rotation, a breathing
scale, and occlusions where the paths cross (a fixed depth order). Every frame is annotated with
the exact label map of what was drawn::

    DIR/JPEGImages/480p/<seq>/00000.jpg ...
    DIR/Annotations/480p/<seq>/00000.png ...   indexed PNG, DAVIS palette; 0 background, k = object k
    DIR/ImageSets/2017/val.txt                 the sequence names
    DIR/synth.json                             what was generated (written last)
"""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DinokitError
from ..io import atomic_write_text, write_json
from ..progress import NULL_PROGRESS, Progress
from .palette import DAVIS_PALETTE
from .synth import (
    SHAPE_NAMES,
    item_rng,
    photo_crop,
    place_parts,
    random_texture,
    rasterize,
    shape_parts,
    write_file,
)
from .synth_output import prepare_synth_output

MAX_OBJECTS = 20


def parse_object_range(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """``"1-3"`` -> (1, 3), ``"2"`` -> (2, 2); a :class:`DinokitError` for anything else."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
        if not m:
            raise DinokitError(f"--objects takes a number or a range such as 1-3, not {text!r}.")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise DinokitError(f"--objects must be a range within 1-{MAX_OBJECTS} with the smaller number first.")
    return int(lo), int(hi)


def _bounce(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into [lo, hi] (a triangle wave), so that a path bounces off the edges."""
    span = max(hi - lo, 1e-6)
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


@dataclass
class _Object:
    parts: list
    sprite: Image.Image
    sprite_radius: float
    cx: np.ndarray  # per frame
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray


def _make_object(rng: np.random.Generator, shape: str, frames: int, height: int, width: int) -> _Object:
    side = min(height, width)
    r0 = side * rng.uniform(0.12, 0.24)
    t = np.arange(frames, dtype=np.float64)
    # scale: a slow breathing of up to +-25%
    radius = r0 * (
        1 + rng.uniform(0.08, 0.25) * np.sin(2 * np.pi * t / rng.uniform(15, 40) + rng.uniform(0, 6.3))
    )
    # position: a drift plus a wobble, bounced into the frame (most of the object stays visible)
    speed = side * rng.uniform(0.006, 0.02)
    heading = rng.uniform(0, 2 * np.pi)
    wobble = side * rng.uniform(0.0, 0.04)
    period = rng.uniform(10, 30)
    phase = rng.uniform(0, 2 * np.pi)
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    mx, my = r0 * 0.6, r0 * 0.6
    cx = _bounce(
        x0 + speed * math.cos(heading) * t + wobble * np.sin(2 * np.pi * t / period + phase), mx, width - mx
    )
    cy = _bounce(
        y0 + speed * math.sin(heading) * t + wobble * np.cos(2 * np.pi * t / period + phase), my, height - my
    )
    angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.05, 0.05) * t
    # the texture lives on a sprite in the object's own frame, so it moves, turns and scales with it
    size = int(math.ceil(2 * radius.max())) + 8
    size = max(size, 16)
    texture = random_texture(rng, size, size, scale=size * rng.uniform(0.06, 0.18))
    sprite = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
    return _Object(shape_parts(shape), sprite, size / 2 - 2, cx, cy, radius, angle)


def _draw_object(obj: _Object, i: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool, colours (H, W, 3) uint8) of object ``obj`` in frame ``i``."""
    cx, cy, r, a = float(obj.cx[i]), float(obj.cy[i]), float(obj.radius[i]), float(obj.angle[i])
    mask = rasterize(place_parts(obj.parts, cx, cy, r, a), height, width)
    # frame point x -> unit coordinates u = rot^T (x - c) / r -> sprite point P/2 + R u
    co, si = math.cos(a), math.sin(a)
    k = obj.sprite_radius / r
    half = obj.sprite.width / 2
    coeffs = (
        k * co,
        k * si,
        half - k * (co * cx + si * cy),
        -k * si,
        k * co,
        half - k * (-si * cx + co * cy),
    )
    colour = obj.sprite.transform(
        (width, height), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    return mask, np.asarray(colour)


@dataclass
class DrawnVideo:
    """One generated sequence, in memory: frames (T, H, W, 3) uint8 and labels (T, H, W) uint8."""

    name: str
    frames: np.ndarray
    labels: np.ndarray
    n_objects: int


def draw_sequence(
    seed: int, index: int, frames: int, height: int, width: int, objects: tuple[int, int]
) -> DrawnVideo:
    """Draw sequence ``index`` of a set: the frames and the exact label map of every frame."""
    rng = item_rng(seed, "video", index)
    n_obj = int(rng.integers(objects[0], objects[1] + 1))
    # a photograph larger than the frame; the view pans slowly across it
    pan = 1.25
    big_h, big_w = int(math.ceil(height * pan)), int(math.ceil(width * pan))
    photo_name, background = photo_crop(rng, big_h, big_w, min_frac=0.6)
    t = np.arange(frames, dtype=np.float64)
    step = min(height, width) * rng.uniform(0.002, 0.008)
    heading = rng.uniform(0, 2 * np.pi)
    ox = np.round(
        _bounce(rng.uniform(0, big_w - width) + step * math.cos(heading) * t, 0, big_w - width)
    ).astype(int)
    oy = np.round(
        _bounce(rng.uniform(0, big_h - height) + step * math.sin(heading) * t, 0, big_h - height)
    ).astype(int)

    shapes = rng.choice(len(SHAPE_NAMES), size=n_obj, replace=n_obj > len(SHAPE_NAMES))
    # every object must be well visible in the first frame (the one a tracker is given): retry placements
    for _attempt in range(30):
        objs = [_make_object(rng, SHAPE_NAMES[s], frames, height, width) for s in shapes]
        first = np.zeros((height, width), np.uint8)
        areas = []
        for k, obj in enumerate(objs, start=1):
            m, _ = _draw_object(obj, 0, height, width)
            areas.append(m.sum())
            first[m] = k
        if all(areas[k - 1] > 0 and (first == k).sum() >= 0.6 * areas[k - 1] for k in range(1, n_obj + 1)):
            break
    else:
        # crowded frames: keep the objects that show in the first frame (DAVIS objects start there)
        objs = [obj for k, obj in enumerate(objs, start=1) if (first == k).sum() > 0]
        n_obj = len(objs)

    out_frames = np.empty((frames, height, width, 3), np.uint8)
    out_labels = np.zeros((frames, height, width), np.uint8)
    for i in range(frames):
        canvas = background[oy[i] : oy[i] + height, ox[i] : ox[i] + width].copy()
        labels = out_labels[i]
        for k, obj in enumerate(objs, start=1):  # later objects pass in front of earlier ones
            m, colour = _draw_object(obj, i, height, width)
            canvas[m] = colour[m]
            labels[m] = k
        out_frames[i] = canvas
    name = f"{photo_name.replace('_', '-')}-{index:02d}"
    return DrawnVideo(name, out_frames, out_labels, n_obj)


@dataclass
class VideoSummary:
    """What :func:`make_video_dataset` wrote."""

    root: Path
    sequences: list[str]
    n_objects: dict[str, int]
    frames: int
    height: int
    width: int
    seed: int
    seconds: float


def _indexed_png_bytes(labels: np.ndarray) -> bytes:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(DAVIS_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_video_dataset(
    out: str | Path,
    sequences: int = 3,
    frames: int = 20,
    height: int = 480,
    width: int = 854,
    objects: str | int | tuple[int, int] = "1-3",
    seed: int = 0,
    jpeg_quality: int = 90,
    overwrite: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> VideoSummary:
    """Write a DAVIS-2017-layout set of ``sequences`` synthetic videos (see the module docstring)."""
    for opt, value, minimum in (
        ("sequences", sequences, 1),
        ("frames", frames, 1),
        ("height", height, 16),
        ("width", width, 16),
    ):
        if value < minimum:
            raise DinokitError(f"--{opt} must be at least {minimum}, not {value}.")
    obj_range = parse_object_range(objects)
    root = prepare_synth_output(out, "video", overwrite)
    start = time.perf_counter()
    names: list[str] = []
    n_objects: dict[str, int] = {}
    task = progress.task("Drawing video frames", total=sequences * frames)
    for s in range(sequences):
        seq = draw_sequence(seed, s, frames, height, width, obj_range)
        for i in range(frames):
            buf = io.BytesIO()
            Image.fromarray(seq.frames[i]).save(buf, format="JPEG", quality=jpeg_quality)
            write_file(root / "JPEGImages" / "480p" / seq.name / f"{i:05d}.jpg", buf.getvalue())
            write_file(
                root / "Annotations" / "480p" / seq.name / f"{i:05d}.png", _indexed_png_bytes(seq.labels[i])
            )
            task.advance(1, sequence=seq.name)
        names.append(seq.name)
        n_objects[seq.name] = seq.n_objects
    task.close()
    atomic_write_text(root / "ImageSets" / "2017" / "val.txt", "".join(f"{n}\n" for n in names))
    seconds = time.perf_counter() - start
    write_json(
        root / "synth.json",
        {
            "kind": "video",
            "sequences": names,
            "objects": n_objects,
            "frames": frames,
            "height": height,
            "width": width,
            "seed": seed,
            "layout": "DAVIS 2017: JPEGImages/480p/<seq>/<frame>.jpg, Annotations/480p/<seq>/<frame>.png "
            "(indexed, DAVIS palette), ImageSets/2017/val.txt",
        },
    )
    return VideoSummary(root, names, n_objects, frames, height, width, seed, seconds)

"""Finding, opening and batching images: plain folders (searched recursively) and labelled
ImageFolder roots (``ROOT/<class>/.../<image>``)."""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, DinokitError

log = logging.getLogger("dinokit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(str(path)).startswith(".")


class _ImageWalk:
    """A folder walk that follows symbolic links but enters each real folder once and lists each real
    file once (by device and inode), so that a link to ``..`` neither loops forever nor counts an
    image twice. One walk can cover several roots (the class folders of a labelled root)."""

    def __init__(self) -> None:
        self.seen_dirs: set[tuple[int, int]] = set()
        self.seen_files: set[tuple[int, int]] = set()
        self.skipped_dirs = 0
        self.skipped_files = 0

    @staticmethod
    def _key(path: str | os.PathLike) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:  # a broken link: listed, and reported unreadable when it is opened
            return None
        return st.st_dev, st.st_ino

    def enter(self, folder: str | os.PathLike) -> bool:
        """Mark ``folder`` visited; False (counted as skipped) when it was visited before."""
        key = self._key(folder)
        if key is not None and key in self.seen_dirs:
            self.skipped_dirs += 1
            return False
        if key is not None:
            self.seen_dirs.add(key)
        return True

    def add_file(self, path: str | os.PathLike, key: tuple[int, int] | None = None) -> bool:
        """Mark ``path`` listed; False (counted as skipped) when the same file was listed before."""
        key = key or self._key(path)
        if key is not None and key in self.seen_files:
            self.skipped_files += 1
            return False
        if key is not None:
            self.seen_files.add(key)
        return True

    def images(self, root: Path, recursive: bool = True, entered: bool = False) -> list[Path]:
        """The image files under ``root`` not listed before, in sorted order (depth first);
        ``entered``: ``root`` was marked visited beforehand and is walked all the same."""
        found: list[Path] = []
        pending = [root] if entered or self.enter(root) else []
        while pending:
            folder = pending.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
                device = os.stat(folder).st_dev
            except OSError as e:
                log.warning("cannot list the folder %s (%s); skipping it", folder, e.__class__.__name__)
                continue
            subfolders = []
            for entry in entries:
                path = Path(folder) / entry.name
                if _is_dir(entry):
                    if recursive and not entry.name.startswith(".") and self.enter(path):
                        subfolders.append(path)
                elif is_image_file(entry.name):
                    # a plain file's inode comes with the listing; only a link costs a stat
                    key = None if entry.is_symlink() else (device, entry.inode())
                    if self.add_file(path, key):
                        found.append(path)
            pending.extend(reversed(subfolders))
        return found

    def report(self, root: str | os.PathLike) -> None:
        if self.skipped_dirs or self.skipped_files:
            log.warning(
                "%s: skipped %d folders and %d images reached a second time (through links or repeated paths)",
                root,
                self.skipped_dirs,
                self.skipped_files,
            )


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def find_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under ``root`` (recursively), sorted; an error when there is no such folder.

    Links are followed, but each real folder is entered once and each real file listed once."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"The folder {root} does not exist.")
    if root.is_file():
        return [root] if is_image_file(root) else []
    walk = _ImageWalk()
    paths = walk.images(root, recursive)
    walk.report(root)
    return sorted(paths)


def data_fingerprint(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """A hash of the image list (relative paths and sizes), so a cache notices a changed folder."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        rel = os.path.relpath(p, root) if root is not None else str(p)
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()[:16]


def expand_image_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Images named on a command line: files, folders (recursively) or glob patterns; each real file
    once, however many names or links reach it."""
    walk = _ImageWalk()
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            out.extend(sorted(walk.images(p)))
        elif p.is_file():
            if walk.add_file(p):
                out.append(p)
        elif any(c in s for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                raise DataError(f"The pattern {s} matches no file.")
            for m in matches:
                if os.path.isdir(m):
                    out.extend(sorted(walk.images(Path(m))))
                elif is_image_file(m) and walk.add_file(m):
                    out.append(Path(m))
        else:
            raise DataError(f"The path {s} does not exist.")
    walk.report("the given paths")
    if not out:
        raise DataError("No images were found in the given paths.")
    return out


#: modes of 16-bit (and wider integer) grey images; ``convert("RGB")`` would clip them at 255 (white)
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

#: the EXIF tag that says how a camera held the picture (1 upright ... 8), and the transposition that
#: turns the stored pixels upright for each value (EXIF 2.3, "Orientation"; the same table as
#: Pillow's ``ImageOps.exif_transpose``); values 5 to 8 swap width and height
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: the reductions libjpeg's DCT scaling decodes at (Pillow's ``Image.draft``), largest first
JPEG_REDUCTIONS = (8, 4, 2)
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG of many phones; its first picture is a JPEG


@dataclass(frozen=True)
class DecodeNeed:
    """What a transform needs of a decoded picture (upright, as the transform sees it), so that a JPEG
    can be decoded at a reduced DCT scale that the transform still only shrinks, never enlarges.

    ``short_side``: the shorter side at least this (a Resize to a short side); ``width``/``height``:
    at least this box (a Resize to a fixed size); ``long_side``: the longer side at least this (a
    thumbnail); ``crops``: for each random resized crop ``(size, min_area, min_aspect)``, the smallest
    crop it can draw (``min_area`` of the picture at the most elongated aspect ``min_aspect`` <= 1)
    at least ``size`` pixels on its shorter side. An empty need is met by any size.
    """

    short_side: int = 0
    width: int = 0
    height: int = 0
    long_side: int = 0
    crops: tuple[tuple[int, float, float], ...] = ()

    def met_by(self, width: int, height: int) -> bool:
        """Whether a picture of ``width`` x ``height`` pixels still covers the need."""
        if min(width, height) < self.short_side or max(width, height) < self.long_side:
            return False
        if width < self.width or height < self.height:
            return False
        return all(math.sqrt(area * aspect * width * height) >= size for size, area, aspect in self.crops)

    def merge(self, other: DecodeNeed | None) -> DecodeNeed | None:
        """The need of two transforms applied to the same picture (None, "the full picture", wins)."""
        if other is None:
            return None
        return DecodeNeed(
            max(self.short_side, other.short_side),
            max(self.width, other.width),
            max(self.height, other.height),
            max(self.long_side, other.long_side),
            tuple(sorted(set(self.crops + other.crops))),
        )


@dataclass
class DecodedImage:
    """A picture as :func:`read_image` gives it: upright RGB, with the upright size of the full picture
    and the DCT reduction it was decoded at (1: full size)."""

    image: Image.Image
    full_size: tuple[int, int]  #: (width, height) of the full-size picture, upright
    reduction: int = 1


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image (1, upright, where there is none or it is broken)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the picture unreadable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The (width, height) of stored pixels of ``size`` once turned upright."""
    return (size[1], size[0]) if orientation >= 5 else (size[0], size[1])


def jpeg_reduction(stored_size: tuple[int, int], orientation: int, need: DecodeNeed | None) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) at which a JPEG of ``stored_size`` (its pixels as
    stored, before EXIF orientation) still meets ``need`` once upright; the reduced decode is
    ``ceil(size / reduction)`` on each side, as libjpeg gives it."""
    if need is None:
        return 1
    w, h = stored_size
    for r in JPEG_REDUCTIONS:
        if need.met_by(*upright_size((-(-w // r), -(-h // r)), orientation)):
            return r
    return 1


class _NotReduced(Exception):
    """The decoder scaled otherwise than asked (never seen; then the picture is decoded in full)."""


def read_image(path: str | os.PathLike, need: DecodeNeed | None = None) -> DecodedImage:
    """The one image reader: a file as upright RGB (its EXIF orientation applied), a
    :class:`DataError` naming the file when it cannot be read.

    With ``need`` a JPEG large enough is decoded at the DCT scale 1/2, 1/4 or 1/8 that still meets
    it (:func:`jpeg_reduction`); anything else, and every JPEG without a need, is decoded in full.
    16-bit grey images are scaled to 8 bits (value >> 8). An image larger than Pillow's
    decompression-bomb limit is refused like any unreadable one, before it is decoded. (Masks and
    label maps are read by :mod:`dinokit.data.masks`, as stored: no orientation, no reduction.)"""
    try:
        with Image.open(path) as im:
            reduction, orientation = 1, 1
            if im.format in _JPEG_FORMATS:
                orientation = exif_orientation(im)  # a JPEG's EXIF comes with its header
                reduction = jpeg_reduction(im.size, orientation, need)
            full = upright_size(im.size, orientation)
            if reduction > 1:
                stored = im.size
                im.draft(None, (stored[0] // reduction, stored[1] // reduction))
                if need is None or not need.met_by(*upright_size(im.size, orientation)):
                    raise _NotReduced  # the decoder scaled otherwise than asked: never decode too small
                if im.size == stored:  # a JPEG the decoder cannot scale (several tiles): in full
                    reduction = 1
            im.load()
            if im.format not in _JPEG_FORMATS:
                orientation = exif_orientation(im)  # PNG and WebP may keep theirs after the pixels
                full = upright_size(im.size, orientation)
            if im.mode in _WIDE_GREY_MODES:
                grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
                rgb = Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
            else:
                rgb = im.convert("RGB")
    except _NotReduced:
        return read_image(path, None)
    except FileNotFoundError as e:
        raise DataError(f"The image {path} does not exist.") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path} is not a readable image (more pixels than Pillow decodes safely, a possible decompression bomb)."
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable image ({e.__class__.__name__}).") from e
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    return DecodedImage(rgb, full, reduction)


def open_rgb(path: str | os.PathLike, need: DecodeNeed | None = None) -> Image.Image:
    """:func:`read_image`'s picture: upright RGB, decoded at a reduced JPEG scale only where ``need``
    allows it."""
    return read_image(path, need).image


@dataclass
class LabelledFolder:
    """An ImageFolder root: one sub-folder per class, images found recursively inside each."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def scan_labelled_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> LabelledFolder:
    """Scan ``root/<class>/...``. With ``classes`` given (e.g. the training set's), class indices follow
    that list and a class folder outside it is an error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The folder {root} does not exist.")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root} has no class sub-folders (expected ROOT/<class>/<image>).")
    if classes is None:
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(
                f"{root} has classes the training set lacks: {', '.join(extra[:5])}"
                + (" ..." if len(extra) > 5 else "")
                + "."
            )
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    walk = _ImageWalk()
    for folder in (root, *(root / c for c in found)):  # a link from one class folder to another
        walk.enter(folder)  # must not lend it the other's images
    for c in found:
        samples.extend((p, index[c]) for p in sorted(walk.images(root / c, entered=True)))
    walk.report(root)
    if not samples:
        raise DataError(f"{root} holds no images.")
    return LabelledFolder(root=root, classes=list(classes), samples=samples)


def looks_labelled(root: str | os.PathLike) -> bool:
    """True when ``root`` holds class sub-folders and no loose images at its top level."""
    root = Path(root)
    if not root.is_dir():
        return False
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    dirs = [e for e in entries if e.is_dir()]
    loose = [e for e in entries if e.is_file() and is_image_file(e)]
    return bool(dirs) and not loose


def read_image_or_skip(
    path: str | os.PathLike, need: DecodeNeed | None = None, strict: bool = False
) -> DecodedImage | None:
    """The image at ``path`` (:func:`read_image`), or ``None`` when it cannot be read: the item every
    dataset yields for an unreadable image, dropped by :func:`collate_skip_none` and counted. With
    ``strict`` (``--strict``) the error naming the file stops the run instead."""
    try:
        return read_image(path, need)
    except DinokitError:
        if strict:
            raise
        log.warning("skipping unreadable image %s", path)
        return None


def open_rgb_or_skip(
    path: str | os.PathLike, strict: bool = False, need: DecodeNeed | None = None
) -> Image.Image | None:
    """:func:`read_image_or_skip`'s picture (upright RGB), or ``None`` for an unreadable image."""
    decoded = read_image_or_skip(path, need, strict)
    return None if decoded is None else decoded.image


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths (with optional labels) through a transform.

    Each image is read upright (EXIF orientation) and, unless ``exact_decode``, a large JPEG at the
    reduced DCT scale that still covers what ``transform`` needs (:func:`read_image`,
    :func:`dinokit.data.transforms.decode_need`). An image that cannot be decoded yields ``None``
    (dropped by :func:`collate_skip_none` and counted) instead of crashing a data-loader worker; with
    ``strict`` it stops the run.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None = None,
        transform: Callable | None = None,
        strict: bool = False,
        exact_decode: bool = False,
    ):
        from .transforms import decode_need

        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.strict = strict  #: an unreadable image stops the run; else the item is None (skipped, counted)
        self.need = None if exact_decode or transform is None else decode_need(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = open_rgb_or_skip(self.paths[i], self.strict, self.need)
        if img is None:
            return None
        x = self.transform(img) if self.transform is not None else img
        label = self.labels[i] if self.labels is not None else -1
        return x, label, i


def decode_name(exact_decode: bool) -> str:
    """How a run decoded its images, as its records and cache fingerprints name it: ``exact`` (every
    JPEG in full) or ``reduced`` (a large JPEG at the DCT scale that covers the transform's need)."""
    return "exact" if exact_decode else "reduced"


def collate_skip_none(batch):
    """Collate (x, label, index) triples, dropping the ``None`` of unreadable images."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, skipped
    return torch.utils.data.default_collate(kept), skipped


def readable_batches(loader: Iterable, task: Any = None) -> Iterator[tuple]:
    """The ``(x, labels, indices)`` batches of a loader built with :func:`collate_skip_none`, without
    the batches in which every image was unreadable. ``task`` (a progress task) advances by every
    image of the loader, read or skipped, once its batch has been used."""
    for batch, skipped in loader:
        if batch is None:
            if task is not None:
                task.advance(skipped)
            continue
        yield batch
        if task is not None:
            task.advance(len(batch[2]) + skipped)

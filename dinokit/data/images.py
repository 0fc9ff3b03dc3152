"""Finding, opening and batching images: plain folders (searched recursively) and labelled
ImageFolder roots (``ROOT/<class>/.../<image>``)."""

from __future__ import annotations

import glob
import hashlib
import logging
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
                root, self.skipped_dirs, self.skipped_files,
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


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, fully decoded; a :class:`DataError` naming the file when it cannot be read.

    16-bit grey images are scaled to 8 bits (value >> 8). An image larger than Pillow's
    decompression-bomb limit is refused like any unreadable one, before it is decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _WIDE_GREY_MODES:
                grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
                return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"The image {path} does not exist.") from e
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path} is not a readable image (more pixels than Pillow decodes safely, a possible decompression bomb)."
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} is not a readable image ({e.__class__.__name__}).") from e


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
    samples = []
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


def open_rgb_or_skip(path: str | os.PathLike, strict: bool = False) -> Image.Image | None:
    """The image at ``path`` (:func:`open_rgb`), or ``None`` when it cannot be read: the item every
    dataset yields for an unreadable image, dropped by :func:`collate_skip_none` and counted. With
    ``strict`` (``--strict``) the error naming the file stops the run instead."""
    try:
        return open_rgb(path)
    except DinokitError:
        if strict:
            raise
        log.warning("skipping unreadable image %s", path)
        return None


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths (with optional labels) through a transform.

    An image that cannot be decoded yields ``None`` (dropped by :func:`collate_skip_none` and
    counted) instead of crashing a data-loader worker; with ``strict`` it stops the run.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None = None,
        transform: Callable | None = None,
        strict: bool = False,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.strict = strict  #: an unreadable image stops the run; else the item is None (skipped, counted)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = open_rgb_or_skip(self.paths[i], self.strict)
        if img is None:
            return None
        x = self.transform(img) if self.transform is not None else img
        label = self.labels[i] if self.labels is not None else -1
        return x, label, i


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

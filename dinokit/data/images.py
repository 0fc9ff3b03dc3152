"""Finding, opening and batching images: plain folders (searched recursively) and labelled
ImageFolder roots (``ROOT/<class>/.../<image>``)."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

log = logging.getLogger("dinokit")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(str(path)).startswith(".")


def find_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under ``root`` (recursively), sorted; an error when there is no such folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"The folder {root} does not exist.")
    if root.is_file():
        return [root] if is_image_file(root) else []
    paths = []
    walker = os.walk(root, followlinks=True) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    return sorted(paths)


def expand_image_inputs(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Images named on a command line: files, folders (recursively) or glob patterns."""
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s).expanduser()
        if p.is_dir():
            out.extend(find_images(p))
        elif p.is_file():
            out.append(p)
        elif any(c in s for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                raise DataError(f"The pattern {s} matches no file.")
            for m in matches:
                out.extend(find_images(m) if os.path.isdir(m) else [Path(m)] if is_image_file(m) else [])
        else:
            raise DataError(f"The path {s} does not exist.")
    seen = set()
    unique = []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    if not unique:
        raise DataError("No images were found in the given paths.")
    return unique


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, fully decoded; a :class:`DataError` naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DataError(f"The image {path} does not exist.") from e
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
    for c in found:
        samples.extend((p, index[c]) for p in find_images(root / c))
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


class ImageDataset(torch.utils.data.Dataset):
    """Images from a list of paths (with optional labels) through a transform.

    With ``skip_unreadable`` an image that cannot be decoded yields ``None`` (dropped by
    :func:`collate_skip_none` and counted) instead of crashing a data-loader worker.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None = None,
        transform: Callable | None = None,
        skip_unreadable: bool = False,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_rgb(self.paths[i])
        except DataError:
            if self.skip_unreadable:
                log.warning("skipping unreadable image %s", self.paths[i])
                return None
            raise
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

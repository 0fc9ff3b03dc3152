"""The Copydays folder layout (Douze et al. 2009, as used by Caron et al. 2021, Sec. 4.2.1): the
``original`` block (the database), the query blocks ``strong``, ``jpegqual/<q>`` and ``crops/<c>``,
and which original each query is a copy of."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import is_image_file

LAYOUT_HINT = "expected original/, strong/, jpegqual/<q>/ and crops/<c>/"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _block_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


@dataclass
class CopydaysLayout:
    """The blocks of a Copydays root: ``original`` (the database) and the query blocks, in order
    strong, jpegqual/<q> (increasing q), crops/<c> (increasing c)."""

    root: Path
    originals: list[Path]
    blocks: dict[str, list[Path]]


def scan_copydays(root: str | os.PathLike) -> CopydaysLayout:
    """Read the blocks of a Copydays root from its folders (sizes are not assumed)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"The Copydays folder {root} does not exist.")
    for name in ("original", "strong"):
        if not (root / name).is_dir():
            raise DataError(f"The Copydays folder {root} has no {name}/ block ({LAYOUT_HINT}).")
    originals = _block_images(root / "original")
    if not originals:
        raise DataError(f"The block {root / 'original'} holds no images, so there is nothing to search.")
    blocks: dict[str, list[Path]] = {"original": originals, "strong": _block_images(root / "strong")}
    for group in ("jpegqual", "crops"):
        if not (root / group).is_dir():
            continue
        subs = sorted(
            (d for d in (root / group).iterdir() if d.is_dir() and not d.name.startswith(".")),
            key=lambda d: _natural_key(d.name),
        )
        for d in subs:
            blocks[f"{group}/{d.name}"] = _block_images(d)
    for name, paths in blocks.items():
        if not paths:
            raise DataError(f"The query block {root / name} holds no images; remove the folder or fill it.")
    return CopydaysLayout(root, originals, blocks)


def copydays_positives(block: str, queries: Sequence[Path], originals: Sequence[Path]) -> list[list[int]]:
    """Each query's positives among ``originals`` (indices): for ``strong`` the originals that share
    the first 4 characters of the file name; for other blocks the original of the same name (the
    same index in the reference, whose blocks are complete)."""
    if block == "strong":
        by_prefix: dict[str, list[int]] = {}
        for j, o in enumerate(originals):
            by_prefix.setdefault(o.name[:4], []).append(j)
        return [by_prefix.get(q.name[:4], []) for q in queries]
    by_name = {o.name: j for j, o in enumerate(originals)}
    by_stem = {o.stem: j for j, o in enumerate(originals)}
    out = []
    for i, q in enumerate(queries):
        if q.name in by_name:
            out.append([by_name[q.name]])
        elif q.stem in by_stem:
            out.append([by_stem[q.stem]])
        elif len(queries) == len(originals):
            out.append([i])
        else:
            raise DataError(
                f"{q} has no original of the same name, and the block {block} is not the size of original/."
            )
    return out

"""Where a features file goes and in which format: ``--output`` and ``--format`` read together. Light
(no torch), so that ``dinokit features`` refuses a bad or existing output before its work starts."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DinokitError

FEATURE_SUFFIXES = {".pt": "pt", ".pth": "pt", ".csv": "csv", ".npy": "npy"}
FEATURE_FORMATS = ("pt", "npy", "csv")


def features_output(path: str | os.PathLike, format: str | None = None) -> tuple[str, Path]:
    """The format and the features file for an ``--output`` and a ``--format``, which must agree.

    A path ending in ``.pt`` (or ``.pth``), ``.csv`` or ``.npy`` is that format's file (``.npy``: with
    paths.txt and the rest beside it); ``format`` left None follows the ending, and a ``format`` of
    another kind is refused. A path without one of those endings is a folder, which gets
    ``features.pt``, ``features.csv`` or ``features.npy`` (``format``, default pt); any other ending
    is refused unless the folder exists."""
    path = Path(path)
    if format is not None and format not in FEATURE_FORMATS:
        raise DinokitError(f"Unknown --format {format!r}; use pt, npy or csv.")
    by_suffix = FEATURE_SUFFIXES.get(path.suffix.lower())
    if by_suffix is not None:
        if format is not None and format != by_suffix:
            raise DinokitError(
                f"--output {path} ends in {path.suffix}, a {by_suffix} file, but --format {format} was asked for; name "
                f"the file {path.with_suffix('.' + format).name}, or leave out --format."
            )
        return by_suffix, path
    if path.suffix and not path.is_dir():
        raise DinokitError(
            f"--output {path} ends in {path.suffix}: a features file ends in .pt, .csv or .npy, and a path without "
            "an ending is a folder (create it first if its name has a dot)."
        )
    format = format or "pt"
    return format, path / f"features.{format}"

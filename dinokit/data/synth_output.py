"""The output folder of ``dinokit synth``: whose it is (the ``synth.json`` marker) and what
``--overwrite`` may remove (the folders the recorded kind of set writes, nothing else)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import OutputExistsError
from ..io import write_json

#: what each kind of set writes beside its marker file: all that ``--overwrite`` may remove
SYNTH_LAYOUTS = {
    "classify": ("train", "val", "masks"),
    "video": ("JPEGImages", "Annotations", "ImageSets"),
    "copydays": ("copydays", "distractors", "whitening"),
    "segment": ("JPEGImages", "SegmentationClass", "ImageSets", "train", "val", "classes.txt"),
}
MARKER = "synth.json"


def check_synth_output(out: str | Path, overwrite: bool = False) -> str | None:
    """The refusals of :func:`prepare_synth_output`, touching nothing: the kind of set an earlier
    ``dinokit synth`` wrote into ``out`` (to be replaced, with ``overwrite``), or None for a new or
    empty folder. Light, so that the command answers at once."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"The output {root} is a file, not a folder; choose a folder path.")
    if not (root.is_dir() and any(root.iterdir())):
        return None
    marker = root / MARKER
    if not marker.is_file():
        raise OutputExistsError(
            f"The folder {root} holds files that dinokit synth did not write (it has no {MARKER}), so it is "
            "left alone even with --overwrite; choose a new or empty folder."
        )
    if not overwrite:
        raise OutputExistsError(
            f"The output folder {root} already holds a generated set; pass --overwrite to replace it "
            "or choose another folder."
        )
    try:
        previous = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous not in SYNTH_LAYOUTS:
        raise OutputExistsError(
            f"{marker} does not say which set dinokit synth wrote there, so nothing in {root} is removed; "
            "choose a new or empty folder."
        )
    return previous


def prepare_synth_output(out: str | Path, kind: str, overwrite: bool = False) -> Path:
    """The output folder of a generated set: new or empty, or (with ``overwrite``) one that an earlier
    ``dinokit synth`` wrote, whose own folders are removed so no stale image survives.

    A non-empty folder without ``synth.json`` is someone else's data and is refused whatever the
    flag (:func:`check_synth_output`). The marker is written before the first image (and rewritten
    last with the set's description), so that an interrupted run's folder can still be replaced."""
    root = Path(out)
    previous = check_synth_output(root, overwrite)
    for name in SYNTH_LAYOUTS.get(previous, ()) if previous else ():
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / MARKER, {"kind": kind, "complete": False})
    return root

"""File output: atomic writes, run folders and metrics files.

Every file dinokit writes goes through a temporary file in the same folder and an ``os.replace``,
so a run stopped at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import DinokitError, OutputExistsError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    ``fsync=False`` skips waiting for the disk: for many small files whose set is marked complete by
    one last (synced) file, such as a generated data set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once: setting and restoring the process-wide umask per file races with other threads (the
#: PNG writers), which could leave it at 0 and create world-writable files and folders
_UMASK = _umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, allow_nan=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically."""
    atomic_write_text(path, to_json(obj) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line (used for per-epoch logs; a line is written whole or not at all)."""
    line = to_json(obj, indent=None) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def signals_deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them to the handlers that were set.

    A checkpoint being written must be finished, not torn by a second Ctrl-C: Python runs signal
    handlers between bytecodes, also inside ``torch.save``, so the handlers are swapped for one that
    only records the signal. Outside the main thread (where handlers cannot be set) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in received:
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename, with Ctrl-C and SIGTERM held until the
    file is complete (they take effect right after)."""
    import torch

    with signals_deferred(), atomic_open(path, "wb") as f:
        torch.save(obj, f)


def versions() -> dict[str, str]:
    """Versions of dinokit and what it runs on, recorded in every ``metrics.json``."""
    import torch
    import torchvision

    from . import __version__

    return {
        "dinokit": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder ``path``; refuse one that already holds files unless asked.

    ``overwrite`` allows writing into a non-empty folder (files are replaced one by one, caches that
    still match are reused); ``resume`` continues a run in its own folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"The output {path} is a file, not a folder; choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(
            f"The output folder {path} already holds results; pass --overwrite to write into it "
            "or choose another folder."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """For commands whose product is one file: refuse to replace an existing one unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it.")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give a file path.")
    # checked before the work, not found out when the result is to be written; nothing is created
    # here, so that a run that fails leaves no empty folder behind (the writer makes the folders)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DinokitError(f"The folder {path.parent} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == path.parent else f"cannot be created in {existing}, which is"
        raise DinokitError(f"The folder {path.parent} {what} not writable; choose another output path.")
    return path


def write_metrics(
    output_dir: str | os.PathLike, metrics: dict, config: Any = None, name: str = "metrics.json",
    units: dict[str, str] | None = None,
) -> Path:
    """Write ``OUT/metrics.json``: the metrics, the config and the versions, atomically.

    ``units`` says which scale each score keeps (its protocol's: ``percent`` for accuracies and
    retrieval mAP as published, ``fraction`` for DAVIS J&F, Jaccard and Copydays mAP)."""
    out = dict(metrics)
    if units:
        out["units"] = dict(units)
    if config is not None:
        out["config"] = config
    out.setdefault("versions", versions())
    target = Path(output_dir) / name
    write_json(target, out)
    return target


def remove_run_files(folder: str | os.PathLike, names: Iterable[str], *, main: bool = True) -> list[Path]:
    """A fresh run in a folder an earlier run used (``--overwrite``): remove that run's files named
    ``names`` (file names or glob patterns such as ``checkpoint[0-9][0-9][0-9][0-9].pth``; only the
    files the command writes, never anything else in the folder) so that nothing of it passes for
    this one's. Call it after :func:`prepare_output_dir` and before the run writes anything (its
    config.json included): a run killed in between then leaves no old checkpoint beside its new
    config. Under torchrun only the main process removes (``main``), the others share the folder.
    Returns the files removed."""
    removed: list[Path] = []
    if not main:
        return removed
    folder = Path(folder)
    for name in names:
        for path in sorted(folder.glob(name)) if any(c in name for c in "*?[") else [folder / name]:
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def run_identity(config: dict[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """What makes a training run this run and not another: its config less the fields in ``ignore``
    (where the run is, how it runs now, how long it goes on). It is written into the run's
    config.json and into each checkpoint; :func:`check_run_identity` compares the two on --resume."""
    ignore = set(ignore)
    return json.loads(to_json({k: v for k, v in config.items() if k not in ignore}, indent=None))


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name saved -> current`` for each field on which two run identities differ."""
    return [
        f"{k} {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


def check_run_identity(checkpoint: str | os.PathLike, saved: dict[str, Any] | None,
                       current: dict[str, Any] | None, what: str = "its config.json") -> None:
    """Refuse to resume from ``checkpoint`` when its run identity ``saved`` is not ``current`` (the
    identity of ``what``: the folder's config.json, or the run the command line asks for), naming
    the fields that differ. An identity that is missing (an older folder) is not compared, nor a
    field only one of them has (one that an older or newer dinokit did not record)."""
    if not saved or not current:
        return
    common = set(saved) & set(current)
    diff = identity_differences({k: saved[k] for k in common}, {k: current[k] for k in common})
    if diff:
        raise DinokitError(
            f"{checkpoint} belongs to another run than {what} ({'; '.join(diff[:6])}"
            f"{'; ...' if len(diff) > 6 else ''}); start a new run with --overwrite or choose another --output."
        )


def merge_resume_config(
    saved: dict[str, Any],
    given: dict[str, Any],
    *,
    explicit: set[str] | None,
    always: Iterable[str] = (),
    run_control: Iterable[str] = (),
    keep_recipe: bool = False,
    fields: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The settings of a resumed run: the saved run's config with this command line on top.

    ``given`` is this invocation's config (every field, defaults included) and ``explicit`` the
    fields the user typed (None: unknown, as from the library). Fields in ``always`` come from
    ``given`` whatever was typed (where the run is, how it runs now); fields in ``run_control`` come
    from ``given`` when typed (or when ``explicit`` is None); any other typed field is the recipe:
    with ``keep_recipe`` a value that differs from the saved one is refused, else it replaces it.
    ``fields`` (default: every saved key) are the saved keys kept: a key the config no longer has
    is left out, and one the saved config lacks gets the config's default.
    """
    always, run_control = set(always), set(run_control)
    merged = {k: v for k, v in saved.items() if fields is None or k in set(fields)}
    for k, value in given.items():
        typed = explicit is None or k in explicit
        if k in always or (k in run_control and typed):
            merged[k] = value
        elif explicit is not None and k in explicit and k not in run_control:
            if not keep_recipe:
                merged[k] = value
            elif value != merged.get(k):
                opt = "--" + k.replace("_", "-")
                raise DinokitError(
                    f"{opt} {value} differs from the resumed run's {merged.get(k)}; a resumed run keeps its "
                    "recipe (leave the option out, or start a new run)."
                )
    return merged

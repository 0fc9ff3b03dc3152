"""File output: atomic writes, run folders and metrics files.

Every file dinokit writes goes through a temporary file in the same folder and an ``os.replace``,
so a run stopped at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import json
import logging
import os
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import DinokitError, FolderInUseError, OutputExistsError

try:
    import fcntl
except ImportError:  # Windows: takeovers of a stale lock are not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("dinokit")


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


#: how a cell that a spreadsheet would run as a formula begins (=, +, -, @, a tab, a carriage return);
#: an apostrophe is escaped too, so that reading back is exact
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def inert_cell(text: Any) -> str:
    """A text cell (a file name, a class, a sequence) for a CSV file that a spreadsheet shows and never
    runs: one that begins as a formula would gets the usual leading apostrophe (OWASP's advice against
    CSV injection); :func:`cell_text` reads it back as the text it was."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def cell_text(cell: str) -> str:
    """The text an :func:`inert_cell` was made from."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_STARTS) else cell


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
    """Create the run folder ``path`` and take its lock; refuse one that already holds files unless asked.

    ``overwrite`` allows writing into a non-empty folder (files are replaced one by one, caches that
    still match are reused); ``resume`` continues a run in its own folder. The folder is owned by
    this process from here on (:func:`lock_run_folder`): a second run into it is refused until this
    one ends (:func:`release_run_folders`, called when a command ends and when the process exits).
    Whether the folder holds results is checked again once the lock is held, so that of two runs
    started together into one new folder the second is refused, never written over the first.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"The output {path} is a file, not a folder; choose a folder path.")
    _refuse_results(path, overwrite or resume)  # before anything is created
    created = make_output_folder(path)
    try:
        lock_run_folder(path)
        _refuse_results(path, overwrite or resume)
    except BaseException:
        if created and not any(path.iterdir()):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return path


def check_run_folder(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """The refusals of :func:`prepare_output_dir` made without creating or taking anything: a file
    where the folder should be, results already there (unless ``overwrite`` or ``resume``), a folder
    another live run holds. A command calls this before its heavy imports so that these answers come
    at once; the folder itself is taken later by whatever writes it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"The output {path} is a file, not a folder; choose a folder path.")
    _refuse_results(path, overwrite or resume)
    holder = _read_holder(path / LOCK_NAME) if path.is_dir() and is_main_rank() else None
    if holder is not None and not _held_by_this_process(holder) and not holder.is_gone():
        raise FolderInUseError(_in_use_sentence(path, holder))
    return path


def check_training_folder(out: str | os.PathLike, checkpoint: str, noun: str, *, resume: bool, overwrite: bool,
                          main: bool = True) -> Path:  # fmt: skip
    """The refusals of a training run's folder (``run.TrainingRun`` makes them, and a command makes them
    again before its heavy imports): --resume with --overwrite; --resume with no ``checkpoint`` to
    continue; a fresh run into a folder holding a ``noun`` already; then :func:`check_run_folder`'s.
    ``main`` False (the other ranks of a torchrun job) makes only the first, which needs no disk."""
    out = Path(out)
    if resume and overwrite:
        raise DinokitError(f"--resume continues the run in {out} and --overwrite starts a new one there; "
                           "choose one.")  # fmt: skip
    if not main:
        return out
    if resume and not (out / checkpoint).is_file():
        raise DinokitError(f"There is no {noun} in {out} to resume (no {checkpoint}); start "
                           "it without --resume.")  # fmt: skip
    if not resume:
        refuse_earlier_run(out, checkpoint, noun, overwrite)
    return check_run_folder(out, overwrite, resume)


def refuse_earlier_run(out: str | os.PathLike, checkpoint: str, noun: str, overwrite: bool) -> None:
    """A fresh training run into a folder that holds one with its ``checkpoint``, without --overwrite."""
    if (Path(out) / checkpoint).is_file() and not overwrite:
        raise DinokitError(f"{out} already holds a {noun}; pass --resume to continue it or "
                           "--overwrite to start again.")  # fmt: skip


def _refuse_results(path: Path, allowed: bool) -> None:
    if not allowed and path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise OutputExistsError(
            f"The output folder {path} already holds results; pass --overwrite to write into it "
            "or choose another folder."
        )


def make_output_folder(path: Path) -> bool:
    """``mkdir -p`` with a failure told in one sentence (a read-only file system, no permission, a
    path too long); returns whether the folder was made here."""
    if path.is_dir():
        return False
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise OutputExistsError(
                f"The output {path} is a file, not a folder; choose a folder path."
            ) from None
        return False
    except OSError as e:
        raise DinokitError(
            f"The output folder {path} cannot be created ({_reason(e)}); choose another --output."
        ) from e
    return True


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).rstrip(".").lower() if e.strerror else str(e)


# -- the lock of a run folder --------------------------------------------------------------------------
#: the lock file a run keeps in its folder while it writes there
LOCK_NAME = ".dinokit.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder: the process, its machine and when it started (the lock file's content)."""

    pid: int
    host: str
    started: str  #: local time the run took the folder, for the message
    command: str = ""
    boot_id: str = ""  #: the machine's boot (a pid of an earlier boot is no process of this one)
    process_start: str = ""  #: the pid's start time in clock ticks since boot (tells a reused pid)

    @classmethod
    def this_process(cls) -> LockHolder:
        command = next((a for a in sys.argv[1:2] if not a.startswith("-")), "")
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"),
                   f"dinokit {command}".strip(), _boot_id(), _process_start(os.getpid()))  # fmt: skip

    def describe(self) -> str:
        what = f"{self.command}, " if self.command else ""
        return f"{what}pid {self.pid} on {self.host}, started {self.started}"

    def is_gone(self) -> bool:
        """True when the holder is known to have ended: a process of this machine that no longer runs
        (or whose pid now belongs to another process, or to an earlier boot). A holder on another
        machine cannot be seen from here and is never taken for gone."""
        if self.host != socket.gethostname():
            return False
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return True
        if self.pid == os.getpid():
            return not _held_by_this_process(self)  # a lock of this pid that this process does not hold
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        now = _process_start(self.pid)
        return bool(self.process_start and now and now != self.process_start)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """Field 22 of /proc/PID/stat (the start time in clock ticks since boot); '' where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else ""


def _read_holder(lock: Path) -> LockHolder | None:
    """The lock file's holder; None when there is no lock file. A file that cannot be parsed is an
    empty holder (pid 0), which a reader treats as held by someone unknown."""
    try:
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        d = json.loads(text)
        return LockHolder(int(d["pid"]), str(d["host"]), str(d.get("started", "")), str(d.get("command", "")),
                          str(d.get("boot_id", "")), str(d.get("process_start", "")))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return LockHolder(0, "", "")


#: the folders this process holds: resolved path -> [holder written, times taken]
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.Lock()


def _held_by_this_process(holder: LockHolder) -> bool:
    return any(entry[0] == holder for entry in _HELD.values())


def is_main_rank() -> bool:
    """Rank 0 of a torchrun job, or a process without a launcher (read from RANK, as runtime does)."""
    try:
        return int(os.environ.get("RANK", 0)) == 0
    except ValueError:
        return True


def lock_run_folder(folder: str | os.PathLike) -> Path | None:
    """Take the lock of the run folder ``folder`` for this process (under torchrun: for rank 0 only;
    the other ranks write into the folder their rank 0 holds). Returns the lock file, or None on
    the ranks that take none.

    The lock is a file created exclusively in the folder, naming this process, its machine and its
    start; a second process is refused in one sentence naming the first. A lock left by a process
    that has ended without removing it (SIGKILL, a crash, a lost machine that was rebooted) is taken
    over when its process is on this machine and no longer runs. Taking the same folder again in
    one process counts up; :func:`release_run_folder` counts down and removes the file at zero.
    A folder that cannot be written (read-only, no permission) is refused here, before any work."""
    if not is_main_rank():
        return None
    folder = Path(folder)
    key = folder.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return key / LOCK_NAME
        me = LockHolder.this_process()
        _create_lock(folder, me)
        _HELD[key] = [me, 1]
    return key / LOCK_NAME


def _create_lock(folder: Path, me: LockHolder) -> None:
    lock = folder / LOCK_NAME
    payload = json.dumps(dataclasses.asdict(me)).encode("utf-8")
    for _ in range(8):  # a stale lock taken over, then a new try; another process may be quicker
        try:
            _write_exclusively(lock, payload)
            return
        except FileExistsError:
            pass
        except OSError as e:
            raise DinokitError(
                f"The output folder {folder} is not writable ({_reason(e)}); choose another --output."
            ) from e
        holder = _read_holder(lock)
        if holder is None:
            continue  # released meanwhile
        if not holder.is_gone():
            raise FolderInUseError(_in_use_sentence(folder, holder))
        _take_over(lock, holder)
    raise FolderInUseError(
        f"The output folder {folder} is being taken by other runs at the same time; try again."
    )


def _write_exclusively(lock: Path, payload: bytes) -> None:
    """Create ``lock`` holding ``payload``, failing with FileExistsError when it exists. The content is
    written to a temporary file first and hard-linked into place (an exclusive creation, as O_EXCL, that
    no reader can see half-written); where the file system has no hard links, O_EXCL itself."""
    fd, tmp = tempfile.mkstemp(prefix=LOCK_NAME + ".", dir=lock.parent)
    try:
        os.fchmod(fd, 0o644 & ~_UMASK)  # readable by the other users who may try the folder
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over(lock: Path, stale: LockHolder) -> None:
    """Remove a lock whose holder has ended, unless it changed since it was read: takeovers of one
    folder are serialised by an advisory lock on the folder, so of two processes that found the same
    stale lock only one removes it (the other then finds the new holder's lock)."""
    try:
        fd = os.open(lock.parent, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        if _read_holder(lock) == stale:
            log.warning("taking over %s from %s, which no longer runs", lock, stale.describe())
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the advisory lock


def _in_use_sentence(folder: Path, holder: LockHolder) -> str:
    if not holder.pid:
        return (
            f"The output folder {folder} is locked by {folder / LOCK_NAME}, which names no process; if no "
            "run writes there, delete that file, or choose another --output."
        )
    if holder.host != socket.gethostname():
        return (
            f"The output folder {folder} is in use by another dinokit run ({holder.describe()}); wait for it "
            f"to end, or, if that run has ended, delete {folder / LOCK_NAME}, or choose another --output."
        )
    return (
        f"The output folder {folder} is in use by another dinokit run ({holder.describe()}); wait for it to "
        "end or choose another --output."
    )


def release_run_folder(folder: str | os.PathLike) -> None:
    """Give up one hold of ``folder``'s lock (see :func:`lock_run_folder`); the last removes the file."""
    key = Path(folder).resolve()
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        _remove_own_lock(key / LOCK_NAME, entry[0])


def held_run_folders() -> dict[Path, int]:
    """The run folders this process holds, with how many times each was taken (for
    :func:`release_run_folders`)."""
    with _HELD_GUARD:
        return {key: entry[1] for key, entry in _HELD.items()}


def release_run_folders(keep: dict[Path, int] | None = None) -> None:
    """Release the holds taken since ``keep`` (a :func:`held_run_folders` snapshot: a command run
    inside another, as the demo runs its steps, gives back its own folders and not the outer one's),
    or every hold without it (at exit)."""
    keep = keep or {}
    with _HELD_GUARD:
        gone = []
        for key, entry in list(_HELD.items()):
            entry[1] = min(entry[1], keep.get(key, 0))
            if entry[1] <= 0:
                gone.append((key, entry[0]))
                del _HELD[key]
    for key, holder in gone:
        _remove_own_lock(key / LOCK_NAME, holder)


def _remove_own_lock(lock: Path, holder: LockHolder) -> None:
    if _read_holder(lock) == holder:  # never another process's lock
        with contextlib.suppress(OSError):
            lock.unlink()


atexit.register(release_run_folders)


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[Path | None]:
    """The lock of ``folder`` held for the block (see :func:`lock_run_folder`)."""
    lock = lock_run_folder(folder)
    try:
        yield lock
    finally:
        if lock is not None:
            release_run_folder(folder)


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
    output_dir: str | os.PathLike,
    metrics: dict,
    config: Any = None,
    name: str = "metrics.json",
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


def check_run_identity(
    checkpoint: str | os.PathLike,
    saved: dict[str, Any] | None,
    current: dict[str, Any] | None,
    what: str = "its config.json",
) -> None:
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
    where: str = "the resumed run",
) -> dict[str, Any]:
    """The settings of a resumed run: the saved run's config with this command line on top.

    ``given`` is this invocation's config (every field, defaults included) and ``explicit`` the
    fields the user typed (None: as from the library, every field of ``given`` that is not None
    counts as asked for). Fields in ``always`` come from ``given`` whatever was typed (where the run
    is, how it runs now); fields in ``run_control`` come from ``given`` when typed; any other typed
    field is the recipe: with ``keep_recipe`` a value that differs from the saved one is refused
    (one sentence naming each such field), else it replaces it. ``fields`` (default: every saved
    key) are the saved keys kept: a key the config no longer has is left out, and one the saved
    config lacks gets the config's default.
    """
    always, run_control = set(always), set(run_control)
    merged = {k: v for k, v in saved.items() if fields is None or k in set(fields)}
    changed = []
    for k, value in given.items():
        typed = (value is not None) if explicit is None else k in explicit
        if k in always or (k in run_control and typed) or k not in merged:
            merged[k] = value
        elif typed and value != merged[k]:
            if not keep_recipe:
                merged[k] = value
            else:
                changed.append(f"--{k.replace('_', '-')} {merged[k]} -> {value}")
    if changed:
        raise DinokitError(
            f"--resume continues {where} with its own recipe, which this command line changes "
            f"({'; '.join(changed)}); leave those options out, or start a new run with --overwrite or another "
            "--output."
        )
    return merged

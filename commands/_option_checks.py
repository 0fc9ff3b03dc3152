"""Checks of the command line itself, before any work: one option given twice with two values, and
option values longer than a path can be. Each ends in one sentence (exit 2)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from dinokit.errors import DinokitError

#: the longest file name (one path component) and the longest path the usual file systems take
NAME_MAX = 255
PATH_MAX = 4096
#: text options that name files (the Path-typed ones are known by their type)
PATH_LIKE = frozenset({"weights", "linear_weights", "model"})


def _option_names(command, renamed: dict[str, str], reference: dict[str, str]) -> dict[str, Any]:
    """Every spelling of every option of ``command`` (its own, the renamed ones, the reference's and
    the underscore forms), mapped to the option."""
    names: dict[str, Any] = {}
    for p in command.params:
        for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())):
            names[o] = p
    for old, new in {**renamed, **reference}.items():
        if new in names and old not in names:
            names[old] = names[new]
    return names


def refuse_repeated_options(
    command, args: list[str], renamed: dict[str, str], reference: dict[str, str]
) -> None:
    """Refuse an option given twice with different values (``--pretrained_weights a.pth --weights
    random``: which one would run?); the same value twice is harmless. Options that take a list
    (``multiple``) and counters are left alone."""
    names = _option_names(command, renamed, reference)
    seen: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        name, eq, value = arg.partition("=")
        param = names.get(name) or names.get(name.replace("_", "-"))
        if param is None or getattr(param, "multiple", False) or getattr(param, "count", False):
            continue
        if getattr(param, "is_flag", False):
            value = "off" if name in getattr(param, "secondary_opts", ()) else "on"
        elif not eq:
            n = max(1, getattr(param, "nargs", 1) or 1)
            value = " ".join(args[i : i + n])
            i += n
        seen.setdefault(param.name, (param, []))[1].append((name, value))
    for param, given in seen.values():
        if len({v for _, v in given}) > 1:
            spelled = ", ".join(n if getattr(param, "is_flag", False) else f"{n} {v}" for n, v in given)
            main = max(param.opts, key=len)
            raise DinokitError(
                f"{main} was given {len(given)} times with different values ({spelled}); give it once."
            )


def refuse_overlong_values(ctx) -> None:
    """Refuse an option value no file system takes as a path (a file name over 255 characters, a path
    over 4096), before anything touches the disk (the system would answer 'file name too long')."""
    for param in ctx.command.params:
        values = ctx.params.get(param.name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, (str, os.PathLike)):
                continue
            text = os.fspath(value)
            name = max(getattr(param, "opts", None) or [param.name], key=len)
            if len(text) > PATH_MAX:
                raise DinokitError(f"{name} is {len(text)} characters long, longer than any path ({PATH_MAX} "
                                   "characters at most); check the value.")  # fmt: skip
            path_like = isinstance(value, os.PathLike) or param.name in PATH_LIKE
            longest = max((len(part) for part in Path(text).parts), default=0)
            if path_like and longest > NAME_MAX:
                raise DinokitError(f"{name} holds a name of {longest} characters, longer than a file name can be "
                                   f"({NAME_MAX} at most); check the value.")  # fmt: skip


#: file-system refusals a user can meet and act on
_FILE_SYSTEM_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EMLINK}


def file_system_refusal(e: OSError) -> str | None:
    """One sentence for an OSError the file system raised on a path (None for any other error): the
    last net under the checks made before the work (a disk that fills up mid-run, say)."""
    if e.errno not in _FILE_SYSTEM_ERRORS:
        return None
    name = e.filename if e.filename is not None else ""
    where = f"{str(name)[:200]}{'...' if len(str(name)) > 200 else ''}" if name else "a file"
    return f"cannot write {where}: {(e.strerror or str(e)).rstrip('.')}."


def refuse_unknown_weights(ctx) -> None:
    """Refuse a ``--weights`` that names nothing loadable (a missing file, a misspelt preset) at once,
    with the sentence the loader would say after its imports."""
    from dinokit.errors import CheckpointError
    from dinokit.presets import unknown_weights

    weights = ctx.params.get("weights")
    if isinstance(weights, str) and (sentence := unknown_weights(weights)) is not None:
        raise CheckpointError(sentence)


def require_weights(weights: str | None, purpose: str = "") -> None:
    """A command that embeds images refuses a missing ``--weights`` before its heavy imports, with the
    sentence the backbone loader would say."""
    if weights is None:
        from dinokit.errors import CheckpointError
        from dinokit.presets import weights_needed

        raise CheckpointError(weights_needed(purpose))


def require_inputs(*inputs: tuple[str, str | os.PathLike | None]) -> None:
    """Input paths that do not exist, refused before the command's heavy imports in the words the
    readers use: ``("data folder", path)`` -> "The data folder PATH does not exist."; None is skipped."""
    from dinokit.errors import DataError

    for what, path in inputs:
        if path is not None and not Path(path).expanduser().exists():
            raise DataError(f"The {what} {Path(path).expanduser()} does not exist.")

"""The command-line surface stays as committed: every command and subcommand, its options with their
names, short aliases, types, defaults and flags, and the earlier and reference option names that are
rewritten to dinokit's. A change here is a change users see.

A deliberate change (a new option, a new command) is recorded by regenerating the snapshot::

    .venv/bin/python -m tests.cli.test_cli_surface
"""

from __future__ import annotations

import enum
import json
import os
import re
from pathlib import Path

from dinokit.commands import _options, app
from typer.main import get_command

SNAPSHOT = Path(__file__).resolve().parents[1] / "assets" / "cli_surface.json"


def _plain(value):
    """A JSON-safe spelling of a default (paths and enums as text, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(value):
        return "<callable>"
    return repr(value)


def _type_name(annotation) -> str:
    """``int``, ``pathlib.Path | None``, ``list[str]``: an annotation as readable text."""
    if isinstance(annotation, type):
        return (
            annotation.__name__
            if annotation.__module__ == "builtins"
            else f"{annotation.__module__}.{annotation.__qualname__}"
        )
    return re.sub(r"<class '([\w.]+)'>", r"\1", str(annotation)).replace("typing.", "")


def _param(param) -> dict:
    descriptor = getattr(param, "type_descriptor", None)
    entry = {
        "name": param.name,
        "kind": param.param_type_name,
        "opts": list(param.opts),
        "secondary_opts": list(param.secondary_opts),
        "type": _type_name(descriptor.annotation) if descriptor is not None else None,
        "min": _plain(getattr(param, "min", None)),
        "max": _plain(getattr(param, "max", None)),
        "required": param.required,
        "nargs": param.nargs,
        "multiple": param.multiple,
        "default": _plain(param.default),
        "hidden": getattr(param, "hidden", False),
    }
    for flag in ("is_flag", "count", "is_eager"):
        entry[flag] = getattr(param, flag, False)
    entry["panel"] = getattr(param, "rich_help_panel", None)
    return entry


def _command(cmd) -> dict:
    entry: dict = {"params": [_param(p) for p in cmd.params]}
    if hasattr(cmd, "commands"):
        entry["commands"] = {name: _command(sub) for name, sub in sorted(cmd.commands.items())}
    return entry


def cli_surface() -> dict:
    """Every command of the live CLI with its options, and the option names rewritten to dinokit's."""
    return {
        "dinokit": _command(get_command(app)),
        "renamed_options": _options.RENAMED_OPTIONS,
        "reference_options": _options.REFERENCE_OPTIONS,
    }


def test_cli_surface_matches_the_committed_snapshot():
    committed = json.loads(SNAPSHOT.read_text())
    live = json.loads(json.dumps(cli_surface()))
    assert live == committed, "the CLI changed; if on purpose: .venv/bin/python -m tests.cli.test_cli_surface"


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(cli_surface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")

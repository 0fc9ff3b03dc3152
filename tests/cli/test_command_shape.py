"""How commands are written: options declared, one config built from them by name
(``_options.config_from``), "which options did the user give" answered by one function
(``_runs.typed_options``), and command functions short enough to read at once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
import typer
from dinokit.commands import _options, _runs, app
from typer.main import get_command
from typer.testing import CliRunner

COMMANDS_DIR = Path(_options.__file__).parent


# -- config_from ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Config:
    data: str
    k: int = 5
    seed: int = 0
    derived: float = 0.0
    hidden: int = dataclasses.field(default=7, init=False)


def test_config_from_takes_the_fields_by_name_and_leaves_the_rest():
    options = {"data": "imgs", "k": 3, "quiet": True, "hidden": 99, "derived": 1.0}
    cfg = _options.config_from(_Config, options, derived=2.5)
    assert cfg == _Config(data="imgs", k=3, seed=0, derived=2.5)  # derived: the given value wins
    assert cfg.hidden == 7  # a field the constructor does not take is never set from an option


def test_config_from_refuses_a_value_for_no_field():
    with pytest.raises(TypeError, match="no field kk"):
        _options.config_from(_Config, {"data": "x"}, kk=1)


def test_no_command_retypes_its_options_into_a_config():
    """No config (a class) is built in a command module from more than five options passed on as
    ``name=name``: a config is built with config_from, so a new option reaches its config by having the
    field's name. (Calls of library functions with keyword arguments are their signatures, and stay.)"""
    offenders = []
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            callee = (
                node.func.attr
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                else (node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else "")
            )
            if callee[:1].isupper():
                same = [k.arg for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id == k.arg]
                if len(same) > 5:
                    offenders.append(f"{path.name}:{node.lineno} ({len(same)} name=name arguments)")
    assert offenders == []


# -- command functions fit on a screen --------------------------------------------------------------
#: the lines a command function's code may take after its docstring (its option declarations aside)
MAX_BODY_LINES = 60


def _registered_callbacks():
    def walk(group):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command)
            elif command.callback is not None:
                yield name, inspect.unwrap(command.callback)

    yield from walk(get_command(app))


def test_command_functions_fit_on_a_screen():
    long = []
    for name, fn in _registered_callbacks():
        func = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
        has_doc = isinstance(func.body[0], ast.Expr) and isinstance(func.body[0].value, ast.Constant)
        body = func.body[1:] if has_doc else func.body
        lines = func.end_lineno - body[0].lineno + 1 if body else 0
        if lines > MAX_BODY_LINES:
            long.append(f"{name}: {lines} lines")
    assert long == [], f"move the report or the checks into helpers of the module: {long}"


# -- typed_options ---------------------------------------------------------------------------------
def _probe_app(seen: dict):
    probe = typer.Typer()

    @probe.command()
    def run(
        ctx: typer.Context,
        lr: float = typer.Option(0.1, "--lr"),
        epochs: int = typer.Option(10, "--epochs", envvar="PROBE_EPOCHS"),
        seed: int = typer.Option(0, "--seed"),
        batch: int = typer.Option(8, "--batch"),
    ) -> None:
        seen["typed"] = _runs.typed_options(ctx)

    @probe.callback()
    def root() -> None:
        """(a group, so that the command is invoked by name)"""

    return probe


def test_typed_options_are_the_command_line_and_environment_variables_never_defaults():
    seen: dict = {}
    probe = _probe_app(seen)
    r = CliRunner().invoke(probe, ["run", "--lr", "0.1", "--seed=3"], env={"PROBE_EPOCHS": "4"},
                           default_map={"run": {"batch": 16}})  # fmt: skip
    assert r.exit_code == 0, r.output
    # --lr given with its default value still counts: the user chose it; --batch from the default map does not
    assert seen["typed"] == {"lr", "seed", "epochs"}
    r = CliRunner().invoke(probe, ["run"])
    assert r.exit_code == 0 and seen["typed"] == set()


def test_typed_options_is_the_only_answer_in_the_commands():
    """ "Which options did the user give" is asked of _runs.typed_options everywhere, never re-derived."""
    users = [p.name for p in COMMANDS_DIR.glob("*.py") if "get_parameter_source" in p.read_text()]
    assert users == ["_runs.py"]

"""Start-up: `dinokit --help`, `--version`, every command's `--help` and the refusals that need no model
(an existing output, a missing --weights, an unknown preset, a folder another run holds) answer
without importing torch or the other heavy libraries. The commands are taken from the live CLI, so a
new command that imports torch at its module's top, or refuses its output only after its imports,
fails here.

Each case runs in a fresh interpreter and reads ``sys.modules`` after the command ended."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from dinokit.commands import app
from typer.main import get_command

#: the libraries that take seconds to import, and are loaded only when the work starts
HEAVY = ("torch", "torchvision", "numpy", "PIL", "sklearn", "scipy", "skimage", "timm", "cv2")

_RUNNER = """
import json, sys
from dinokit.commands import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.__stdout__)
""".replace("HEAVY", repr(HEAVY))


def run_cli(*args: str, cwd: Path | None = None) -> tuple[int, list[str], str]:
    """Run ``dinokit ARGS`` in a fresh interpreter: its exit code, the heavy libraries it imported, its
    stderr."""
    env = {**os.environ, "COLUMNS": "100"}
    r = subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], capture_output=True, text=True,
                       timeout=120, cwd=cwd, env=env)  # fmt: skip
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return report["code"], report["heavy"], r.stderr


def _commands(group=None, prefix=()):
    group = group or get_command(app)
    for name, command in group.commands.items():
        if hasattr(group, "commands") and hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


COMMANDS = dict(_commands())


def test_every_command_is_covered():
    """The list below is the live CLI's, not a copy: the training, evaluation and data commands are in it."""
    names = {" ".join(path) for path in COMMANDS}
    assert {"pretrain", "knn", "features", "duplicates", "synth classify"} <= names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["synth", "--help"]], ids=" ".join)
def test_root_help_and_version_import_no_torch(args):
    code, heavy, err = run_cli(*args)
    assert code == 0, err
    assert heavy == []


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_command_help_imports_no_torch(path):
    code, heavy, err = run_cli(*path, "--help")
    assert code == 0, err
    assert heavy == [], (
        f"dinokit {' '.join(path)} --help imported {heavy}: keep them inside the command's body"
    )


#: values for required options that are not paths
_VALUES = {"weights": "random", "dataset": "roxford5k"}
#: optional inputs some commands check before their output (given, so that the output is what is refused)
_INPUTS = {"data", "train", "val"}


def _takes_a_path(command, name: str) -> bool:
    hints = typing.get_type_hints(inspect.unwrap(command.callback), include_extras=True)
    return "Path" in str(hints.get(name, ""))


def _args_with_output(path, command, output: Path, inputs: Path) -> list[str]:
    args = [*path]
    for p in command.params:
        if p.name == "output":
            args += ["--output", str(output)]
        elif p.name == "weights":
            args += ["--weights", "random"]
        elif p.required or (
            p.name in _INPUTS and p.param_type_name == "option" and _takes_a_path(command, p.name)
        ):
            value = _VALUES.get(p.name, str(inputs))
            args += [max(p.opts, key=len), value] if p.param_type_name == "option" else [value]
    return args


WRITERS = [path for path, c in COMMANDS.items() if {"output", "overwrite"} <= {p.name for p in c.params}]


@pytest.mark.parametrize("path", WRITERS, ids=" ".join)
def test_refusal_of_an_existing_output_imports_no_torch(path, tmp_path):
    """Every command that writes an --output refuses one holding results (without --overwrite) at once.
    The output is tried as a folder of results, then as an existing file (for the commands whose
    output is one file)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("metrics.json", "features.pt", "checkpoint.pth"):
        (folder / name).write_text("{}")
    existing_file = tmp_path / "results.json"
    existing_file.write_text("{}")
    messages = []
    for output in (folder, existing_file):
        before = sorted(p.name for p in folder.iterdir())
        code, heavy, err = run_cli(*_args_with_output(path, COMMANDS[path], output, inputs), cwd=tmp_path)
        messages.append(err.strip())
        if code == 2 and "--overwrite" in err:
            assert heavy == [], f"dinokit {' '.join(path)} refused its output only after importing {heavy}"
            assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, no lock left
            return
    pytest.fail(f"dinokit {' '.join(path)} did not refuse an existing output: {messages}")


@pytest.mark.parametrize("command", ["duplicates", "similar", "features", "copydetect", "retrieval"])
def test_missing_weights_is_refused_without_torch(command, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args = [a for a in _args_with_output((command,), COMMANDS[(command,)], tmp_path / "new", inputs)]
    i = args.index("--weights")
    del args[i : i + 2]
    code, heavy, err = run_cli(*args, cwd=tmp_path)
    assert code == 2 and "Give --weights" in err, err
    assert heavy == []
    assert not (tmp_path / "new").exists()


def test_unknown_preset_and_missing_weights_file_are_refused_without_torch(tmp_path):
    (tmp_path / "photos").mkdir()
    code, heavy, err = run_cli(
        "duplicates", tmp_path / "photos", "-o", tmp_path / "out", "--weights", "dino_vits61"
    )
    assert code == 2 and "Unknown weights 'dino_vits61'" in err, err
    assert heavy == []
    code, heavy, err = run_cli("knn", "-o", tmp_path / "out", "--train", tmp_path / "photos", "--val",
                               tmp_path / "photos", "--weights", tmp_path / "gone.pth")  # fmt: skip
    assert code == 2 and "does not exist" in err, err
    assert heavy == []
    assert not (tmp_path / "out").exists()


def test_a_folder_another_run_holds_is_refused_without_torch(tmp_path):
    """The lock of a live process (this test's own interpreter) is seen before any heavy import."""
    from dinokit.io import lock_run_folder, release_run_folder

    out = tmp_path / "run"
    out.mkdir()
    lock_run_folder(out)
    try:
        for args in (["knn", "--train", tmp_path, "--val", tmp_path, "--weights", "random"],
                     ["pretrain", "--data", tmp_path, "--overwrite"]):  # fmt: skip
            code, heavy, err = run_cli(*args, "-o", out, cwd=tmp_path)
            assert code == 2 and "in use by another dinokit run" in err, err
            assert heavy == []
    finally:
        release_run_folder(out)


def test_davis_run_marker_is_the_library_s():
    """commands/davis.py names the davis run's marker file without importing the run's module."""
    from dinokit.commands import davis

    from dinokit.eval import davis_run

    assert davis.RUN_MARKER == davis_run.RUN_MARKER


def test_training_commands_name_their_runs_as_the_recipes_do():
    """The early refusals of the training commands speak of the run as run.TrainingRun does."""
    from dinokit.commands._runs import RUN_CHECKPOINT, RUN_NOUNS

    from dinokit.eval.linear import LINEAR_RUN
    from dinokit.eval.segmentation import SEGMENT_RUN
    from dinokit.train.finetune import FINETUNE_RUN
    from dinokit.train.pretrain import PRETRAIN_RUN

    for kind in (PRETRAIN_RUN, FINETUNE_RUN, LINEAR_RUN, SEGMENT_RUN):
        assert RUN_NOUNS[kind.command] == kind.noun
        assert kind.checkpoint == RUN_CHECKPOINT


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["pretrain", "--data", "{tmp}/nowhere"], "The data folder {tmp}/nowhere does not exist."),
        (
            ["knn", "--train", "{tmp}/nowhere", "--val", "{tmp}", "--weights", "random"],
            "The folder {tmp}/nowhere does not exist.",
        ),
        (
            ["features", "--data", "{tmp}/nowhere", "--weights", "random"],
            "The folder {tmp}/nowhere does not exist.",
        ),
        (["duplicates", "{tmp}/nowhere", "--weights", "random"], "The folder {tmp}/nowhere does not exist."),
        (
            ["similar", "{tmp}", "--against", "{tmp}/nowhere", "--weights", "random"],
            "The folder given with --against {tmp}/nowhere does not exist.",
        ),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_an_input_that_does_not_exist_is_refused_without_torch(args, sentence, tmp_path):
    """A mistyped input folder is said at once, in the readers' words, and no output folder is made."""
    code, heavy, err = run_cli(*[a.format(tmp=tmp_path) for a in args], "-o", tmp_path / "out", cwd=tmp_path)
    assert code == 2 and sentence.format(tmp=tmp_path) in " ".join(err.split()), err
    assert heavy == []
    assert not (tmp_path / "out").exists()

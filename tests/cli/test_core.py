"""The CLI frame: help and version, `dinokit info`, and user errors as one sentence with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import typer
from dinokit.commands import app, main

import dinokit
from dinokit.errors import DataError, DinokitError
from tests.helpers import run_cli


def _all_command_paths() -> list[list[str]]:
    """Every command registered right now, as the argument lists that reach it (groups included)."""
    paths: list[list[str]] = []

    def walk(cmd, prefix: list[str]) -> None:
        # a group by shape: typer builds on its own copy of click, so no isinstance against click.Group
        if isinstance(getattr(cmd, "commands", None), dict):
            for name, sub in cmd.commands.items():
                paths.append(prefix + [name])
                walk(sub, prefix + [name])

    walk(typer.main.get_command(app), [])
    return paths


def test_root_help_and_version():
    result = run_cli(["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "info" in result.output and "--version" in result.output
    assert "<bool>" not in result.output
    result = run_cli(["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dinokit {dinokit.__version__}"


def test_every_registered_command_renders_its_help():
    paths = _all_command_paths()
    assert ["info"] in paths
    for path in paths:
        result = run_cli([*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output, path
        assert "Traceback" not in result.output, path


def test_info_prints_versions_devices_threads_and_bf16():
    result = run_cli(["info"])
    assert result.exit_code == 0, result.output
    for word in ("dinokit", "torch", "torch_threads", "cpu_native_bf16", "default_device"):
        assert word in result.output
    result = run_cli(["info", "--json"])
    data = json.loads(result.stdout)
    assert data["dinokit"] == dinokit.__version__ and data["torch_threads"] >= 1
    assert isinstance(data["cpu_native_bf16"], bool) and isinstance(data["cuda_devices"], list)


@pytest.fixture
def failing_commands():
    """Commands that fail the ways a user can make them fail, registered for one test only."""

    def user_error():
        raise DataError("The folder /data/x holds no images [png, jpg]")

    def missing_file():
        open("/definitely/not/here.png")

    def interrupted():
        raise KeyboardInterrupt

    before = list(app.registered_commands)
    app.command("fail-user-error")(user_error)
    app.command("fail-missing-file")(missing_file)
    app.command("fail-interrupted")(interrupted)
    yield
    app.registered_commands[:] = before


def test_a_user_error_is_one_sentence_and_exit_code_2(failing_commands):
    result = run_cli(["fail-user-error"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: The folder /data/x holds no images [png, jpg]."
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = run_cli(["fail-missing-file"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: cannot use /definitely/not/here.png: No such file or directory."


def test_interrupt_exits_130_through_main(failing_commands, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fail-interrupted"])
    assert e.value.code == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    assert "Traceback" not in capsys.readouterr().err


def run_in_subprocess(args: list[str], code: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "DINOKIT_OFFLINE": "1"}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "dinokit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, **kw)


@pytest.mark.slow
def test_python_dash_m_dinokit_help():
    result = run_in_subprocess(["--help"])
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "info" in result.stdout


@pytest.mark.slow
def test_console_script_version():
    exe = shutil.which("dinokit")
    if exe is None:
        pytest.skip("the dinokit console script is not installed")
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"dinokit {dinokit.__version__}"


@pytest.mark.slow
def test_a_user_error_in_a_subprocess_of_python_dash_m_dinokit():
    # python -m dinokit, with one command added that fails as a user's bad input would
    code = textwrap.dedent(
        """
        import runpy, sys
        from dinokit.commands import app
        from dinokit.checkpoints import load_backbone

        @app.command("load")
        def load(weights: str):
            load_backbone(weights)

        sys.argv = ["dinokit", *sys.argv[1:]]
        runpy.run_module("dinokit", run_name="__main__", alter_sys=True)
        """
    )
    result = run_in_subprocess(
        ["load", "dino_vits16"], code=code
    )  # offline, not cached: says where to put the file
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: The preset 'dino_vits16' is not in the cache")
    assert "hub/checkpoints/dino_deitsmall16_pretrain.pth" in lines[0].replace(os.sep, "/")


def test_dinokit_error_is_the_base_of_the_user_errors():
    assert issubclass(DataError, DinokitError) and DinokitError.exit_code == 2

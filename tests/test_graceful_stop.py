"""The graceful stop: a real signal sets the flag, a second one raises, the exit code is 128 + signum;
and the run-folder helpers that training and the linear probe share."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dinokit.errors import DinokitError
from dinokit.io import merge_resume_config, remove_run_files
from dinokit.runtime import (
    GracefulStop,
    agreed_stop_signal,
    ensure_finite_loss,
    max_over_ranks,
    signal_exit_code,
)


def send(signum: int, stop: GracefulStop | None = None) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(200):  # the handler runs in the main thread at the next bytecode boundary
        if stop is None or stop.requested:
            return
        time.sleep(0.005)


def test_sigterm_sets_the_flag_and_the_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested and agreed_stop_signal(stop) == 0
        send(signal.SIGTERM, stop)
        assert stop.requested and stop.signum == signal.SIGTERM
        assert stop.exit_code == 143 == 128 + signal.SIGTERM
        assert agreed_stop_signal(stop) == signal.SIGTERM  # one process: its own signal
    assert signal.getsignal(signal.SIGTERM) is before  # the old handler is back


def test_ctrl_c_is_130():
    with GracefulStop() as stop:
        send(signal.SIGINT, stop)
        assert stop.signum == signal.SIGINT and stop.exit_code == 130


def test_a_second_signal_raises():
    with pytest.raises(KeyboardInterrupt), GracefulStop() as stop:
        send(signal.SIGTERM, stop)
        assert stop.requested
        send(signal.SIGTERM)
        time.sleep(0.5)  # not reached: the handler raises at the next bytecode boundary


def test_exit_codes():
    assert signal_exit_code(None) == 0 and signal_exit_code(0) == 0
    assert signal_exit_code(signal.SIGTERM) == 143 and signal_exit_code(signal.SIGINT) == 130
    assert max_over_ranks([0, 15.0]) == [0.0, 15.0]


def test_finite_loss_check():
    ensure_finite_loss(1.5, "never {loss}")
    with pytest.raises(DinokitError, match="became nan at step 3"):
        ensure_finite_loss(float("nan"), "The loss became {loss} at step 3")
    with pytest.raises(DinokitError, match="became inf"):
        ensure_finite_loss(float("inf"), "The loss became {loss}")
    with pytest.raises(DinokitError, match="became 2.0"):  # another rank's loss was not finite
        ensure_finite_loss(2.0, "The loss became {loss}", elsewhere=True)


def test_remove_run_files_only_on_the_main_process(tmp_path):
    (tmp_path / "log.jsonl").write_text("old\n")
    (tmp_path / "mine.txt").write_text("a user's file")
    remove_run_files(tmp_path, ["log.jsonl", "metrics.json"], main=False)
    assert (tmp_path / "log.jsonl").is_file()
    remove_run_files(tmp_path, ["log.jsonl", "metrics.json"])
    assert not (tmp_path / "log.jsonl").exists() and (tmp_path / "mine.txt").is_file()


def test_merge_resume_config_keeps_or_refuses_the_recipe():
    saved = {"lr": 0.1, "epochs": 10, "output": "a", "device": "cpu", "gone": 1}
    given = {"lr": 0.5, "epochs": 20, "output": "b", "device": "cuda"}
    # typed recipe options replace the saved ones; `always` fields come from the command line
    merged = merge_resume_config(saved, given, explicit={"lr"}, always={"output"})
    assert merged == {"lr": 0.5, "epochs": 10, "output": "b", "device": "cpu", "gone": 1}
    # run-control fields only when typed; fields outside the config are dropped
    merged = merge_resume_config(
        saved, given, explicit={"device"}, run_control={"device", "epochs"}, keep_recipe=True, fields=given
    )
    assert merged == {"lr": 0.1, "epochs": 10, "output": "a", "device": "cuda"}
    # from the library (nothing known about typing): every field given (not None) is asked for, so
    # run-control fields come from `given` and a recipe that differs is refused
    merged = merge_resume_config(
        saved,
        {**given, "lr": None},
        explicit=None,
        run_control={"device", "epochs"},
        always={"output"},
        keep_recipe=True,
    )
    assert (merged["lr"], merged["epochs"], merged["device"]) == (0.1, 20, "cuda")
    with pytest.raises(DinokitError, match=r"changes \(--lr 0.1 -> 0.5\)"):
        merge_resume_config(
            saved, given, explicit=None, run_control={"device", "epochs"}, always={"output"}, keep_recipe=True
        )
    with pytest.raises(DinokitError, match=r"changes \(--lr 0.1 -> 0.5; --epochs 10 -> 20\)"):
        merge_resume_config(saved, given, explicit={"lr", "epochs"}, keep_recipe=True)

"""The run skeleton every training command shares (dinokit/run.py): --resume, --stop-after and
--overwrite mean one thing in pretrain, finetune and linear; the thread plan belongs to the run, so
a run resumed on a busier machine is bitwise the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dinokit.runtime
from tests.helpers import load_state, make_image, run_cli

#: small, yet large enough that 1 and 2 threads sum in other orders (measured: 6.7e-9 apart after 2 epochs)
TINY_PRETRAIN = [
    "--arch", "vit_tiny", "--depth", "1", "--batch-size", "4", "--out-dim", "64", "--local-crops", "1",
    "--global-size", "48", "--local-size", "16", "--precision", "fp32", "--num-workers", "0", "--quiet",
    "--device", "cpu", "--epochs", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eight")
    for i in range(8):
        make_image(root / f"{i}.png", size=(40, 36), seed=i)
    return root


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _free_cores(monkeypatch, n: float) -> None:
    """The machine as the thread plan sees it: ``n`` cores left idle by other programs."""
    monkeypatch.setattr(dinokit.runtime.cpu, "available_cores", lambda: 2)
    monkeypatch.setattr(dinokit.runtime.cpu, "free_cores", lambda probe_seconds=0.2: n)


def _same(a: Path, b: Path) -> None:
    sa, sb = load_state(a / "checkpoint.pth"), load_state(b / "checkpoint.pth")
    for part in ("student", "teacher"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k}"


@pytest.mark.parametrize("threads", [["--threads", "2"], []], ids=["--threads 2", "from the free cores"])
def test_a_run_resumed_on_a_busier_machine_keeps_its_thread_plan_and_its_bits(
    eight_images, tmp_path, monkeypatch, two_threads, threads
):
    """Reproduction 2: the run started with 2 threads (given, or because 2 cores were free) is
    resumed when one core is free; it goes on with 2 threads and ends bitwise as the uninterrupted run."""
    base = ["pretrain", "--data", eight_images, *TINY_PRETRAIN, *threads]
    _free_cores(monkeypatch, 2.0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli([*base, "--output", straight]).exit_code == 0
    r = run_cli([*base, "--output", split, "--stop-after", "1"])
    assert r.exit_code == 0, r.output
    plan = json.loads((split / "config.json").read_text())["cpu_plan"]
    assert plan["threads"] == 2
    _free_cores(monkeypatch, 0.6)  # busier now: a fresh plan would take 1 thread
    assert dinokit.runtime.plan_cpu(None, 0, torch.device("cpu")).threads == 1
    r = run_cli(["pretrain", "--output", split, "--resume", "--quiet"])
    assert r.exit_code == 0, r.output
    resumed = json.loads((split / "metrics.json").read_text())["cpu_plan"]
    assert resumed["threads"] == 2 and resumed["chosen_by"] == "the run's plan"
    _same(straight, split)


def test_threads_asked_anew_on_resume_are_used_with_a_warning(eight_images, tmp_path, two_threads):
    run = tmp_path / "run"
    assert run_cli(["pretrain", "--data", eight_images, *TINY_PRETRAIN, "--threads", "2", "--output", run,
                    "--stop-after", "1"]).exit_code == 0  # fmt: skip
    r = run_cli(["pretrain", "--output", run, "--resume", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "metrics.json").read_text())["cpu_plan"]["threads"] == 1
    assert "may differ from an uninterrupted run" in r.output


# -- one meaning of --resume, --stop-after and --overwrite ----------------------------------------------
def _finetune(weights, data, out, *extra):
    return ["finetune", "--weights", weights, "--train", data / "train", "--val", data / "val", "--output", out,
            "--epochs", "3", "--batch-size", "4", "--image-size", "32", "--num-workers", "0", "--precision", "fp32",
            "--device", "cpu", "--warmup-epochs", "1", "--quiet", *extra]  # fmt: skip


def _linear(feature_files, out, *extra):
    return ["linear", "--train-features", feature_files[0], "--val-features", feature_files[1], "--output", out,
            "--epochs", "3", "--batch-size", "16", "--lr", "1", "--device", "cpu", "--quiet", *extra]  # fmt: skip


def test_resume_where_there_is_no_run_is_refused_by_every_training_command(
    tmp_path, feature_files, tiny2_weights, labelled_folder, pretrain_images
):
    """Reproduction 9: linear --resume into a folder with no run used to train from scratch."""
    empty = tmp_path / "empty"
    empty.mkdir()
    commands = {
        "linear probe run": _linear(feature_files, empty, "--resume"),
        "fine-tuning run": _finetune(tiny2_weights, labelled_folder, empty, "--resume"),
        "pretraining run": ["pretrain", "--data", pretrain_images, "--output", empty, "--resume", "--quiet"],
    }
    for noun, args in commands.items():
        r = run_cli(args)
        assert r.exit_code == 2, r.output
        assert (
            f"There is no {noun} in {empty} to resume (no checkpoint.pth); start it without --resume."
            in r.text
        )
        assert not list(empty.iterdir())  # nothing trained, nothing written
    r = run_cli(_linear(feature_files, tmp_path / "lin", "--resume", "--overwrite"))
    assert r.exit_code == 2 and "choose one" in r.text, r.output


def test_stop_after_counts_epochs_of_the_schedule_from_the_runs_start(
    tmp_path, feature_files, tiny2_weights, labelled_folder
):
    """Reproduction 9: --stop-after N ends when N epochs of the schedule are done, also after a resume,
    in linear (which had no --stop-after) and finetune (which counted from the resumed epoch)."""
    runs = {
        "linear": (tmp_path / "lin", lambda *e: _linear(feature_files, tmp_path / "lin", *e)),
        "finetune": (
            tmp_path / "ft",
            lambda *e: _finetune(tiny2_weights, labelled_folder, tmp_path / "ft", *e),
        ),
    }
    for name, (out, args) in runs.items():
        r = run_cli(args("--stop-after", "1"))
        assert r.exit_code == 0 and "Stopped after epoch 1 of 3 (--stop-after)" in r.text, r.output
        assert f"Resume with: dinokit {name} --output {out} --resume" in r.text
        r = run_cli([name, "--output", out, "--resume", "--stop-after", "2", "--quiet"])
        assert r.exit_code == 0 and "Stopped after epoch 2 of 3" in r.text, r.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["finished"], metrics["epochs_done"]) == (False, 2), name
        r = run_cli([name, "--output", out, "--resume", "--stop-after", "2", "--quiet"])  # already there
        assert r.exit_code == 0 and "Stopped after epoch 2 of 3" in r.text, r.output
        assert len((out / "log.jsonl").read_text().splitlines()) == 2
        r = run_cli([name, "--output", out, "--resume", "--quiet"])
        assert r.exit_code == 0 and "Stopped" not in r.text, r.output
        assert json.loads((out / "metrics.json").read_text())["finished"] is True


def test_linear_stopped_and_resumed_is_the_uninterrupted_probe(tmp_path, feature_files):
    straight, split = tmp_path / "a", tmp_path / "b"
    assert run_cli(_linear(feature_files, straight)).exit_code == 0
    assert run_cli(_linear(feature_files, split, "--stop-after", "1")).exit_code == 0
    # the recipe comes from the run: only --output (in any spelling) and --resume are needed
    r = run_cli(["linear", "--output", f"{split}/../{split.name}/", "--resume", "--quiet"])
    assert r.exit_code == 0, r.output
    a, b = load_state(straight / "checkpoint.pth"), load_state(split / "checkpoint.pth")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["history"] == b["history"]
    r = run_cli(["linear", "--output", split, "--resume", "--lr", "2", "--quiet"])
    assert r.exit_code == 2 and "changes (--lr 1.0 -> 2.0)" in r.text, r.output


def test_linear_stopped_by_a_signal_exits_130_and_resumes_exactly(tmp_path, feature_files, monkeypatch):
    import signal

    import dinokit.commands.linear as cmd

    from tests.helpers import SignalAfter

    straight, split = tmp_path / "a", tmp_path / "b"
    assert run_cli(_linear(feature_files, straight)).exit_code == 0

    class Progress(SignalAfter):
        def __init__(self, quiet=False):
            super().__init__(6, signal.SIGINT)  # 5 steps an epoch: in the middle of the second

        def task(self, description, total=None):
            return self._task(True)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(cmd, "RichProgress", Progress)
    r = run_cli(_linear(feature_files, split))
    assert r.exit_code == 130, r.output
    assert "Stopped by SIGINT" in r.text and f"dinokit linear --output {split} --resume" in r.text
    assert load_state(split / "checkpoint.pth")["epoch"] == 1
    monkeypatch.undo()
    assert run_cli(["linear", "--output", split, "--resume", "--quiet"]).exit_code == 0
    a, b = load_state(straight / "checkpoint.pth"), load_state(split / "checkpoint.pth")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

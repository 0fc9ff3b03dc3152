"""`dinokit pretrain` end to end on 32 tiny images: run folder, exact resume, signals, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dinokit
from dinokit.train.pretrain import pretrain
from tests.helpers import load_state, run_cli, tiny_pretrain_config

TINY = [
    "--arch",
    "vit_tiny",
    "--depth",
    "2",
    "--batch-size",
    "8",
    "--out-dim",
    "256",
    "--local-crops",
    "2",
    "--global-size",
    "32",
    "--local-size",
    "16",
    "--precision",
    "fp32",
    "--num-workers",
    "0",
    "--quiet",
]


pytestmark = pytest.mark.usefixtures("one_thread")


LOG_FIELDS = {"epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "images_per_second", "seconds"}


def invoke(args):
    return run_cli(["pretrain", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def straight(pretrain_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    res = invoke(
        ["--data", str(pretrain_images), "--output", str(out), "--epochs", "2", "--save-every", "1", *TINY]
    )
    return out, res


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_epochs_on_32_images_write_the_run_folder(straight):
    out, res = straight
    assert res.exit_code == 0, res.output
    for name in (
        "config.json",
        "log.jsonl",
        "checkpoint.pth",
        "checkpoint0001.pth",
        "checkpoint0002.pth",
        "backbone.pth",
        "metrics.json",
    ):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(LOG_FIELDS <= set(x) for x in lines)
    assert all(x["skipped_images"] == 1 for x in lines)  # the broken file, counted each epoch
    assert all(x["images_per_second"] > 0 and x["seconds"] > 0 for x in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["epochs_done"] == 2 and metrics["n_images"] == 33
    # the run's total is of images, not of epochs' counts: one broken file, seen in both epochs
    assert metrics["skipped_images"] == 1 and "1 unreadable image skipped" in " ".join(res.output.split())
    assert metrics["config"]["arch"] == "vit_tiny" and "versions" in metrics
    config = json.loads((out / "config.json").read_text())
    assert config["iterations_per_epoch"] == 4 and config["global_batch"] == 8
    # every file loads with weights_only=True; the checkpoint's both keys give a backbone
    ckpt = load_state(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 0 and ckpt["dino_loss"]["center"].shape == (1, 256)
    teacher = dinokit.load_backbone(out / "checkpoint.pth")
    student = dinokit.load_backbone(out / "checkpoint.pth", checkpoint_key="student")
    released = dinokit.load_backbone(out / "backbone.pth")
    assert_same_state(teacher.state_dict(), released.state_dict())
    assert not torch.equal(teacher.blocks[0].attn.qkv.weight, student.blocks[0].attn.qkv.weight)
    # the 224 grid is kept whatever the crop size, so the weights load with the default model
    assert released.pos_embed.shape[1] == 1 + 14 * 14


def test_stop_after_then_resume_is_bitwise_equal(straight, pretrain_images, tmp_path):
    out_s = straight[0]
    out = tmp_path / "resumed"
    base = ["--data", str(pretrain_images), "--output", str(out), "--epochs", "2", *TINY]
    res = invoke([*base, "--stop-after", "1"])
    assert res.exit_code == 0, res.output
    assert "--resume" in res.output
    assert load_state(out / "checkpoint.pth")["epoch"] == 1
    res = invoke([*base, "--resume"])
    assert res.exit_code == 0, res.output
    assert_same_state(load_state(out_s / "backbone.pth"), load_state(out / "backbone.pth"))
    a, b = load_state(out_s / "checkpoint.pth"), load_state(out / "checkpoint.pth")
    assert_same_state(a["student"], b["student"])
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


class SignalAt:
    """A progress sink that sends this process a signal at a chosen step of a chosen epoch."""

    def __init__(self, epoch: int, step: int, signum=signal.SIGTERM):
        self.epoch, self.step, self.signum = epoch, step, signum

    def task(self, description, total=None):
        outer = self

        class _Task:
            n = 0

            def advance(self, n=1, **fields):
                self.n += n
                if description.startswith(f"epoch {outer.epoch}/") and self.n == outer.step:
                    os.kill(os.getpid(), outer.signum)

            def update(self, **fields):
                pass

            def close(self):
                pass

        return _Task()

    def log(self, message):
        pass


def test_signal_mid_epoch_saves_and_resumes_exactly(straight, pretrain_images, tmp_path):
    out = tmp_path / "signalled"
    result = pretrain(tiny_pretrain_config(pretrain_images, out), SignalAt(epoch=2, step=2))
    assert result.exit_code == 143 and result.stopped_by == "SIGTERM" and not result.finished
    ckpt = load_state(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)  # the step in flight was finished, then saved
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    result = pretrain(tiny_pretrain_config(pretrain_images, out, resume=True))
    assert result.finished and result.exit_code == 0
    assert_same_state(load_state(straight[0] / "backbone.pth"), load_state(out / "backbone.pth"))
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in (straight[0] / "log.jsonl").read_text().splitlines()]
    assert lines[1]["loss"] == pytest.approx(straight_lines[1]["loss"], rel=1e-6)  # whole-epoch mean kept


@pytest.mark.slow
def test_sigterm_to_a_running_process_leaves_a_resumable_checkpoint(pretrain_images, tmp_path):
    out = tmp_path / "killed"
    # a data worker too, and the signal goes to the whole process group (as `kill -TERM -PGID`, a
    # batch scheduler or a container stop would send it): the workers must leave it to the main process
    args = [a if a != "0" or i == 0 or TINY[i - 1] != "--num-workers" else "1" for i, a in enumerate(TINY)]
    cmd = [
        sys.executable,
        "-m",
        "dinokit",
        "pretrain",
        "--data",
        str(pretrain_images),
        "--output",
        str(out),
        "--epochs",
        "50",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert "--resume" in stdout + stderr
    done = load_state(out / "checkpoint.pth")
    assert 1 <= done["epoch"] < 50
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_by"] == "SIGTERM"
    # resume through the CLI with only the run folder (the saved settings are reused)
    stop = done["epoch"] + 1
    res = invoke(["--output", str(out), "--resume", "--stop-after", str(stop), "--quiet"])
    assert res.exit_code == 0, res.output
    assert load_state(out / "checkpoint.pth")["epoch"] == stop


def test_empty_folder_is_an_error_before_anything_starts(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    res = run_cli(["pretrain", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), *TINY])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "holds no images" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(straight, pretrain_images, tmp_path):
    res = run_cli(["pretrain", "--data", str(pretrain_images), "--output", str(straight[0]), *TINY])
    assert res.exit_code == 2 and "--resume" in " ".join(res.output.split())
    res = run_cli(["pretrain", "--data", str(pretrain_images), "--output", str(tmp_path / "new"), "--resume"])
    assert res.exit_code == 2 and "without --resume" in " ".join(res.output.split())

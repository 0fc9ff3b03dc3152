"""Run folders a user can trust: --overwrite removes exactly the earlier run's files before writing,
--resume continues only a checkpoint of the same run, a killed run loses at most the checkpoint
cadence, a second Ctrl-C cannot tear a checkpoint, bad numbers are refused, and davis-score keeps
existing results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dinokit
from dinokit.eval.features import FeatureSet, save_features
from dinokit.eval.linear import LinearConfig, linear_eval
from dinokit.io import torch_save_atomic
from dinokit.train.finetune import FinetuneConfig, finetune
from dinokit.train.pretrain import PretrainConfig, pretrain
from tests.helpers import make_image, run_cli

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
DATA = Path(__file__).parent / "assets"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_folder_images")
    for i in range(16):
        make_image(root / f"{i}.png", size=(40, 36), seed=i)
    return root


def tiny_config(images, out, **kw) -> PretrainConfig:
    base = dict(
        data=str(images),
        output=str(out),
        arch="vit_tiny",
        depth=2,
        batch_size=8,
        out_dim=256,
        local_crops=2,
        global_size=32,
        local_size=16,
        precision="fp32",
        num_workers=0,
        epochs=1,
    )
    return PretrainConfig(**{**base, **kw})


class Killed(BaseException):
    """Stands for SIGKILL: the run ends where it is, nothing of it runs on."""


class KillAtFirstEpoch:
    def task(self, description, total=None):
        raise Killed

    def log(self, message):
        pass


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -- --overwrite and --resume ---------------------------------------------------------------------
def test_overwrite_removes_the_earlier_run_before_writing_and_resume_then_refuses(images, tmp_path):
    run = tmp_path / "R"
    pretrain(tiny_config(images, run, save_every=1))
    assert {"checkpoint.pth", "checkpoint0001.pth", "backbone.pth", "log.jsonl"} <= {
        p.name for p in run.iterdir()
    }
    (run / "notes.txt").write_text("mine")
    (run / "mine").mkdir()
    (run / "mine" / "checkpoint.pth").write_bytes(b"a user's file")
    with pytest.raises(Killed):  # the new run is killed as soon as its first epoch starts
        pretrain(tiny_config(images, run, overwrite=True, seed=5, epochs=2), KillAtFirstEpoch())
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    names = {p.name for p in run.iterdir()}
    assert not names & {"checkpoint.pth", "checkpoint0001.pth", "backbone.pth", "log.jsonl", "metrics.json"}
    assert (run / "notes.txt").read_text() == "mine" and (run / "mine" / "checkpoint.pth").is_file()
    r = run_cli(["pretrain", "--output", run, "--resume", "--quiet"])
    assert r.exit_code == 2 and "resume" in r.text and "Traceback" not in r.text, r.text


def test_resume_refuses_a_checkpoint_of_another_run_naming_the_difference(images, tmp_path):
    run = tmp_path / "R"
    pretrain(tiny_config(images, run))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "seed": 5, "run_identity": None}))
    r = run_cli(["pretrain", "--output", run, "--resume", "--epochs", "2", "--quiet"])
    assert r.exit_code == 2 and "belongs to another run" in r.text and "seed 0 -> 5" in r.text, r.text
    with pytest.raises(dinokit.DinokitError, match="lr 0.0005 -> 0.001"):
        pretrain(tiny_config(images, run, resume=True, epochs=2, lr=1e-3))
    assert load(run / "checkpoint.pth")["epoch"] == 1  # nothing was trained on


def test_resume_refuses_a_checkpoint_made_from_other_images_but_follows_a_moved_folder(images, tmp_path):
    import shutil

    run = tmp_path / "R"
    pretrain(tiny_config(images, run))
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    pretrain(tiny_config(moved, run, resume=True, epochs=2))  # the same images elsewhere: the same run
    assert load(run / "checkpoint.pth")["epoch"] == 2
    extra = sorted(p for p in moved.rglob("*") if p.is_file())[0]
    shutil.copy(extra, extra.with_name("added" + extra.suffix))
    with pytest.raises(dinokit.DinokitError, match="belongs to another run.*data_files"):
        pretrain(tiny_config(moved, run, resume=True, epochs=3))
    assert load(run / "checkpoint.pth")["epoch"] == 2  # nothing was trained on


def clusters(n_per_class, classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    fp = {"weights": "random(seed=0)", "arch": "vit_tiny", "n_last_blocks": 1, "avgpool_patch_tokens": False}
    return FeatureSet(
        feats, labels, [f"c{i}" for i in range(classes)], [f"{i}.png" for i in range(len(labels))], fp
    )


def test_linear_overwrite_and_resume_belong_to_one_run(tmp_path):
    save_features(clusters(10, 3, 8, 0), tmp_path / "train.pt")
    save_features(clusters(4, 3, 8, 1), tmp_path / "val.pt")
    kw = dict(train_features=tmp_path / "train.pt", val_features=tmp_path / "val.pt", epochs=3, batch_size=6)
    out = tmp_path / "probe"
    out.mkdir()  # the command makes the folder (prepare_output_dir)
    linear_eval(LinearConfig(output=out, **kw))
    # a resume that asks for another seed is not the same run
    with pytest.raises(dinokit.DinokitError, match="seed 0 -> 3"):
        linear_eval(LinearConfig(output=out, resume=True, **{**kw, "epochs": 3}, seed=3))
    # a fresh run in the folder removes the earlier run's checkpoint and log before it trains
    (out / "notes.txt").write_text("mine")

    def killed(*args, **kwargs):
        raise Killed

    import dinokit.eval.linear as linear

    original = linear._ProbeRun.maybe_resume
    linear._ProbeRun.maybe_resume = killed
    try:
        with pytest.raises(Killed):
            linear_eval(LinearConfig(output=out, seed=3, overwrite=True, **kw))
    finally:
        linear._ProbeRun.maybe_resume = original
    assert not (out / "checkpoint.pth").exists() and not (out / "log.jsonl").exists()
    assert (out / "notes.txt").read_text() == "mine"


# -- bad numbers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,value",
    [
        ("lr", -1.0),
        ("lr", float("nan")),
        ("min_lr", -1e-6),
        ("weight_decay", float("inf")),
        ("teacher_temp", 0.0),
    ],
)
def test_pretrain_refuses_negative_and_non_finite_numbers(images, tmp_path, option, value):
    with pytest.raises(dinokit.DinokitError, match=f"--{option.replace('_', '-')} must be"):
        pretrain(tiny_config(images, tmp_path / "o", **{option: value}))
    assert not (tmp_path / "o").exists()


def test_the_cli_refuses_a_negative_lr_in_one_sentence(images, tmp_path):
    r = run_cli(["pretrain", "--data", images, "--output", tmp_path / "o", "--lr", "-1", *TINY])
    assert (
        r.exit_code == 2 and "--lr must be a positive finite number" in r.text and "Traceback" not in r.text
    )
    r = run_cli(["pretrain", "--data", images, "--output", tmp_path / "o", "--lr", "nan", *TINY])
    assert r.exit_code == 2 and "--lr must be" in r.text


@pytest.mark.parametrize(
    "option,value", [("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1), ("min_lr", float("nan"))]
)
def test_finetune_and_linear_refuse_bad_numbers(tmp_path, option, value):
    with pytest.raises(dinokit.DinokitError, match=f"--{option.replace('_', '-')} must be"):
        finetune(FinetuneConfig(train=tmp_path, output=tmp_path / "ft", **{option: value}))
    if option != "min_lr":
        with pytest.raises(dinokit.DinokitError, match=f"--{option.replace('_', '-')} must be"):
            linear_eval(
                LinearConfig(
                    output=tmp_path / "lin",
                    train_features=tmp_path / "t.pt",
                    val_features=tmp_path / "v.pt",
                    **{option: value},
                )
            )


def test_a_loss_that_fails_before_any_checkpoint_says_nothing_is_kept(images, tmp_path, monkeypatch):
    import dinokit.train.dino as mod

    class NaNLoss(mod.DINOLoss):
        def forward(self, student_output, teacher_output, epoch):
            return super().forward(student_output, teacher_output, epoch) * float("nan")

    monkeypatch.setattr(mod, "DINOLoss", NaNLoss)
    with pytest.raises(dinokit.DinokitError) as err:
        pretrain(tiny_config(images, tmp_path / "nan"))
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()
    assert "last good state" not in str(err.value) and "before any checkpoint was saved" in str(err.value)


# -- a second Ctrl-C while a checkpoint is written ---------------------------------------------------
def test_a_signal_during_the_checkpoint_write_waits_until_the_file_is_complete(tmp_path, monkeypatch):
    def second_ctrl_c(signum, frame):
        raise KeyboardInterrupt  # what GracefulStop does on the second signal

    real_save = torch.save

    def save_with_signal(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler would run here, in the middle of the write
        real_save(obj, f, *args, **kwargs)

    old = signal.signal(signal.SIGINT, second_ctrl_c)
    monkeypatch.setattr(torch, "save", save_with_signal)
    try:
        with pytest.raises(KeyboardInterrupt):
            torch_save_atomic({"w": torch.arange(1000)}, tmp_path / "checkpoint.pth")
    finally:
        signal.signal(signal.SIGINT, old)
    monkeypatch.undo()
    assert torch.equal(load(tmp_path / "checkpoint.pth")["w"], torch.arange(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file left


# -- the checkpoint cadence -----------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_loses_at_most_the_cadence_and_resume_is_exact(images, tmp_path):
    straight = tmp_path / "straight"
    pretrain(tiny_config(images, straight, epochs=2, batch_size=2))  # 8 steps per epoch
    out = tmp_path / "killed"
    # a cadence of a few microseconds: a checkpoint after every step
    cmd = [
        sys.executable,
        "-m",
        "dinokit",
        "pretrain",
        "--data",
        str(images),
        "--output",
        str(out),
        "--epochs",
        "2",
        "--checkpoint-minutes",
        "1e-7",
        *[("2" if a == "8" and TINY[i - 1] == "--batch-size" else a) for i, a in enumerate(TINY)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ck = load(out / "checkpoint.pth")
            except Exception:  # not there yet
                ck = None
            if ck is not None and ck["epoch"] == 1 and ck["iteration"] >= 2:  # mid-epoch 2
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = load(out / "checkpoint.pth")
    assert ck["epoch"] == 1 and 2 <= ck["iteration"] < 8, (ck["epoch"], ck["iteration"])
    result = pretrain(tiny_config(images, out, resume=True, epochs=2, batch_size=2))
    assert result.finished
    a, b = load(straight / "backbone.pth"), load(out / "backbone.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert lines[1]["loss"] == pytest.approx(straight_lines[1]["loss"], rel=1e-6)


def test_the_cadence_checkpoint_in_process_resumes_exactly(images, tmp_path, monkeypatch):
    """The same without a subprocess: every step checkpoints, the run is stopped inside epoch 2."""
    straight = tmp_path / "straight"
    pretrain(tiny_config(images, straight, epochs=2, batch_size=4))
    out = tmp_path / "cadence"

    class KillMidEpoch2:
        def task(self, description, total=None):
            class Task:
                n = 0

                def advance(self, n=1, **fields):
                    self.n += n
                    if description.startswith("epoch 2/") and self.n == 3:
                        raise Killed

                def close(self):
                    pass

            return Task()

        def log(self, message):
            pass

    with pytest.raises(Killed):
        pretrain(tiny_config(images, out, epochs=2, batch_size=4, checkpoint_minutes=1e-9), KillMidEpoch2())
    ck = load(out / "checkpoint.pth")
    assert (ck["epoch"], ck["iteration"]) == (1, 3)
    pretrain(tiny_config(images, out, resume=True, epochs=2, batch_size=4))
    a, b = load(straight / "backbone.pth"), load(out / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- davis-score keeps existing results -----------------------------------------------------------
def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


def test_davis_score_does_not_replace_results_without_overwrite(tmp_path):
    gt = DATA / "davis-ellipses" / "gt"
    pred = tmp_path / "pred"
    _copy_tree(DATA / "davis-ellipses" / "pred", pred)
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--quiet"])
    assert r.exit_code == 0, r.text
    first = (pred / "metrics.json").read_text()
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--sequences", "ellipses-drift",
                 "--quiet"])  # fmt: skip
    assert r.exit_code == 2 and "already exists" in r.text and "--overwrite" in r.text, r.text
    assert (pred / "metrics.json").read_text() == first
    r = run_cli(["davis-score", "--gt", gt, "--pred", pred, "--output", pred, "--sequences", "ellipses-drift",
                 "--overwrite", "--quiet"])  # fmt: skip
    assert r.exit_code == 0 and json.loads((pred / "metrics.json").read_text())["config"]["sequences"] == [
        "ellipses-drift"
    ]


def test_davis_score_keeps_the_record_of_a_davis_run(tmp_path):
    gt = DATA / "davis-ellipses" / "gt"
    run = tmp_path / "davis_run"
    _copy_tree(DATA / "davis-ellipses" / "pred", run)
    record = {
        "J&F-Mean": 0.84,
        "videos": {"ellipses-drift": {"frames": 6}},
        "config": {"weights": "dino_vits16"},
    }
    (run / "metrics.json").write_text(json.dumps(record))
    # --output naming the --pred folder, however spelt, is the folder beside the predictions
    for beside in (run, run / "sub" / ".."):
        r = run_cli(["davis-score", "--gt", gt, "--pred", run, "--output", beside, "--sequences", "ellipses-drift",
                     "--quiet"])  # fmt: skip
        assert r.exit_code == 2 and "dinokit davis" in r.text and "--output" in r.text, r.text
        assert json.loads((run / "metrics.json").read_text()) == record
    r = run_cli(
        [
            "davis-score",
            "--gt",
            gt,
            "--pred",
            run,
            "--sequences",
            "ellipses-drift",
            "--output",
            tmp_path / "scores",
            "--quiet",
        ]
    )
    assert r.exit_code == 0 and (tmp_path / "scores" / "metrics.json").is_file()
    assert json.loads((run / "metrics.json").read_text()) == record


def test_finetune_checkpoints_on_the_cadence_and_resumes_exactly(labelled_folder, tiny2_weights, tmp_path):
    def cfg(out, **kw):
        return FinetuneConfig(
            train=labelled_folder / "train", val=labelled_folder / "val", output=out, weights=str(tiny2_weights),
            epochs=2, batch_size=4, image_size=32, num_workers=0, precision="fp32", device="cpu",
            warmup_epochs=1, lr=0.02, mixup=0.8, **kw,
        )  # fmt: skip

    class KillAtStep:
        """Ends the run (as SIGKILL would) after the 6th step: 4 steps per epoch, so inside epoch 2."""

        steps = 0

        def task(self, description, total=None):
            outer = self

            class Task:
                def advance(self, n=1, **fields):
                    if description.startswith("epoch") and fields:
                        outer.steps += n
                        if outer.steps == 6:
                            raise Killed

                def update(self, **fields):
                    pass

                def close(self):
                    pass

            return Task()

        def log(self, message):
            pass

    assert finetune(cfg(tmp_path / "a")).finished
    with pytest.raises(Killed):
        finetune(cfg(tmp_path / "b", checkpoint_minutes=1e-9), progress=KillAtStep())
    state = load(tmp_path / "b" / "checkpoint.pth")
    assert (state["epoch"], state["step"]) == (1, 1)  # the step in flight when killed is lost, no more
    assert finetune(cfg(tmp_path / "b", resume=True)).finished
    a, b = load(tmp_path / "a" / "model.pth"), load(tmp_path / "b" / "model.pth")
    for part in ("backbone", "head"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])

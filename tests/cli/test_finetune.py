"""`dinokit finetune` end to end: exact resume (also after SIGTERM), the run folder, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import dinokit
from dinokit.checkpoints import load_finetuned
from tests.helpers import SignalAfter, assert_same_weights, load_state, log_lines, make_image, run_cli


def base_args(weights: Path, data: Path, out: Path, epochs: int = 2) -> list[str]:
    return [
        "finetune", "--weights", str(weights), "--train", str(data / "train"), "--val", str(data / "val"),
        "--output", str(out), "--epochs", str(epochs), "--batch-size", "4", "--image-size", "32",
        "--num-workers", "0", "--precision", "fp32", "--device", "cpu", "--warmup-epochs", "1",
        "--lr", "0.02", "--quiet",
    ]  # fmt: skip


def invoke(args: list[str]):
    return run_cli(args, catch_exceptions=False)


# -- exact resume --------------------------------------------------------------------------------------
def test_resume_is_bitwise_exact(labelled_folder, tiny2_weights, tmp_path):
    extra = ["--mixup", "0.8", "--cutmix", "1.0", "--randaugment", "9", "--drop-path", "0.1",
             "--head-warmup-epochs", "1", "--layer-decay", "0.75", "--clip-grad", "1.0"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = invoke(base_args(tiny2_weights, labelled_folder, straight, epochs=3) + extra)
    assert r.exit_code == 0, r.output
    r = invoke(base_args(tiny2_weights, labelled_folder, split, epochs=3) + extra + ["--stop-after", "1"])
    assert r.exit_code == 0, r.output
    assert "resume" in r.output and not (split / "model.pth").exists()
    # resume with only the run-control options; the recipe comes from the checkpoint. --stop-after
    # counts epochs of the schedule from the run's start: 1 is done already, 2 trains one more
    r = invoke(
        ["finetune", "--output", str(split), "--resume", "--stop-after", "1", "--num-workers", "0", "--quiet"]
    )
    assert r.exit_code == 0 and "Stopped after epoch 1 of 3" in r.output, r.output
    r = invoke(
        ["finetune", "--output", str(split), "--resume", "--stop-after", "2", "--num-workers", "0", "--quiet"]
    )
    assert r.exit_code == 0 and "Stopped after epoch 2 of 3" in r.output, r.output
    assert load_state(split / "checkpoint.pth")["epoch"] == 2
    r = invoke(["finetune", "--output", str(split), "--resume", "--num-workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert_same_weights(straight / "model.pth", split / "model.pth")
    assert log_lines(straight) == log_lines(split)
    assert [h["phase"] for h in log_lines(split)] == ["head", "full", "full"]


def test_cli_exits_143_with_resume_hint_on_sigterm(labelled_folder, tiny2_weights, tmp_path, monkeypatch):
    import dinokit.commands.finetune as cmd

    class Progress(SignalAfter):
        def __init__(self, quiet=False):
            super().__init__(3)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(cmd, "RichProgress", Progress)
    r = run_cli(base_args(tiny2_weights, labelled_folder, tmp_path / "run"))
    assert r.exit_code == 143, r.output
    assert "SIGTERM" in r.output and "--resume" in r.output
    assert (tmp_path / "run" / "checkpoint.pth").is_file()


# -- the run folder ------------------------------------------------------------------------------------
def test_run_folder_outputs(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    r = invoke(base_args(tiny2_weights, labelled_folder, out, epochs=2))
    assert r.exit_code == 0, r.output
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2]
    for h in lines:
        assert {"train_loss", "val_top1", "val_top5", "lr", "seconds"} <= set(h)
        assert 0 <= h["val_top1"] <= h["val_top5"] <= 100
    m = json.loads((out / "metrics.json").read_text())
    assert m["finished"] and m["top1"] == lines[-1]["val_top1"]
    assert m["best_top1"] == max(h["val_top1"] for h in lines)
    assert set(m["per_class_top1"]) == {"red", "green", "blue"}
    # top-1 is the mean of the per-class accuracies here (2 val images per class)
    np.testing.assert_allclose(np.mean(list(m["per_class_top1"].values())), m["top1"])
    assert m["config"]["weight_decay"] == 0.05 and m["config"]["label_smoothing"] == 0.1
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # model.pth: its backbone part loads with dinokit.load_backbone; the head gives the run's val top-1
    saved = load_state(out / "model.pth")
    assert saved["format"] == "dinokit-finetuned" and saved["classes"] == ["blue", "green", "red"]
    assert saved["arch"] == "vit_tiny" and saved["patch_size"] == 16 and saved["image_size"] == 32
    backbone = dinokit.load_backbone(out / "model.pth")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, saved["backbone"][k])
    model, meta = load_finetuned(out)
    from dinokit.data.images import open_rgb, scan_labelled_folder
    from dinokit.data.transforms import eval_transform, resize_for

    val = scan_labelled_folder(labelled_folder / "val", classes=saved["classes"])
    tf = eval_transform(resize_for(32), 32)
    x = torch.stack([tf(open_rgb(p)) for p in val.paths])
    with torch.no_grad():
        logits = backbone(x) @ saved["head"]["weight"].T + saved["head"]["bias"]
        torch.testing.assert_close(model(x), logits)
    acc = 100.0 * (logits.argmax(-1) == torch.tensor(val.targets)).float().mean().item()
    assert acc == pytest.approx(m["top1"])
    assert (out / "best.pth").is_file()


def test_fewer_images_than_one_batch_shrinks_the_batch(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny2_weights, labelled_folder, out, epochs=1)
    args[args.index("--batch-size") + 1] = "64"
    args.remove("--quiet")
    r = invoke(args)
    assert r.exit_code == 0, r.output
    assert "more than the 18 training images" in " ".join(r.output.split())
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_batch_size"] == 18


def test_val_split_is_stratified(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny2_weights, labelled_folder, out, epochs=1)
    i = args.index("--val")
    del args[i : i + 2]
    r = invoke(args + ["--val-split", "0.34"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert (m["num_train"], m["num_val"]) == (12, 6)  # 2 of 6 per class held out
    held = json.loads((out / "split.json").read_text())["val"]
    assert sorted(Path(p).parent.name for p in held) == ["blue"] * 2 + ["green"] * 2 + ["red"] * 2


# -- bad input: one sentence, exit 2 -------------------------------------------------------------------
def one_error_sentence(r) -> str:
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert text.startswith("Error:") and "Traceback" not in text
    return text


def test_val_class_that_train_lacks(labelled_folder, tiny2_weights, tmp_path):
    make_image(labelled_folder / "val" / "purple" / "0.png")
    r = invoke(base_args(tiny2_weights, labelled_folder, tmp_path / "run"))
    assert "classes the training set lacks: purple" in one_error_sentence(r)


def test_single_class(tmp_path, tiny2_weights):
    for i in range(3):
        make_image(tmp_path / "one" / "train" / "cat" / f"{i}.png", seed=i)
        make_image(tmp_path / "one" / "val" / "cat" / f"{i}.png", seed=10 + i)
    r = invoke(base_args(tiny2_weights, tmp_path / "one", tmp_path / "run"))
    assert "single class (cat)" in one_error_sentence(r)


def test_changed_recipe_on_resume_is_refused(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    assert invoke(base_args(tiny2_weights, labelled_folder, out) + ["--stop-after", "1"]).exit_code == 0
    r = invoke(["finetune", "--output", str(out), "--resume", "--lr", "0.1"])
    assert "changes (--lr 0.02 -> 0.1)" in one_error_sentence(r)


def test_resume_without_checkpoint_and_existing_output(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("x")
    r = invoke(base_args(tiny2_weights, labelled_folder, out))
    assert "already holds results" in one_error_sentence(r)
    r = invoke(["finetune", "--output", str(out), "--resume"])
    assert "There is no fine-tuning run in" in one_error_sentence(r) and "(no checkpoint.pth)" in r.output


def test_val_and_val_split_together(labelled_folder, tiny2_weights, tmp_path):
    r = invoke(base_args(tiny2_weights, labelled_folder, tmp_path / "run") + ["--val-split", "0.2"])
    assert "either --val or --val-split" in one_error_sentence(r)


# -- torchrun ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one(labelled_folder, tiny2_weights, tmp_path):
    """2 processes x batch 2 see the same global batches as 1 process x batch 4 (the order is cut into
    global batches first), so without drop path or mixup they train to the same weights (up to the
    order of float sums); the head-only epoch checks the head's gradient averaging."""
    import subprocess
    import sys

    common = ["--drop-path", "0", "--head-warmup-epochs", "1", "--epochs", "2"]
    one = base_args(tiny2_weights, labelled_folder, tmp_path / "one") + common
    r = invoke(one)
    assert r.exit_code == 0, r.output
    two = base_args(tiny2_weights, labelled_folder, tmp_path / "two") + common
    two[two.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dinokit", *two],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_state(tmp_path / "one" / "model.pth"), load_state(tmp_path / "two" / "model.pth")
    for part in ("backbone", "head"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
    la, lb = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    assert [h["val_top1"] for h in la] == [h["val_top1"] for h in lb]
    np.testing.assert_allclose([h["train_loss"] for h in la], [h["train_loss"] for h in lb], rtol=1e-5)


def test_starts_from_a_pretrain_checkpoint_teacher(labelled_folder, tmp_path):
    """A `dinokit pretrain` checkpoint (student/teacher MultiCropWrapper state dicts): the teacher's
    backbone is the one fine-tuned; a head-only epoch leaves it exactly as loaded."""
    from dinokit.models.head import DINOHead, MultiCropWrapper

    torch.manual_seed(1)
    teacher = MultiCropWrapper(
        dinokit.build_backbone("vit_tiny", 16, depth=2), DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    )
    student = MultiCropWrapper(
        dinokit.build_backbone("vit_tiny", 16, depth=2), DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
    )
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "epoch": 1}, ckpt)
    out = tmp_path / "run"
    r = invoke(base_args(ckpt, labelled_folder, out, epochs=1) + ["--head-warmup-epochs", "1"])
    assert r.exit_code == 0, r.output
    saved = load_state(out / "model.pth")
    for k, v in teacher.backbone.state_dict().items():
        assert torch.equal(saved["backbone"][k], v), k
    assert not torch.equal(saved["head"]["weight"], torch.zeros_like(saved["head"]["weight"]))


@pytest.mark.slow
def test_overwrite_starts_a_clean_run(labelled_folder, tiny2_weights, tmp_path):
    out = tmp_path / "run"
    assert invoke(base_args(tiny2_weights, labelled_folder, out, epochs=2)).exit_code == 0
    r = invoke(
        base_args(tiny2_weights, labelled_folder, out, epochs=1) + ["--overwrite", "--stop-after", "1"]
    )
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in log_lines(out)] == [1]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1

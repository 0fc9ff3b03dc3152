"""`dinokit segment` end to end on `synth segment` data: the run folder's files, exact resume, a head
applied to new images, every bad input refused in one sentence with nothing written, and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.synth_segment import make_segment_dataset
from tests.helpers import make_image, run_cli, save_tiny_vit


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    data = make_segment_dataset(root / "data", layout="folder", classes=3, train=4, val=2, size=48).root
    weights = save_tiny_vit(root / "vit.pth", depth=2)
    return root, data, weights


def _args(data, weights, out, *extra, batch=2):
    return ["segment", "--data", data, "--dataset", "folder", "--weights", weights, "--output", out,
            "--iterations", "6", "--batch-size", str(batch), "--image-size", "32", "--pictures", "1", "--threads", "1",
            "--quiet", *extra]  # fmt: skip


def test_a_run_writes_its_folder(setup, tmp_path):
    _, data, weights = setup
    out = tmp_path / "run"
    r = run_cli(_args(data, weights, out))
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["iterations_done"] == 6
    assert set(metrics["segmentation"]) == {"mIoU", "aAcc", "mAcc"}
    assert metrics["units"] == {"mIoU": "percent", "aAcc": "percent", "mAcc": "percent"}
    assert 0 <= metrics["segmentation"]["mIoU"] <= 100
    rows = (out / "per_class.csv").read_text().splitlines()
    assert (
        rows[0].startswith("class_id,class,iou_percent")
        and len(rows) == 5
        and rows[1].split(",")[1] == "background"
    )
    head = torch.load(out / "head.pth", weights_only=True)
    assert head["classes"] == ["background", "circle", "square", "triangle"] and head["blocks"] == 1
    assert head["backbone"]["arch"] == "vit_tiny" and head["normalisation"]["mean"][0] == pytest.approx(0.485)
    for stem in ("synth_val_00000", "synth_val_00001"):
        pred = Image.open(out / "predictions" / f"{stem}.png")
        truth = Image.open(data / "val" / "masks" / f"{stem}.png")
        assert pred.mode == "P" and pred.size == truth.size
        assert np.asarray(pred).max() <= 3
    assert len(list((out / "pictures").glob("*.png"))) == 1


def test_stop_and_resume_equal_an_uninterrupted_run_bitwise(setup, tmp_path):
    _, data, weights = setup
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(_args(data, weights, whole)).exit_code == 0
    r = run_cli(_args(data, weights, parts, "--stop-after", "3"))
    assert r.exit_code == 0 and "Stopped after iteration 3 of 6" in r.text
    assert torch.load(parts / "checkpoint.pth", weights_only=True)["iteration"] == 3
    assert not (parts / "head.pth").exists()
    r = run_cli(["segment", "--output", parts, "--resume", "--quiet"])
    assert r.exit_code == 0, r.output
    a = torch.load(whole / "checkpoint.pth", weights_only=True)
    b = torch.load(parts / "checkpoint.pth", weights_only=True)
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    ma, mb = (json.loads((p / "metrics.json").read_text())["segmentation"] for p in (whole, parts))
    assert ma == mb
    # a fresh run is refused where one is, without --overwrite
    r = run_cli(_args(data, weights, whole))
    assert r.exit_code == 2 and "--overwrite" in r.text


def test_a_head_segments_new_images_of_any_size(setup, tmp_path):
    root, data, weights = setup
    run = tmp_path / "run"
    assert run_cli(_args(data, weights, run)).exit_code == 0
    image = make_image(tmp_path / "new.png", size=(70, 45))
    out = tmp_path / "pred"
    r = run_cli(
        ["segment", "--head", run / "head.pth", image, "--weights", weights, "--output", out, "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert Image.open(out / "new.png").size == (70, 45) and (out / "pictures" / "new_overlay.png").is_file()
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    import dinokit

    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), other)
    r = run_cli(
        ["segment", "--head", run / "head.pth", image, "--weights", other, "--output", tmp_path / "x"]
    )
    assert r.exit_code == 2 and "another backbone" in r.text and not (tmp_path / "x").exists()


def _copy_folder_set(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case, words", [
    ("size", "must be the size of its image"),
    ("value", "outside the 4 classes"),
    ("rgb", "not a single-channel or palette PNG"),
    ("missing_mask", "has no mask"),
    ("empty", "holds no image"),
])  # fmt: skip
def test_bad_input_is_one_sentence_and_nothing_written(setup, tmp_path, case, words):
    _, data, weights = setup
    bad = _copy_folder_set(data, tmp_path / "bad")
    mask = bad / "val" / "masks" / "synth_val_00000.png"
    labels = np.asarray(Image.open(mask))
    if case == "size":
        Image.fromarray(labels[:-2]).save(mask)
    elif case == "value":
        lab = labels.copy()
        lab[0, 0] = 7
        Image.fromarray(lab).save(mask)
    elif case == "rgb":
        Image.open(mask).convert("RGB").save(mask)
    elif case == "missing_mask":
        mask.unlink()
    elif case == "empty":
        for p in (bad / "val" / "images").iterdir():
            p.unlink()
    out = tmp_path / "run"
    r = run_cli(_args(bad, weights, out))
    assert r.exit_code == 2 and words in r.text and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_voc_split_file_naming_a_missing_image(setup, tmp_path):
    _, _, weights = setup
    voc = make_segment_dataset(tmp_path / "voc", layout="voc2012", classes=2, train=2, val=1, size=40).root
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("synth_val_00000\nnot_there\n")
    r = run_cli(
        ["segment", "--data", voc, "--dataset", "voc2012", "--weights", weights, "--output", tmp_path / "run"]
    )
    assert r.exit_code == 2 and "names not_there" in r.text and not (tmp_path / "run").exists()


def test_unreadable_images_are_skipped_and_counted_or_stop_under_strict(setup, tmp_path):
    _, data, weights = setup
    bad = _copy_folder_set(data, tmp_path / "bad")
    (bad / "train" / "images" / "synth_train_00003.jpg").write_bytes(b"broken")
    r = run_cli(_args(bad, weights, tmp_path / "strict", "--strict"))
    assert r.exit_code == 2 and "not a readable image" in r.text and not (tmp_path / "strict").exists()
    r = run_cli(_args(bad, weights, tmp_path / "run"))
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["n_train"] == 3


RANK_DUMP = """
import sys
from dinokit.commands import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_two_processes_train_the_head_one_process_trains(setup, tmp_path):
    _, data, weights = setup
    one = tmp_path / "one"
    r = run_cli(_args(data, weights, one, "--precision", "fp32", batch=4))
    assert r.exit_code == 0, r.output
    script = tmp_path / "launch.py"
    script.write_text(RANK_DUMP)
    two = tmp_path / "two"
    args = [str(a) for a in _args(data, weights, two, "--precision", "fp32", batch=2)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DINOKIT_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(one / "checkpoint.pth", weights_only=True)["head"]
    b = torch.load(two / "checkpoint.pth", weights_only=True)["head"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert mb["protocol"]["global_batch"] == 4 == ma["protocol"]["global_batch"]
    assert mb["segmentation"]["mIoU"] == pytest.approx(ma["segmentation"]["mIoU"], abs=0.5)


def test_option_values_are_refused_before_anything_is_written(setup, tmp_path):
    _, data, weights = setup
    out = tmp_path / "run"
    r = run_cli(_args(data, weights, out, "--blocks", "4"))  # the test backbone has 2 blocks
    assert r.exit_code == 2 and "more blocks than the backbone's 2" in r.text and not out.exists()
    r = run_cli(_args(data, weights, out, "--blocks", "3"))
    assert r.exit_code == 2 and "--blocks takes 1" in r.text and not out.exists()
    r = run_cli(["segment", "--head", weights, data / "val" / "images", "--output", out])
    assert r.exit_code == 2 and "not a head.pth" in r.text and not out.exists()

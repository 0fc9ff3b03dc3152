"""dinokit predict: probabilities of a fine-tuned model for images, folders and globs, as CSV, JSON or a
table (``--output -``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

import dinokit
from dinokit.train.finetune import FinetuneConfig, finetune
from tests.helpers import make_image, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pth of a 1-epoch fine-tuning run, its labelled data root)."""
    root = tmp_path_factory.mktemp("predict")
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    for split, n in (("train", 3), ("val", 2)):
        for ci, (name, color) in enumerate(colors.items()):
            for i in range(n):
                make_image(root / "data" / split / name / f"{split}{i}.png", size=(36, 30), seed=ci * 10 + i + 5 * (split == "val"), color=color)  # fmt: skip
    torch.manual_seed(0)
    weights = root / "tiny2.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), weights)
    cfg = FinetuneConfig(
        train=root / "data" / "train", val=root / "data" / "val", output=root / "run", weights=str(weights),
        epochs=1, batch_size=4, image_size=32, num_workers=0, precision="fp32", device="cpu", lr=0.05,
        warmup_epochs=0,
    )  # fmt: skip
    assert finetune(cfg).finished
    return root / "run" / "model.pth", root / "data"


def reference_probs(model_file: Path, paths: list[Path]) -> torch.Tensor:
    """Softmax of head(backbone(x)) with the backbone from dinokit.load_backbone, the head read from the
    file by hand and the evaluation transform written out here."""
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    backbone = dinokit.load_backbone(model_file)
    tf = T.Compose([
        T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    from PIL import Image

    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = backbone(x) @ saved["head"]["weight"].T + saved["head"]["bias"]
    return logits.softmax(-1)


def test_csv_matches_an_independent_forward_pass(trained, tmp_path):
    model_file, data = trained
    out = tmp_path / "preds.csv"
    r = run_cli(["predict", "--model", str(model_file), str(data / "val"), "--k", "3",
                            "--output", str(out), "--batch-size", "3", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    body = rows[1:]
    assert len(body) == 8  # 4 classes x 2 val images, batches of 3
    classes = torch.load(model_file, weights_only=True)["classes"]
    probs = reference_probs(model_file, [Path(r[0]) for r in body])
    for row, p in zip(body, probs):
        want_p, want_c = p.topk(3)
        assert row[1::2] == [classes[int(c)] for c in want_c]
        torch.testing.assert_close(torch.tensor([float(v) for v in row[2::2]]), want_p, atol=2e-6, rtol=0)
        assert float(row[2]) >= float(row[4]) >= float(row[6])


def test_json_files_folders_and_globs(trained, tmp_path):
    model_file, data = trained
    out = tmp_path / "preds.json"
    one = data / "val" / "red" / "val0.png"
    r = run_cli(["predict", "--model", str(model_file), str(one), str(data / "val" / "green"),
                            str(data / "train" / "*" / "train0.png"), str(one), "--k", "10",
                            "--output", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    paths = [p["path"] for p in got["predictions"]]
    assert paths[0] == str(one) and len(paths) == 1 + 2 + 4  # the repeated file counted once
    for p in got["predictions"]:
        assert len(p["top"]) == 4  # --k 10 is clamped to the 4 classes
        assert sum(t["probability"] for t in p["top"]) == pytest.approx(1.0, abs=1e-5)
    assert got["classes"] == ["blue", "green", "red", "white"]


def test_output_dash_prints_a_table_and_writes_no_file(trained, tmp_path, monkeypatch):
    model_file, data = trained
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in data.parent.rglob("*"))
    r = run_cli(["predict", "--model", str(model_file.parent), str(data / "val" / "white"), "--k", "2",
                 "--output", "-"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "val0.png" in r.output and "val1.png" in r.output and "%" in r.output
    assert "written" not in r.output
    assert list(tmp_path.iterdir()) == [] and sorted(p for p in data.parent.rglob("*")) == before


def test_output_is_required():
    r = run_cli(["predict", "--model", "model.pth", "photos"])
    assert r.exit_code == 2
    assert [line for line in r.output.splitlines() if line.strip()] == [
        "Error: dinokit predict needs --output (a .csv or .json file, or - to print a table). "
        "See dinokit predict --help."
    ]


def test_unreadable_image_is_skipped_with_a_warning(trained, tmp_path):
    model_file, data = trained
    bad = tmp_path / "imgs" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    make_image(tmp_path / "imgs" / "ok.png")
    out = tmp_path / "p.csv"
    r = run_cli(["predict", "--model", str(model_file), str(tmp_path / "imgs"), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 unreadable image skipped" in " ".join(r.output.split())
    assert [row[0] for row in csv.reader(out.open())][1:] == [str(tmp_path / "imgs" / "ok.png")]


def error_sentence(r) -> str:
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert text.startswith("Error:") and "Traceback" not in text
    return text


def test_model_that_is_not_a_dinokit_model(tmp_path, trained):
    _, data = trained
    backbone_only = tmp_path / "backbone.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=1), backbone_only)
    r = run_cli(["predict", "--model", str(backbone_only), str(data / "val"), "--output", "-"])
    assert "is not a dinokit fine-tuned model" in error_sentence(r)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    r = run_cli(["predict", "--model", str(text), str(data / "val"), "--output", "-"])
    assert "is not a readable PyTorch checkpoint" in error_sentence(r)
    resume = trained[0].parent / "checkpoint.pth"
    r = run_cli(["predict", "--model", str(resume), str(data / "val"), "--output", "-"])
    assert "fine-tuning checkpoint for resuming" in error_sentence(r)


def test_output_rules(trained, tmp_path):
    model_file, data = trained
    r = run_cli(
        ["predict", "--model", str(model_file), str(data / "val"), "--output", str(tmp_path / "p.txt")]
    )
    assert "must end in .csv or .json" in error_sentence(r)
    existing = tmp_path / "p.csv"
    existing.write_text("keep")
    r = run_cli(["predict", "--model", str(model_file), str(data / "val"), "--output", str(existing)])
    assert "already exists" in error_sentence(r) and existing.read_text() == "keep"
    r = run_cli(["predict", "--model", str(model_file), str(tmp_path / "nothing*.png"), "--output", "-"])
    assert "matches no file" in error_sentence(r)

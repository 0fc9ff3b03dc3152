"""Inputs that used to give a plausible wrong result with exit 0: a misspelt DAVIS split, a doubly
counted unreadable image, a forgotten --weights, a white first-frame mask, non-finite features.
Each is now right or refused with one sentence (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.palette import DAVIS_PALETTE
from tests.helpers import make_image, run_cli


def save_palette_png(labels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(DAVIS_PALETTE)
    img.save(path)
    return path


def tiny_davis(root: Path, seqs=("a", "b"), n_frames: int = 3, size=(64, 128), splits=("val",)) -> Path:
    """ROOT/{JPEGImages,Annotations}/480p/<seq>/ with a square moving over noise, and the split lists."""
    H, W = size
    for s, name in enumerate(seqs):
        rng = np.random.default_rng(s)
        bg = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        for t in range(n_frames):
            img, lab = bg.copy(), np.zeros((H, W), np.uint8)
            lab[16:48, 8 + 8 * t : 40 + 8 * t] = 1
            img[lab == 1] = 230
            (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.png")
            save_palette_png(lab, root / "Annotations" / "480p" / name / f"{t:05d}.png")
    for split in splits:
        (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text(f"{seqs[0]}\n")
    return root


def refused(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.lstrip().startswith("Error:"), result.output
    flat = "".join(result.output.split())  # the console wraps long paths
    for f in fragments:
        assert "".join(f.split()) in flat, result.output


DAVIS_COMMON = ["--image-size", "64", "--num-workers", "0", "--quiet"]


# -- a misspelt --split -------------------------------------------------------------------------
def test_davis_score_refuses_an_unknown_split(tmp_path):
    root = tiny_davis(tmp_path / "DAVIS", splits=("val", "train"))
    r = run_cli(["davis-score", "--gt", root, "--pred", root / "Annotations" / "480p", "--split", "vall",
                 "--output", tmp_path / "scores", "--quiet"])  # fmt: skip
    refused(r, str(root / "ImageSets" / "2017" / "vall.txt"), "train, val")
    assert not (tmp_path / "scores" / "metrics.json").exists()
    # the split that exists scores only its own sequences
    r = run_cli(["davis-score", "--gt", root, "--pred", root / "Annotations" / "480p", "--split", "val",
                 "--output", tmp_path / "scores", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "scores" / "metrics.json").read_text())["per_sequence"].keys() == {"a"}


def test_davis_refuses_an_unknown_split_and_a_root_without_lists(tmp_path, tiny2_weights):
    root = tiny_davis(tmp_path / "DAVIS")
    r = run_cli(["davis", "--data", root, "--split", "vall", "--weights", tiny2_weights,
                 "--output", tmp_path / "out", *DAVIS_COMMON])  # fmt: skip
    refused(r, "vall.txt", "val")
    assert not (tmp_path / "out").exists()
    import shutil

    shutil.rmtree(root / "ImageSets")
    r = run_cli(
        ["davis", "--data", root, "--weights", tiny2_weights, "--output", tmp_path / "out2", *DAVIS_COMMON]
    )
    refused(r, "val.txt", "--sequences")
    # naming the sequences needs no list
    r = run_cli(["davis", "--data", root, "--sequences", "b", "--weights", tiny2_weights,
                 "--output", tmp_path / "out3", *DAVIS_COMMON])  # fmt: skip
    assert r.exit_code == 0, r.output


# -- skipped images counted once ----------------------------------------------------------------
def test_two_unreadable_images_are_counted_twice_not_three_times(tmp_path):
    data = tmp_path / "imgs"
    for i in range(14):
        make_image(data / f"{'a' if i < 7 else 'c'}{i:02d}.png", size=(40, 36), seed=i)
    (data / "b0.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # adjacent in the sorted list: the first bad
    (data / "b1.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # file's substitute search tries the second
    out = tmp_path / "run"
    r = run_cli(["pretrain", "--data", data, "--output", out, "--epochs", "1", "--arch", "vit_tiny",
                 "--depth", "1", "--batch-size", "8", "--out-dim", "64", "--local-crops", "0",
                 "--global-size", "32", "--precision", "fp32", "--num-workers", "0", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["skipped_images"] for x in lines] == [2]


def test_multicrop_items_name_the_files_they_skipped(tmp_path):
    from dinokit.data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop

    good = make_image(tmp_path / "a.png")
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    ds = MultiCropDataset([good, bad, bad, good], MultiCropAugmentation((0.5, 1), (0.2, 0.5), 0, 32, 16))
    items = [ds[i] for i in range(4)]
    assert [s for _, s in items] == [(), (1, 2), (2,), ()]
    _, skipped = collate_multicrop(items)
    assert sorted(set(skipped)) == [1, 2]


# -- --weights must be given --------------------------------------------------------------------
@pytest.fixture
def photos(tmp_path) -> Path:
    for i in range(4):
        make_image(tmp_path / "photos" / f"{i}.png", seed=i)
    return tmp_path / "photos"


@pytest.mark.parametrize(
    "args",
    [
        ["features", "--data", "{photos}", "--output", "{tmp}/feats.pt"],
        ["duplicates", "{photos}", "--output", "{tmp}/dups"],
        ["copydetect", "--data", "{tmp}/copydays", "--output", "{tmp}/cd"],
    ],
    ids=["features", "duplicates", "copydetect"],
)
def test_a_missing_weights_option_is_refused(args, photos, tmp_path):
    for block, name in (("original", "200000.jpg"), ("strong", "200001.jpg")):  # the least Copydays
        make_image(tmp_path / "copydays" / block / name, seed=1)
    r = run_cli([a.format(photos=photos, tmp=tmp_path) for a in args] + ["--quiet"])
    refused(r, "--weights", "dino_vits16", "'random'")
    assert r.output.count(". ") <= 1, r.output
    assert not (tmp_path / "feats.pt").exists()


def test_the_library_default_is_no_weights():
    from dinokit.checkpoints import prepare_backbone
    from dinokit.errors import DinokitError
    from dinokit.eval.copy_detection import CopyDetectionConfig
    from dinokit.eval.duplicates import DuplicatesConfig
    from dinokit.eval.features import FeatureSpec
    from dinokit.eval.retrieval import RetrievalConfig

    configs = [FeatureSpec(), CopyDetectionConfig(data=Path("x"), output=Path("y")),
               DuplicatesConfig(folder=Path("x"), output=Path("y")),
               RetrievalConfig(data=Path("x"), dataset="roxford5k", output=Path("y"))]  # fmt: skip
    for cfg in configs:
        assert cfg.weights is None
        with pytest.raises(DinokitError, match="'random'"):
            prepare_backbone(cfg)


def test_random_weights_by_name(photos, tmp_path):
    r = run_cli(["features", "--data", photos, "--output", tmp_path / "f.pt", "--weights", "random",
                 "--arch", "vit_tiny", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output


# -- a white first-frame mask -------------------------------------------------------------------
def test_a_white_first_mask_is_refused_or_taken_as_one_object(tmp_path, tiny2_weights):
    root = tiny_davis(tmp_path / "DAVIS", seqs=("clip",), n_frames=4)
    frames = root / "JPEGImages" / "480p" / "clip"
    labels = np.array(Image.open(root / "Annotations" / "480p" / "clip" / "00000.png"))
    white = tmp_path / "white.png"
    Image.fromarray((labels > 0).astype(np.uint8) * 255, mode="L").save(white)
    common = ["--weights", tiny2_weights, *DAVIS_COMMON]
    r = run_cli(["davis", "--frames", frames, "--first-mask", white, "--output", tmp_path / "o1", *common])
    refused(r, str(white), "--binary-mask", "255")
    assert not (tmp_path / "o1" / "clip").exists()
    r = run_cli(["davis", "--frames", frames, "--first-mask", white, "--binary-mask", "--output",
                 tmp_path / "o2", *common])  # fmt: skip
    assert r.exit_code == 0, r.output
    for t in range(4):
        out = np.array(Image.open(tmp_path / "o2" / "clip" / f"{t:05d}.png"))
        assert set(np.unique(out)) == {0, 1}, t  # the object is tracked into every frame
    # an all-background mask has nothing to track either
    empty = save_palette_png(np.zeros_like(labels), tmp_path / "empty.png")
    r = run_cli(["davis", "--frames", frames, "--first-mask", empty, "--output", tmp_path / "o3", *common])
    refused(r, str(empty), "no object")


def test_an_rgb_mask_message_says_how_to_save_a_palette_png(tmp_path, tiny2_weights):
    root = tiny_davis(tmp_path / "DAVIS", seqs=("clip",))
    rgb = tmp_path / "rgb.png"
    Image.open(root / "Annotations" / "480p" / "clip" / "00000.png").convert("RGB").save(rgb)
    r = run_cli(["davis", "--frames", root / "JPEGImages" / "480p" / "clip", "--first-mask", rgb,
                 "--weights", tiny2_weights, "--output", tmp_path / "o", *DAVIS_COMMON])  # fmt: skip
    refused(r, str(rgb), "mode='P'", "putpalette")


# -- non-finite features are never written ------------------------------------------------------
def test_features_refuses_non_finite_features(photos, tmp_path, tiny2_weights, monkeypatch):
    from dinokit.eval import features as features_module

    embed = features_module.Embedder.embed

    def overflowing(self, *args, **kwargs):  # what fp16 overflow gives
        fs = embed(self, *args, **kwargs)
        fs.features[1, 0] = torch.inf
        fs.features[2] = torch.nan
        return fs

    monkeypatch.setattr(features_module.Embedder, "embed", overflowing)
    out = tmp_path / "feats.pt"
    r = run_cli(["features", "--data", photos, "--output", out, "--weights", tiny2_weights, "--quiet"])
    refused(r, "non-finite", "2 of 4 rows")
    assert not out.exists()

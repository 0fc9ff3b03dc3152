"""Normalisation belongs to the weights: DINOv3's satellite weights get the DINOv3 README's SAT-493M
mean/std, a file that keeps its own is read, an unknown file says once which it assumed, and
--mean/--std override everywhere images are read."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torchvision import transforms as T

import dinokit
from dinokit.checkpoints import BackboneOptions, prepare_backbone
from dinokit.data.images import read_image
from dinokit.eval.features import Embedder, FeatureSpec, scan_images
from tests.helpers import make_image, run_cli

#: the DINOv3 README's transform for the SAT-493M weights, written out here
README_SAT_MEAN, README_SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


@pytest.fixture
def sat_file(tmp_path):
    """A SAT-style file: a plain backbone state dict under the released satellite file's name."""
    torch.manual_seed(0)
    path = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), path)
    return path


def _spec(weights, **kw):
    return FeatureSpec(weights=str(weights), resize=32, crop=32, batch_size=4, device="cpu", precision="fp32", **kw)


def test_satellite_weights_are_normalised_with_their_own_values(sat_file, tmp_path):
    images = tmp_path / "imgs"
    for i in range(3):
        make_image(images / "a" / f"{i}.png", seed=i)
    emb = Embedder(_spec(sat_file))
    assert emb.normalization.mean == README_SAT_MEAN and emb.normalization.std == README_SAT_STD
    fs = emb.embed(images)
    # the features equal the model on images normalised by hand with the README's numbers
    by_hand = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor()])
    x = torch.stack([by_hand(read_image(p).image) for p in scan_images(images).paths])
    x = (x - torch.tensor(README_SAT_MEAN).view(1, 3, 1, 1)) / torch.tensor(README_SAT_STD).view(1, 3, 1, 1)
    model = dinokit.load_backbone(sat_file)
    with torch.no_grad():
        assert torch.allclose(fs.features, model(x), atol=1e-5)
    assert fs.fingerprint["normalization"]["mean"] == list(README_SAT_MEAN)
    # ImageNet's numbers give other features: the normalisation did matter
    with torch.no_grad():
        x_in = (x * torch.tensor(README_SAT_STD).view(1, 3, 1, 1) + torch.tensor(README_SAT_MEAN).view(1, 3, 1, 1)
                - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        assert not torch.allclose(fs.features, model(x_in), atol=1e-3)


def test_a_file_keeps_its_own_values_and_options_override(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "own.pth"
    sd = dinokit.build_backbone("vit_tiny", 16, depth=1).state_dict()
    torch.save({"model": sd, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, path)
    model = prepare_backbone(BackboneOptions(weights=str(path)), _spec(path)).model
    assert model.normalization.mean == (0.5, 0.5, 0.5) and model.normalization.std == (0.25, 0.25, 0.25)
    model = prepare_backbone(BackboneOptions(weights=str(path), std=(0.1, 0.2, 0.3)), _spec(path)).model
    assert model.normalization.mean == (0.5, 0.5, 0.5) and model.normalization.std == (0.1, 0.2, 0.3)
    assert "--std" in model.normalization.source
    # released presets' names and random weights are ImageNet's, with no word about it
    assert prepare_backbone(_spec("random")).model.normalization.mean == (0.485, 0.456, 0.406)


def test_an_unknown_file_says_once_which_it_assumed(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "mystery.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=1), path)
    with caplog.at_level(logging.INFO, logger="dinokit"):
        a = dinokit.load_backbone(path)
        dinokit.load_backbone(path)
    said = [r.getMessage() for r in caplog.records if "normalised" in r.getMessage()]
    assert len(said) == 1 and "ImageNet" in said[0] and str(path) in said[0]
    assert a.normalization.mean == (0.485, 0.456, 0.406) and "assumed" in a.normalization.source
    # a released file under its own name is known: ImageNet's, nothing said
    released = tmp_path / "dinov2_vits14_pretrain.pth"
    released.write_bytes(path.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinokit"):
        b = dinokit.load_backbone(released)
    assert "released" in b.normalization.source and not [r for r in caplog.records if "normalised" in r.getMessage()]


def test_cli_records_the_normalisation_and_refuses_bad_values(sat_file, labelled_folder, tmp_path):
    small = ["--resize", "32", "--image-size", "32", "--batch-size", "6", "--quiet", "--device", "cpu"]
    out = tmp_path / "knn"
    r = run_cli(["knn", "--weights", sat_file, "--train", labelled_folder / "train", "--val", labelled_folder / "val",
                 "--output", out, "--k", "3", *small])
    assert r.exit_code == 0, r.output
    fp = json.loads((out / "metrics.json").read_text())["config"]["fingerprint"]
    assert fp["normalization"]["mean"] == list(README_SAT_MEAN) and "CLS" in fp["tokens"]
    r = run_cli(["knn", "--weights", sat_file, "--train", labelled_folder / "train", "--val", labelled_folder / "val",
                 "--output", tmp_path / "knn2", "--k", "3", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", *small])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "knn2" / "metrics.json").read_text())["config"]
    assert cfg["fingerprint"]["normalization"] == {"mean": [0.5] * 3, "std": [0.2] * 3, "source": "--mean/--std"}
    for bad, word in ((["--mean", "0.5,0.5"], "three values"), (["--std", "0.2,-0.1,0.2"], "positive"),
                      (["--mean", "0.5,1.5,0.5"], "[0, 1]"), (["--std", "a,b,c"], "numbers")):
        for command in ("features", "knn", "linear"):
            r = run_cli([command, "--weights", sat_file, "--output", tmp_path / "never", *bad])
            assert r.exit_code == 2, (command, bad, r.output)
            assert word in r.text and "Traceback" not in r.output and r.text.count("Error") == 1
    assert not (tmp_path / "never").exists()

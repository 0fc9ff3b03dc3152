"""`dinokit patches` end to end on tiny images: the pictures and arrays of every image at its own
aspect, the record of the fit, the generations with registers, and one sentence for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from tests.helpers import make_image, run_cli


def run(*args):
    return run_cli(["patches", *args])


def assert_one_sentence(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.text, result.output


def test_pictures_and_arrays_of_non_square_images(tmp_path, tiny2_weights):
    make_image(tmp_path / "in" / "wide.png", size=(70, 40), seed=1, color=(200, 30, 30))
    make_image(tmp_path / "in" / "sub" / "tall.jpg", size=(40, 90), seed=2, color=(30, 200, 30))
    make_image(tmp_path / "square.png", size=(48, 48), seed=3)
    out = tmp_path / "out"
    r = run(
        tmp_path / "in",
        tmp_path / "square.png",
        "-w",
        tiny2_weights,
        "--image-size",
        32,
        "--parts",
        3,
        "-o",
        out,
        "-q",
    )
    assert r.exit_code == 0, r.output
    # shorter side 32, the longer scaled and cropped to whole patches
    expect = {"wide": (2, 3), "tall": (4, 2), "square": (2, 2)}
    for name, (h, w) in expect.items():
        d = out / name
        assert np.load(d / "pca.npy").shape == (h, w, 3)
        assert np.load(d / "pca.npy").dtype == np.float32
        assert np.load(d / "foreground.npy").dtype == bool
        parts = np.load(d / "parts.npy")
        assert parts.shape == (h, w) and parts.min() >= 0 and parts.max() < 3
        assert np.load(d / "first_component.npy").shape == (h, w)
        for pic in ("pca.png", "foreground.png", "first-component.png", "parts.png"):
            assert Image.open(d / pic).size == (16 * w, 16 * h), pic
        assert (d / "panel.png").is_file()
    assert (out / "overview.png").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] == 3 and m["skipped_images"] == 0
    first = m["first_component"]
    assert first["threshold_method"] == "otsu" and 0 < first["threshold"] < 1
    assert m["colour_components"] == [1, 2, 3] and m["parts"]["k"] == 3
    assert sum(m["parts"]["patches_per_part"]) == m["patches"] == 6 + 8 + 4
    assert m["per_image"]["tall"]["grid"] == [4, 2] and m["per_image"]["tall"]["input_size"] == [32, 64]
    assert m["config"]["parts"] == 3 and m["config"]["foreground"] is True
    fg = np.concatenate([np.load(out / n / "foreground.npy").ravel() for n in expect])
    assert (
        m["foreground_fraction"]
        == pytest.approx(fg.mean())
        == pytest.approx(m["first_component_above_threshold"])
    )
    # the pictures' foreground is the recorded threshold applied to the first component
    for name in expect:
        f = np.load(out / name / "first_component.npy")
        np.testing.assert_array_equal(np.load(out / name / "foreground.npy"), f > first["threshold"])

    r = run(tmp_path / "square.png", "-w", tiny2_weights, "--image-size", 32, "-o", out, "-q")
    assert_one_sentence(r, "already holds results", "--overwrite")
    r = run(
        tmp_path / "square.png",
        "-w",
        tiny2_weights,
        "--image-size",
        32,
        "--threshold",
        0.5,
        "--parts",
        2,
        "--no-foreground",
        "-o",
        out,
        "-q",
        "--overwrite",
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["first_component"]["threshold"] == 0.5 and m["first_component"]["threshold_method"] == "given"
    assert "every patch" in m["colours"] and np.load(out / "square" / "foreground.npy").all()
    assert m["foreground_fraction"] == 1.0 and 0 <= m["first_component_above_threshold"] <= 1
    assert "every patch coloured" in r.text
    r = run(
        tmp_path / "square.png",
        "-w",
        tiny2_weights,
        "--image-size",
        32,
        "--parts",
        2,
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "-o",
        out,
        "-q",
        "--overwrite",
    )
    assert r.exit_code == 0, r.output
    norm = json.loads((out / "metrics.json").read_text())["config"]["normalization"]
    assert norm["mean"] == [0.5] * 3 and norm["std"] == [0.25] * 3


def test_unreadable_images_are_skipped_and_counted_or_stop_with_strict(tmp_path, tiny2_weights):
    make_image(tmp_path / "in" / "a.png", size=(40, 40))
    (tmp_path / "in" / "broken.png").write_bytes(b"not a picture")
    r = run(
        tmp_path / "in", "-w", tiny2_weights, "--image-size", 32, "--parts", 2, "-o", tmp_path / "out", "-q"
    )
    assert r.exit_code == 0, r.output
    assert "1 unreadable image skipped" in r.text
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["images"] == 1 and m["skipped_images"] == 1
    r = run(
        tmp_path / "in", "-w", tiny2_weights, "--image-size", 32, "-o", tmp_path / "out2", "-q", "--strict"
    )
    assert_one_sentence(r, "broken.png")


def test_refusals_in_one_sentence(tmp_path, tiny2_weights):
    make_image(tmp_path / "a.png", size=(400, 40))
    r = run(
        tmp_path / "a.png",
        "-w",
        tiny2_weights,
        "--image-size",
        320,
        "--max-tokens",
        100,
        "-o",
        tmp_path / "o",
        "-q",
    )
    assert_one_sentence(r, "--image-size")
    assert not (tmp_path / "o").exists()
    r = run(tmp_path / "missing", "-w", tiny2_weights, "-o", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = run(tmp_path / "a.png", "-w", "random", "--arch", "resnet50", "-o", tmp_path / "o", "-q")
    assert_one_sentence(r, "ViT")
    r = run(
        tmp_path / "a.png", "-w", tiny2_weights, "--image-size", 32, "--parts", 50, "-o", tmp_path / "o", "-q"
    )
    assert_one_sentence(r, "--parts 50")
    assert not (tmp_path / "o").exists()  # a run refused on its images leaves no empty folder


@pytest.mark.parametrize("arch", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_generations_with_registers_give_the_patch_grid(tmp_path, arch):
    torch.manual_seed(0)
    model = dinokit.build_backbone(arch, embed_dim=32, depth=1, num_heads=1)
    weights = dinokit.save_backbone(model, tmp_path / "w.pth") or tmp_path / "w.pth"
    p = model.patch_size
    make_image(tmp_path / "a.png", size=(60, 40))
    r = run(
        tmp_path / "a.png", "-w", weights, "--image-size", 2 * p, "--parts", 2, "-o", tmp_path / "out", "-q"
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "out" / "a" / "parts.npy").shape == (2, 3)  # 2p x 3p: no register entries
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["arch"] == arch

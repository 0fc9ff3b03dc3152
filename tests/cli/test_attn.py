"""`dinokit attn` end to end on tiny images in a temporary folder: the maps, evaluation and video
forms, and one clear sentence (exit code 2) for each kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dinokit
from tests.helpers import coco_file, coins_ground_truth, run_cli


def run(*args):
    return run_cli(["attn", *args])


def assert_one_sentence(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Error:" in result.output
    for n in needles:
        assert n in " ".join(result.output.split()), result.output


def _image(path, size=(48, 40), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# -- maps ------------------------------------------------------------------------------------------
def test_maps_form_writes_every_picture_and_the_raw_maps(tmp_path, tiny2_weights):
    _image(tmp_path / "in" / "a.png", seed=1)
    _image(tmp_path / "in" / "sub" / "b.jpg", seed=2)
    _image(tmp_path / "other" / "c.png", size=(70, 36), seed=3)
    out = tmp_path / "out"
    r = run(
        tmp_path / "in",
        tmp_path / "other" / "*.png",
        "--weights",
        tiny2_weights,
        "--image-size",
        64,
        "--output",
        out,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    for name in ("a", "b", "c"):
        d = out / name
        files = {p.name for p in d.iterdir()}
        assert {"image.png", "attn-mean.png", "masks.png", "grid.png", "maps.npz"} <= files
        assert {f"attn-head{h}.png" for h in range(3)} <= files
        z = np.load(d / "maps.npz")
        assert z["attention"].shape == (3, 4, 4) and z["attention"].dtype == np.float32
        assert z["masks"].shape == (3, 4, 4) and z["masks"].dtype == bool
        np.testing.assert_allclose(z["mean"], z["attention"].mean(0), rtol=1e-6)
        assert int(z["patch_size"]) == 16 and float(z["threshold"]) == 0.6
        # each head's mask holds at least 60% of its attention mass
        a, m = z["attention"].reshape(3, -1), z["masks"].reshape(3, -1)
        assert ((a * m).sum(1) >= 0.6 * a.sum(1) - 1e-6).all()
        assert Image.open(d / "attn-head0.png").size == (64, 64)  # upsampled by the patch size
        assert {f"overlay-head{h}.png" for h in range(3)} | {"overlay-mean.png"} <= files
        w, h = Image.open(
            tmp_path
            / ("other" if name == "c" else "in")
            / ("c.png" if name == "c" else "a.png" if name == "a" else "sub/b.jpg")
        ).size
        # the square network input is shown at the photo's proportions: height 64, width 64 * w / h
        assert Image.open(d / "overlay-head0.png").size == (round(64 * w / h), 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["config"]["threshold"] == 0.6


def test_maps_form_native_size_and_overwrite(tmp_path, tiny2_weights):
    _image(tmp_path / "x.png", size=(70, 36))
    out = tmp_path / "out"
    r = run(tmp_path / "x.png", "-w", tiny2_weights, "--image-size", 0, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert np.load(out / "x" / "maps.npz")["attention"].shape == (3, 2, 4)  # 36x70 cropped to 32x64
    r = run(tmp_path / "x.png", "-w", tiny2_weights, "-o", out, "-q")
    assert_one_sentence(r, "already holds results", "--overwrite")
    r = run(tmp_path / "x.png", "-w", tiny2_weights, "--image-size", 32, "-o", out, "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    assert np.load(out / "x" / "maps.npz")["attention"].shape == (3, 2, 2)


# the first colours of the heads' masks (the familiar categorical palette), written out here
HEAD_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)  # viridis at 0 and 1


def test_keep_aspect_pictures_overlays_and_key(tmp_path, tiny2_weights):
    _image(tmp_path / "x.png", size=(70, 36))
    out = tmp_path / "out"
    r = run(tmp_path / "x.png", "-w", tiny2_weights, "--image-size", 64, "--keep-aspect", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    d = out / "x"
    # shorter side 36 -> 64, longer side int(64 * 70 / 36) = 124, cropped to 7 patches of 16 = 112
    z = np.load(d / "maps.npz")
    assert z["attention"].shape == (3, 4, 7)
    image = np.asarray(Image.open(d / "image.png"), np.float64)
    assert image.shape == (64, 112, 3)
    for h in range(3):
        overlay = np.asarray(Image.open(d / f"overlay-head{h}.png"), np.float64)
        assert overlay.shape == (64, 112, 3)  # at the network's pixels: nothing stretched
        a = z["attention"][h]
        for (i, j), colour in (
            (np.unravel_index(a.argmax(), a.shape), VIRIDIS_HIGH),
            (np.unravel_index(a.argmin(), a.shape), VIRIDIS_LOW),
        ):
            y, x = 16 * i + 8, 16 * j + 8
            want = 0.4 * image[y, x] + 0.6 * np.asarray(colour)
            assert np.abs(overlay[y, x] - want).max() <= 2.5
    # masks.png: the heads' masks with a key of the head colours below the picture
    masks = np.asarray(Image.open(d / "masks.png"))
    assert masks.shape[1] >= 220
    key = masks[masks.shape[1] * 64 // 112 :]
    for colour in HEAD_COLOURS:
        assert (key == colour).all(-1).sum() >= 50, colour
    grid = np.asarray(Image.open(d / "grid.png"))
    assert grid.shape[1] > grid.shape[0]  # input, mean and masks in a row, the 3 heads in a row below
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["keep_aspect"] is True and "aspect kept" in metrics["config"]["resize"]


def test_eval_form_keep_aspect_scores_labels_at_the_same_pixels(tmp_path, tiny2_weights):
    image_path, mask_path, labels = coins_ground_truth(tmp_path)
    out = tmp_path / "eval"
    r = run(
        "--images",
        image_path.parent,
        "--masks",
        mask_path.parent,
        "-w",
        tiny2_weights,
        "--image-size",
        64,
        "--keep-aspect",
        "-o",
        out,
        "-q",
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["keep_aspect"] is True and m["objects"] == 24
    assert 0.0 < m["jaccard"] <= 1.0
    pic = Image.open(next((out / "pictures").glob("best-1-*.png")))
    assert pic.width > pic.height  # ground truth and masks side by side, each at the photo's aspect


# -- evaluation ------------------------------------------------------------------------------------
def test_eval_form_on_coins_photograph(tmp_path, tiny2_weights):
    image_path, mask_path, labels = coins_ground_truth(tmp_path)
    out = tmp_path / "eval"
    r = run(
        "--images",
        image_path.parent,
        "--masks",
        mask_path.parent,
        "-w",
        tiny2_weights,
        "--image-size",
        128,
        "-o",
        out,
        "-q",
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert {"jaccard", "jaccard_per_head", "best_head", "images", "objects", "config"} <= set(m)
    assert m["images"] == 1 and m["objects"] >= 20
    assert 0.0 <= m["jaccard"] <= 1.0 and len(m["jaccard_per_head"]) == 3
    assert m["jaccard"] >= max(m["jaccard_per_head"]) - 1e-12  # best head per object >= any single head
    assert m["best_head"] == int(np.argmax(m["jaccard_per_head"]))
    assert m["config"]["image_size"] == 128 and m["config"]["ignore_void"] is False
    pics = sorted(p.name for p in (out / "pictures").iterdir())
    assert pics == ["best-1-coins.png", "worst-1-coins.png"]
    assert (out / "per_image.csv").read_text().splitlines()[1].startswith("coins,")


def test_eval_form_on_synth_classify_masks(tmp_path, tiny2_weights):
    data = tmp_path / "synth"
    r = run_cli(
        [
            "synth",
            "classify",
            "--output",
            str(data),
            "--classes",
            "2",
            "--per-class",
            "5",
            "--image-size",
            "32",
            "--quiet",
        ]
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval"
    r = run(
        "--images",
        data / "val",
        "--masks",
        data / "masks" / "val",
        "-w",
        tiny2_weights,
        "--image-size",
        32,
        "-o",
        out,
        "-q",
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    n_val = len(list((data / "val").rglob("*.png")))
    assert m["images"] == n_val and m["objects"] == n_val  # one object per synthetic image


def test_eval_form_coco_instances_and_classes(tmp_path, tiny2_weights):
    ann, _, _ = coco_file(tmp_path)
    # the annotated image is 18x20; evaluate at 32x32
    for objects, n in (("instance", 3), ("class", 2)):
        out = tmp_path / f"eval-{objects}"
        r = run(
            "--images",
            tmp_path / "images",
            "--coco",
            ann,
            "--objects",
            objects,
            "-w",
            tiny2_weights,
            "--image-size",
            32,
            "--ignore-void",
            "-o",
            out,
            "-q",
        )
        assert r.exit_code == 0, r.output
        m = json.loads((out / "metrics.json").read_text())
        assert m["objects"] == n and m["config"]["objects"] == objects and m["config"]["ignore_void"] is True


# -- video -----------------------------------------------------------------------------------------
def test_video_form_frames_folder_to_gif(tmp_path, tiny2_weights):
    for k in range(4):
        _image(tmp_path / "frames" / f"{k:03d}.jpg", size=(60, 40), seed=k)
    out = tmp_path / "video"
    r = run(
        "--video", tmp_path / "frames", "-w", tiny2_weights, "--image-size", 32, "-o", out, "-q", "--fps", 4
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "maps").iterdir()) == [
        f"{k:03d}.png" for k in range(4)
    ]  # frame names
    assert len(list((out / "masks").iterdir())) == 4
    gif = Image.open(out / "attention.gif")
    assert gif.n_frames == 4 and gif.info.get("duration") == 250
    # frames keep the aspect ratio: shorter side 32 -> 48x32 (cropped to patches), map + overlay side by side
    assert Image.open(out / "maps" / "000.png").size == (48, 32)
    assert json.loads((out / "metrics.json").read_text())["frames"] == 4


def test_video_form_keeps_the_frame_names(tmp_path, tiny2_weights):
    names = ["clip_b", "clip_a", "later"]
    for k, n in enumerate(names):
        _image(tmp_path / "frames" / f"{n}.jpg", size=(40, 32), seed=k)
    out = tmp_path / "video"
    r = run("--video", tmp_path / "frames", "-w", tiny2_weights, "--image-size", 32, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    expected = sorted(f"{n}.png" for n in names)
    assert sorted(p.name for p in (out / "maps").iterdir()) == expected
    assert sorted(p.name for p in (out / "masks").iterdir()) == expected


def test_video_form_mp4_round_trip(tmp_path, tiny2_weights):
    av = pytest.importorskip("av")
    for k in range(3):
        _image(tmp_path / "frames" / f"{k:03d}.png", size=(48, 48), seed=k)
    out = tmp_path / "video"
    r = run("--video", tmp_path / "frames", "-w", tiny2_weights, "--image-size", 32, "-o", out, "-q", "--mp4")
    assert r.exit_code == 0, r.output
    # the MP4 itself is a video the next run can read frame by frame
    r = run(
        "--video",
        out / "attention.mp4",
        "-w",
        tiny2_weights,
        "--image-size",
        32,
        "-o",
        tmp_path / "again",
        "-q",
    )
    assert r.exit_code == 0, r.output
    with av.open(str(out / "attention.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
    assert len(list((tmp_path / "again" / "maps").iterdir())) == 3


# -- bad input: one sentence, exit code 2 ------------------------------------------------------------
def test_bad_inputs_are_one_sentence(tmp_path, tiny2_weights):
    o = tmp_path / "out"
    # a missing path
    assert_one_sentence(run(tmp_path / "nope.png", "-w", tiny2_weights, "-o", o), "does not exist")
    # a file that is not an image
    (tmp_path / "notes.png").write_text("hello")
    assert_one_sentence(run(tmp_path / "notes.png", "-w", tiny2_weights, "-o", o), "is not a readable image")
    # an image smaller than one patch (with or without resizing)
    _image(tmp_path / "tiny" / "t.png", size=(8, 8))
    assert_one_sentence(
        run(tmp_path / "tiny" / "t.png", "-w", tiny2_weights, "-o", o, "--image-size", 0),
        "smaller than one 16x16 patch",
    )
    assert_one_sentence(
        run(tmp_path / "tiny" / "t.png", "-w", tiny2_weights, "-o", o), "smaller than one 16x16 patch"
    )
    # a mask whose size differs from its image
    _image(tmp_path / "img" / "a.png", size=(40, 40))
    (tmp_path / "m").mkdir()
    Image.fromarray(np.ones((30, 40), np.uint8)).save(tmp_path / "m" / "a.png")
    assert_one_sentence(
        run("--images", tmp_path / "img", "--masks", tmp_path / "m", "-w", tiny2_weights, "-o", o, "-q"),
        "is 40x30 pixels but its image",
    )
    # images without masks
    _image(tmp_path / "img2" / "a.png")
    _image(tmp_path / "img2" / "b.png")
    (tmp_path / "m2").mkdir()
    Image.fromarray(np.ones((40, 48), np.uint8)).save(tmp_path / "m2" / "a.png")
    assert_one_sentence(
        run("--images", tmp_path / "img2", "--masks", tmp_path / "m2", "-w", tiny2_weights, "-o", o),
        "1 of 2 images",
        "have no mask",
    )
    # an annotation file that is not COCO
    (tmp_path / "ann.json").write_text(json.dumps({"info": {}, "licenses": []}))
    assert_one_sentence(
        run("--images", tmp_path / "img", "--coco", tmp_path / "ann.json", "-w", tiny2_weights, "-o", o),
        "is not a COCO annotation file",
    )
    # forms mixed or missing, bad options
    assert_one_sentence(run("-w", tiny2_weights, "-o", o), "Give images")
    assert_one_sentence(
        run(tmp_path / "img", "--video", tmp_path / "img", "-w", tiny2_weights, "-o", o), "one form"
    )
    assert_one_sentence(
        run("--images", tmp_path / "img", "-w", tiny2_weights, "-o", o), "exactly one of --masks"
    )
    assert_one_sentence(
        run(tmp_path / "img", "--attention-mass", 1.5, "-w", tiny2_weights, "-o", o), "--attention-mass"
    )
    assert_one_sentence(run("--video", tmp_path / "nothing", "-w", tiny2_weights, "-o", o), "does not exist")
    # nothing was created by the refused runs
    assert not o.exists()


def test_video_file_without_pyav_is_one_sentence(tmp_path, tiny2_weights, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as if PyAV were not installed
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    r = run("--video", tmp_path / "clip.mp4", "-w", tiny2_weights, "-o", tmp_path / "o")
    assert_one_sentence(r, "needs PyAV", "dinokit[video]")
    for k in range(2):
        _image(tmp_path / "frames" / f"{k}.png", seed=k)
    r = run(
        "--video",
        tmp_path / "frames",
        "--mp4",
        "-w",
        tiny2_weights,
        "-o",
        tmp_path / "o2",
        "--image-size",
        32,
    )
    assert_one_sentence(r, "needs PyAV")


def test_random_weights_are_reproducible_with_seed(tmp_path):
    from dinokit.eval.attention import cls_attention_maps, preprocess
    from dinokit.runtime import seed_everything

    _image(tmp_path / "a.png", size=(32, 32))
    r = run(
        tmp_path / "a.png",
        "-w",
        "random",
        "--arch",
        "vit_tiny",
        "--image-size",
        32,
        "--seed",
        3,
        "--precision",
        "fp32",
        "-o",
        tmp_path / "o",
        "-q",
    )  # fp32: what the maps are held against
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "o" / "a" / "maps.npz")["attention"]
    seed_everything(3)
    model = dinokit.load_backbone("random", arch="vit_tiny")
    x, _ = preprocess(Image.open(tmp_path / "a.png").convert("RGB"), 32, 16)
    np.testing.assert_allclose(got, cls_attention_maps(model, x[None])[0].numpy(), rtol=1e-5, atol=1e-7)


def test_unreadable_images_are_skipped_and_counted_or_stop_with_strict(tmp_path, tiny2_weights):
    """The rule of every command: a truncated JPEG among good images is skipped and counted; --strict
    stops at it with a sentence naming it, and writes nothing."""
    _image(tmp_path / "in" / "a.png", seed=1)
    _image(tmp_path / "in" / "b.jpg", seed=2)
    good = (tmp_path / "in" / "b.jpg").read_bytes()
    (tmp_path / "in" / "broken.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    out = tmp_path / "out"
    r = run(tmp_path / "in", "--weights", tiny2_weights, "--image-size", 64, "--output", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["skipped_images"] == 1
    assert metrics["unreadable"] == [str(tmp_path / "in" / "broken.jpg")]
    assert "1 unreadable image skipped" in r.text
    strict = tmp_path / "strict"
    r = run(tmp_path / "in", "--weights", tiny2_weights, "--image-size", 64, "--output", strict, "--strict")
    assert_one_sentence(r, "broken.jpg", "is not a readable image")
    assert not strict.exists()

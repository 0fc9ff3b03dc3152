"""`dinokit synth classify|video|copydays` end to end: the layout each writes, exact masks, determinism,
and the options each refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.data import synth
from tests.helpers import file_bytes, run_cli


def invoke(*args: str):
    return run_cli(args)


def test_classify_cli_layout_and_masks(tmp_path):
    out = tmp_path / "shapes"
    r = invoke(
        "synth",
        "classify",
        "--output",
        str(out),
        "--classes",
        "3",
        "--per-class",
        "4",
        "--val-fraction",
        "0.25",
        "--image-size",
        "32",
        "--seed",
        "5",
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert "circle" in r.output and "train" in r.output
    classes = ["circle", "square", "triangle"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(classes)
    assert sorted(p.name for p in (out / "val").iterdir()) == sorted(classes)
    for ci, c in enumerate(classes):
        train = sorted(p.name for p in (out / "train" / c).iterdir())
        val = sorted(p.name for p in (out / "val" / c).iterdir())
        assert train == ["00000.png", "00001.png", "00002.png"] and val == ["00003.png"]
        for split, names in (("train", train), ("val", val)):
            for name in names:
                img = Image.open(out / split / c / name)
                mask = Image.open(out / "masks" / split / c / name)
                assert img.mode == "RGB" and img.size == (32, 32)
                assert mask.mode == "L" and mask.size == (32, 32)
                m = np.asarray(mask)
                assert set(np.unique(m)) == {0, 1}
                # the files are what the drawing function makes for this (seed, class, index)
                i = int(name[:-4])
                ref_img, ref_mask = synth.draw_classify_image(synth.item_rng(5, "classify", ci, i), c, 32)
                np.testing.assert_array_equal(np.asarray(img), ref_img)
                np.testing.assert_array_equal(m, ref_mask.astype(np.uint8))
    meta = (out / "synth.json").read_text()
    assert '"classify"' in meta


def test_classify_refuses_nonempty_output_and_bad_options(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = invoke(
        "synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "1", "--image-size", "16"
    )
    assert r.exit_code == 2 and "--overwrite" in r.output
    # a folder synth did not write is refused even with --overwrite: nothing of the user's is deleted
    r = invoke(
        "synth",
        "classify",
        "--output",
        str(out),
        "--classes",
        "1",
        "--per-class",
        "2",
        "--image-size",
        "16",
        "--overwrite",
        "-q",
    )
    assert r.exit_code == 2 and "did not write" in r.output
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    r = invoke(
        "synth",
        "classify",
        "--output",
        str(out),
        "--classes",
        "1",
        "--per-class",
        "2",
        "--image-size",
        "16",
        "-q",
    )
    assert r.exit_code == 0, r.output
    (out / "keep.txt").write_text("x")
    r = invoke(
        "synth",
        "classify",
        "--output",
        str(out),
        "--classes",
        "1",
        "--per-class",
        "2",
        "--image-size",
        "16",
        "--overwrite",
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert (out / "keep.txt").exists()  # only the generator's own folders are replaced
    r = invoke("synth", "classify", "--output", str(tmp_path / "p"), "--classes", "500")
    assert r.exit_code == 2 and "classes" in r.output and "Traceback" not in r.output


def test_classify_simple_style_files_and_exact_masks(tmp_path):
    out = tmp_path / "simple"
    r = invoke(
        "synth",
        "classify",
        "--output",
        str(out),
        "--classes",
        "3",
        "--per-class",
        "2",
        "--val-fraction",
        "0.5",
        "--image-size",
        "32",
        "--seed",
        "4",
        "--style",
        "simple",
        "-q",
    )
    assert r.exit_code == 0, r.output
    for ci, c in enumerate(["circle", "square", "triangle"]):
        for split, i in (("train", 0), ("val", 1)):
            img = np.asarray(Image.open(out / split / c / f"{i:05d}.png"))
            m = np.asarray(Image.open(out / "masks" / split / c / f"{i:05d}.png"))
            rng = synth.item_rng(4, "classify", ci, i)
            rng.random()  # consume the draw that decides class colours, which comes first
            ref_img, ref_mask = synth.draw_simple_image(rng, c, 32)
            np.testing.assert_array_equal(img, ref_img)
            np.testing.assert_array_equal(m, ref_mask.astype(np.uint8))
    assert '"style": "simple"' in (out / "synth.json").read_text()
    # the default style is still the cluttered one, image for image
    d = synth.make_classify_dataset(tmp_path / "d", classes=1, per_class=1, size=32, seed=4, val_fraction=0.0)
    ref, _ = synth.draw_classify_image(synth.item_rng(4, "classify", 0, 0), "circle", 32)
    np.testing.assert_array_equal(np.asarray(Image.open(d.train_dir / "circle" / "00000.png")), ref)


def test_classify_style_options_are_checked(tmp_path):
    r = invoke("synth", "classify", "--output", str(tmp_path / "a"), "--style", "fancy", "--per-class", "1")
    assert r.exit_code == 2 and "--style" in r.output and "Traceback" not in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "b"), "--class-colour", "0.5", "--per-class", "1"
    )
    assert r.exit_code == 2 and "--style simple" in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "c"), "--style", "simple", "--class-colour", "2"
    )
    assert r.exit_code == 2 and "--class-colour" in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "d"), "--class-texture", "0.5", "--per-class", "1"
    )
    assert r.exit_code == 2 and "--style simple" in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "e"), "--style", "simple", "--class-texture", "-1"
    )
    assert r.exit_code == 2 and "--class-texture" in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "f"), "--background", "grey", "--per-class", "1"
    )
    assert r.exit_code == 2 and "--style simple" in r.output
    r = invoke(
        "synth", "classify", "--output", str(tmp_path / "g"), "--style", "simple", "--background", "blue"
    )
    assert r.exit_code == 2 and "--background" in r.output and "random, grey" in r.output
    assert not any((tmp_path / n).exists() for n in "abcdefg")


def test_grey_background_shares_one_colour_and_keeps_the_objects(tmp_path):
    """--background grey: every background pixel (mask 0) is grey (R = G = B: the gradient and noise
    move the three channels together), where random backgrounds are coloured; objects are placed
    exactly where the random-background set places them (same masks)."""
    sets = {}
    for bg in ("random", "grey"):
        out = tmp_path / bg
        r = invoke(
            "synth",
            "classify",
            "--output",
            str(out),
            "--classes",
            "3",
            "--per-class",
            "6",
            "--image-size",
            "48",
            "--style",
            "simple",
            "--class-texture",
            "1.0",
            "--background",
            bg,
            "--seed",
            "3",
            "-q",
        )
        assert r.exit_code == 0, r.output
        spreads, masks = [], []
        for img in sorted((out / "train").rglob("*.png")):
            rel = img.relative_to(out / "train")
            mask = np.asarray(Image.open(out / "masks" / "train" / rel)) > 0
            pixels = np.asarray(Image.open(img).convert("RGB"), dtype=np.float64)[~mask]
            spreads.append((pixels.max(axis=1) - pixels.min(axis=1)).mean())  # channel spread per pixel
            masks.append(mask)
        sets[bg] = (np.array(spreads), masks)
    assert sets["grey"][0].max() == 0
    assert sets["random"][0].mean() > 20
    assert all((a == b).all() for a, b in zip(sets["grey"][1], sets["random"][1]))


def test_video_cli_davis_layout(tmp_path):
    from dinokit.data.palette import DAVIS_PALETTE
    from dinokit.data.synth_video import draw_sequence

    out = tmp_path / "davis"
    r = invoke(
        "synth",
        "video",
        "--output",
        str(out),
        "--sequences",
        "2",
        "--frames",
        "4",
        "--height",
        "64",
        "--width",
        "96",
        "--objects",
        "1-3",
        "--seed",
        "3",
        "-q",
    )
    assert r.exit_code == 0, r.output
    names = (out / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(names) == 2 and len(set(names)) == 2
    assert sorted(p.name for p in (out / "JPEGImages" / "480p").iterdir()) == sorted(names)
    assert sorted(p.name for p in (out / "Annotations" / "480p").iterdir()) == sorted(names)
    for s, name in enumerate(names):
        jpgs = sorted(p.name for p in (out / "JPEGImages" / "480p" / name).iterdir())
        pngs = sorted(p.name for p in (out / "Annotations" / "480p" / name).iterdir())
        assert jpgs == [f"{i:05d}.jpg" for i in range(4)] and pngs == [f"{i:05d}.png" for i in range(4)]
        ref = draw_sequence(3, s, 4, 64, 96, (1, 3))
        assert ref.name == name and 1 <= ref.n_objects <= 3
        for i in range(4):
            frame = Image.open(out / "JPEGImages" / "480p" / name / jpgs[i])
            ann = Image.open(out / "Annotations" / "480p" / name / pngs[i])
            assert frame.format == "JPEG" and frame.mode == "RGB" and frame.size == (96, 64)
            assert ann.mode == "P" and ann.size == (96, 64)
            assert ann.getpalette()[: 3 * 8] == DAVIS_PALETTE[: 3 * 8]
            labels = np.asarray(ann)
            np.testing.assert_array_equal(labels, ref.labels[i])
            assert labels.max() <= ref.n_objects
            # JPEG is lossy, but only a little
            assert np.abs(np.asarray(frame, np.float32) - ref.frames[i]).mean() < 12
        # every object is visible in the first frame (the one a tracker is given)
        assert set(np.unique(ref.labels[0])) == set(range(ref.n_objects + 1))


def test_video_is_deterministic_and_checks_options(tmp_path):
    from dinokit.data.synth_video import make_video_dataset, parse_object_range

    kw = dict(sequences=1, frames=3, height=32, width=48)
    make_video_dataset(tmp_path / "a", seed=1, **kw)
    make_video_dataset(tmp_path / "b", seed=1, **kw)
    make_video_dataset(tmp_path / "c", seed=2, **kw)
    a, b, c = (file_bytes(tmp_path / x) for x in "abc")
    assert a == b and a != c
    assert parse_object_range("2") == (2, 2) and parse_object_range("1-3") == (1, 3)
    for bad in ("3-1", "0", "x", "1-99"):
        r = invoke(
            "synth",
            "video",
            "--output",
            str(tmp_path / "bad"),
            "--objects",
            bad,
            "--frames",
            "2",
            "--height",
            "32",
            "--width",
            "32",
        )
        assert r.exit_code == 2 and "--objects" in r.output and "Traceback" not in r.output


def _thumb(path_or_img, side: int = 24) -> np.ndarray:
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR), np.float32)


@pytest.fixture(scope="module")
def copydays_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cd") / "set"
    r = invoke(
        "synth",
        "copydays",
        "--output",
        str(out),
        "--originals",
        "6",
        "--distractors",
        "3",
        "--whitening",
        "2",
        "--image-size",
        "64",
        "--seed",
        "4",
        "-q",
    )
    assert r.exit_code == 0, r.output
    return out


def test_copydays_layout_and_names(copydays_root):
    from dinokit.data.synth_copydays import CROP_PERCENTS, JPEG_QUALITIES

    cd = copydays_root / "copydays"
    assert sorted(p.name for p in cd.iterdir()) == ["crops", "jpegqual", "original", "strong"]
    originals = sorted(p.name for p in (cd / "original").iterdir())
    assert originals == [f"{2000 + g:04d}00.jpg" for g in range(6)]
    assert sorted(int(p.name) for p in (cd / "jpegqual").iterdir()) == list(JPEG_QUALITIES)
    assert sorted(int(p.name) for p in (cd / "crops").iterdir()) == list(CROP_PERCENTS)
    for block in [f"jpegqual/{q}" for q in JPEG_QUALITIES] + [f"crops/{c}" for c in CROP_PERCENTS]:
        assert sorted(p.name for p in (cd / block).iterdir()) == originals, block
    strong = sorted(p.stem for p in (cd / "strong").iterdir())
    groups = {o[:4] for o in originals}
    per_group: dict[str, list[int]] = {}
    for s in strong:
        assert len(s) == 6 and s[:4] in groups
        per_group.setdefault(s[:4], []).append(int(s[4:]))
    for ks in per_group.values():  # copies numbered 01, 02, ... and at most 3 per original
        assert ks == list(range(1, len(ks) + 1)) and len(ks) <= 3
    assert len(list((copydays_root / "distractors").iterdir())) == 3
    assert len(list((copydays_root / "whitening").iterdir())) == 2
    for p in cd.rglob("*.jpg"):
        assert Image.open(p).format == "JPEG"


def test_copydays_crops_remove_the_stated_area(copydays_root):
    cd = copydays_root / "copydays"
    for o in sorted((cd / "original").iterdir()):
        orig = Image.open(o).convert("RGB")
        w, h = orig.size
        assert max(w, h) == 64
        for c in (10, 50, 80):
            crop = Image.open(cd / "crops" / str(c) / o.name).convert("RGB")
            kept = crop.width * crop.height / (w * h)
            assert abs(kept - (1 - c / 100)) < 0.06, (c, kept)
            # it is the central part of the original
            x0, y0 = (w - crop.width) // 2, (h - crop.height) // 2
            centre = np.asarray(orig.crop((x0, y0, x0 + crop.width, y0 + crop.height)), np.float32)
            assert np.abs(centre - np.asarray(crop, np.float32)).mean() < 6


def test_copydays_copies_point_to_their_original(copydays_root):
    """Every jpegqual and mild-crop copy is nearest (in pixels) to the original of the same name; JPEG
    damage grows as the quality falls; strong copies really are changed."""
    cd = copydays_root / "copydays"
    originals = sorted((cd / "original").iterdir())
    thumbs = np.stack([_thumb(o) for o in originals])
    for block in ["jpegqual/3", "jpegqual/30", "jpegqual/75", "crops/10"]:
        for i, o in enumerate(originals):
            d = np.abs(thumbs - _thumb(cd / block / o.name)).mean(axis=(1, 2, 3))
            assert d.argmin() == i, (block, o.name)
    for o in originals:
        ref = np.asarray(Image.open(o).convert("RGB"), np.float32)
        err = [
            np.abs(
                np.asarray(Image.open(cd / "jpegqual" / str(q) / o.name).convert("RGB"), np.float32) - ref
            ).mean()
            for q in (3, 20, 75)
        ]
        assert err[0] > err[1] > err[2]
    for s in (cd / "strong").iterdir():
        orig = cd / "original" / f"{s.name[:4]}00.jpg"
        assert np.abs(_thumb(s) - _thumb(orig)).mean() > 3, s.name


def test_copydays_images_are_distinct(copydays_root):
    cd = copydays_root / "copydays"
    paths = (
        sorted((cd / "original").iterdir())
        + sorted((copydays_root / "distractors").iterdir())
        + sorted((copydays_root / "whitening").iterdir())
    )
    t = np.stack([_thumb(p) for p in paths])
    d = np.abs(t[:, None] - t[None]).mean(axis=(2, 3, 4))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 10  # a JPEG re-encoding of the same picture is within ~2


def test_copydays_reads_as_copydays(copydays_root):
    """dinokit's own Copydays reader finds every block and a positive for every query."""
    from dinokit.data.copydays import copydays_positives, scan_copydays

    layout = scan_copydays(copydays_root / "copydays")
    assert "strong" in layout.blocks and "jpegqual/50" in layout.blocks and "crops/80" in layout.blocks
    for block, queries in layout.blocks.items():
        if block == "original":
            continue
        positives = copydays_positives(block, queries, layout.originals)
        assert all(len(p) == 1 for p in positives), block

"""The built-in synthetic data sets: layout, exact masks, determinism, naming, bad options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dinokit.commands import app
from PIL import Image
from typer.testing import CliRunner

from dinokit.data import synth

runner = CliRunner()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(*args: str):
    result = runner.invoke(app, list(args))
    return result


# -- classify ---------------------------------------------------------------------------------------


def test_classify_cli_layout_and_masks(tmp_path):
    out = tmp_path / "shapes"
    r = _run("synth", "classify", "--output", str(out), "--classes", "3", "--per-class", "4",
             "--val-fraction", "0.25", "--size", "32", "--seed", "5", "-q")
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


def test_classify_mask_is_exactly_the_painted_object():
    sentinel = (3, 251, 7)
    for ci, shape in enumerate(synth.class_names(18)):
        for i in range(3):
            img, mask = synth.draw_classify_image(synth.item_rng(1, "classify", ci, i), shape, 48, sentinel)
            painted = np.all(img == np.array(sentinel, np.uint8), axis=2)
            np.testing.assert_array_equal(painted, mask)
            assert 0.03 < mask.mean() < 0.8


def _component_stats(mask: np.ndarray) -> tuple[float, int]:
    from skimage.measure import label, regionprops

    props = regionprops(label(mask.astype(np.uint8)))
    big = max(props, key=lambda p: p.area)
    return big.solidity, big.euler_number


def test_classify_class_is_the_shape():
    """Shape statistics of the masks separate classes whatever the colours, texture and background."""
    names = synth.class_names(10)
    for ci, shape in enumerate(names):
        for i in range(6):
            _, mask = synth.draw_classify_image(synth.item_rng(2, "classify", ci, i), shape, 96)
            touches_border = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
            if touches_border:
                continue
            solidity, euler = _component_stats(mask)
            if shape in ("circle", "square", "hexagon"):
                assert solidity > 0.95 and euler == 1, shape
            if shape == "ring":
                assert euler == 0, shape
            if shape in ("star", "cross"):
                assert solidity < 0.8, shape


def test_classify_backgrounds_and_colours_do_not_follow_the_class():
    """Mean object colour is drawn independently of the class: per-class means are all close."""
    means = []
    for ci, shape in enumerate(synth.class_names(4)):
        cols = []
        for i in range(40):
            img, mask = synth.draw_classify_image(synth.item_rng(3, "classify", ci, i), shape, 32)
            cols.append(img[mask].mean(axis=0))
        means.append(np.mean(cols, axis=0))
    means = np.array(means)
    assert np.abs(means - means.mean(axis=0)).max() < 40


def test_classify_is_deterministic_per_seed(tmp_path):
    kw = dict(classes=2, per_class=3, val_fraction=0.34, size=24)
    synth.make_classify_dataset(tmp_path / "a", seed=7, **kw)
    synth.make_classify_dataset(tmp_path / "b", seed=7, **kw)
    synth.make_classify_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_classify_many_classes_are_distinct():
    names = synth.class_names(synth.MAX_CLASSES)
    assert len(set(names)) == synth.MAX_CLASSES >= 40
    assert names[:10] == ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent",
                          "heart", "arrow"]
    # no two classes have the same outline, whatever the rotation: 1 - IoU stays clear of 0
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    rot = np.stack([
        np.stack([synth.rasterize(synth.place_parts(synth.shape_parts(n), 48, 48, 42, a), 96, 96) for a in angles])
        for n in names
    ])  # (classes, angles, 96, 96)
    flat = rot.reshape(len(names), len(angles), -1).astype(np.float32)
    ref = flat[:, 0]  # each class at angle 0
    inter = np.einsum("ip,jap->ija", ref, flat)
    union = ref.sum(1)[:, None, None] + flat.sum(2)[None] - inter
    distance = (1 - inter / union).min(axis=2)
    np.fill_diagonal(distance, 1.0)
    i, j = np.unravel_index(distance.argmin(), distance.shape)
    assert distance.min() > 0.1, (names[i], names[j], distance.min())


def test_classify_refuses_nonempty_output_and_bad_options(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = _run("synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "1", "--size", "16")
    assert r.exit_code == 2 and "--overwrite" in r.output
    # a folder synth did not write is refused even with --overwrite: nothing of the user's is deleted
    r = _run("synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "2", "--size", "16",
             "--overwrite", "-q")
    assert r.exit_code == 2 and "did not write" in r.output
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    r = _run("synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "2", "--size", "16", "-q")
    assert r.exit_code == 0, r.output
    (out / "keep.txt").write_text("x")
    r = _run("synth", "classify", "--output", str(out), "--classes", "1", "--per-class", "2", "--size", "16",
             "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "keep.txt").exists()  # only the generator's own folders are replaced
    r = _run("synth", "classify", "--output", str(tmp_path / "p"), "--classes", "500")
    assert r.exit_code == 2 and "classes" in r.output and "Traceback" not in r.output


def test_classify_overwrite_leaves_no_stale_images(tmp_path):
    synth.make_classify_dataset(tmp_path / "d", classes=3, per_class=2, val_fraction=0.5, size=16)
    synth.make_classify_dataset(tmp_path / "d", classes=2, per_class=2, val_fraction=0.5, size=16, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["circle", "square"]


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_classify_val_fraction(tmp_path, fraction):
    s = synth.make_classify_dataset(tmp_path / "v", classes=2, per_class=4, val_fraction=fraction, size=16)
    assert s.n_val == 2 * round(4 * fraction) and s.n_train + s.n_val == 8
    assert len(list((tmp_path / "v" / "train").rglob("*.png"))) == s.n_train


def test_classify_simple_style_files_and_exact_masks(tmp_path):
    out = tmp_path / "simple"
    r = _run("synth", "classify", "--output", str(out), "--classes", "3", "--per-class", "2",
             "--val-fraction", "0.5", "--size", "32", "--seed", "4", "--style", "simple", "-q")
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


def test_classify_simple_style_is_plain_and_the_object_stands_out():
    sentinel = (3, 251, 7)
    for ci, shape in enumerate(synth.class_names(10)):
        for i in range(4):
            img, mask = synth.draw_simple_image(synth.item_rng(2, "classify", ci, i), shape, 48, sentinel)
            np.testing.assert_array_equal(np.all(img == np.array(sentinel, np.uint8), axis=2), mask)
            img, mask = synth.draw_simple_image(synth.item_rng(2, "classify", ci, i), shape, 48)
            bg, fg = img[~mask].astype(np.float32), img[mask].astype(np.float32)
            # smooth low-contrast background, flat-ish object, clearly apart from each other
            assert bg.std(axis=0).max() < 25 and fg.std(axis=0).max() < 20
            assert np.abs(bg.mean(axis=0) - fg.mean(axis=0)).sum() > 60
            # far less texture than the cluttered style: neighbouring background pixels barely differ
            assert np.abs(np.diff(img.astype(np.float32), axis=1))[:, :, :][~(mask[:, 1:] | mask[:, :-1])].mean() < 3


def _hue(rgb: np.ndarray) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*(rgb / 255.0))[0]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1 - d)


def test_classify_class_colour_makes_hue_a_noisy_class_cue(tmp_path):
    n = 5
    s = synth.make_classify_dataset(tmp_path / "c", classes=n, per_class=6, val_fraction=0.0, size=32,
                                    style="simple", class_colour=1.0)
    for ci, c in enumerate(s.classes):
        for f in sorted((s.train_dir / c).iterdir()):
            img = np.asarray(Image.open(f)).astype(np.float32)
            mask = np.asarray(Image.open(s.mask_dir / "train" / c / f.name)) > 0
            assert _hue_distance(_hue(np.median(img[mask], axis=0)), synth.class_hue(ci, n)) < 0.1
    # with class_colour 0 the object hues do not cluster by class
    far = 0
    for ci, c in enumerate(synth.class_names(n)):
        for i in range(10):
            rng = synth.item_rng(0, "classify", ci, i)
            img, mask = synth.draw_simple_image(rng, c, 32)
            far += _hue_distance(_hue(np.median(img[mask].astype(np.float32), axis=0)), synth.class_hue(ci, n)) > 0.1
    assert far > 20


def _surface_edge_density(img: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of horizontally neighbouring object pixels whose tone changes sharply."""
    grey = img.astype(np.float32).mean(axis=2)
    both = mask[:, 1:] & mask[:, :-1]
    return float((np.abs(np.diff(grey, axis=1))[both] > 25).mean())


def test_classify_class_texture_paints_the_class_pattern_at_its_period():
    assert len(set(synth.CLASS_PATTERNS)) == 12 and synth.class_pattern(12) == synth.class_pattern(0)
    density = {}
    for ci in range(12):
        kind, period = synth.class_pattern(ci)
        d = []
        for i in range(6):
            img, mask = synth.draw_simple_image(synth.item_rng(0, "classify", ci, i), "square", 96,
                                                pattern=(kind, period))
            fg = img[mask].astype(np.float32).mean(axis=1)
            assert fg.max() - fg.min() > 40  # two tones on the surface
            d.append(_surface_edge_density(img, mask))
            flat, fmask = synth.draw_simple_image(synth.item_rng(0, "classify", ci, i), "square", 96)
            assert _surface_edge_density(flat, fmask) < 0.01
        density[kind, period] = np.mean(d)
    for kind in ("stripes", "checks", "dots"):  # finer patterns change tone more often
        ds = [density[kind, p] for p in (0.04, 0.07, 0.11, 0.16)]
        assert all(a > b for a, b in zip(ds, ds[1:])), (kind, ds)


def test_classify_class_texture_fraction(tmp_path):
    s = synth.make_classify_dataset(tmp_path / "t", classes=2, per_class=20, val_fraction=0.0, size=48,
                                    style="simple", class_texture=0.5, seed=1)
    patterned = 0
    for c in s.classes:
        for f in (s.train_dir / c).iterdir():
            img = np.asarray(Image.open(f))
            mask = np.asarray(Image.open(s.mask_dir / "train" / c / f.name)) > 0
            patterned += _surface_edge_density(img, mask) > 0.02
    assert 10 <= patterned <= 30  # about half of 40


def test_classify_style_options_are_checked(tmp_path):
    r = _run("synth", "classify", "--output", str(tmp_path / "a"), "--style", "fancy", "--per-class", "1")
    assert r.exit_code == 2 and "--style" in r.output and "Traceback" not in r.output
    r = _run("synth", "classify", "--output", str(tmp_path / "b"), "--class-colour", "0.5", "--per-class", "1")
    assert r.exit_code == 2 and "--style simple" in r.output
    r = _run("synth", "classify", "--output", str(tmp_path / "c"), "--style", "simple", "--class-colour", "2")
    assert r.exit_code == 2 and "--class-colour" in r.output
    r = _run("synth", "classify", "--output", str(tmp_path / "d"), "--class-texture", "0.5", "--per-class", "1")
    assert r.exit_code == 2 and "--style simple" in r.output
    r = _run("synth", "classify", "--output", str(tmp_path / "e"), "--style", "simple", "--class-texture", "-1")
    assert r.exit_code == 2 and "--class-texture" in r.output


# -- video ------------------------------------------------------------------------------------------


def test_video_cli_davis_layout(tmp_path):
    from dinokit.data.palette import DAVIS_PALETTE
    from dinokit.data.synth_video import draw_sequence

    out = tmp_path / "davis"
    r = _run("synth", "video", "--output", str(out), "--sequences", "2", "--frames", "4", "--height", "64",
             "--width", "96", "--objects", "1-3", "--seed", "3", "-q")
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


def test_video_masks_are_exactly_the_painted_objects(monkeypatch):
    """With flat object colours and a black background, label k <-> pixels painted in colour k."""
    from dinokit.data import synth_video

    colours = ((40 + 7 * n % 200, 250 - 11 * n % 200, 90 + 13 * n % 150) for n in range(1, 10_000))

    def flat_texture(rng, h, w, scale=None):
        return np.broadcast_to(np.asarray(next(colours), np.float32), (h, w, 3)).copy()

    def black(rng, h, w, min_frac=0.3, photo=None):
        return "black", np.zeros((h, w, 3), np.uint8)

    monkeypatch.setattr(synth_video, "random_texture", flat_texture)
    monkeypatch.setattr(synth_video, "photo_crop", black)
    seq = synth_video.draw_sequence(0, 0, 12, 72, 120, (3, 3))
    painted = np.zeros(seq.labels.shape, np.uint8)
    # objects are made in order, so object k got the k-th colour (the first placement succeeded or not:
    # read the colours back from the first frame's labels)
    for k in range(1, 4):
        col = seq.frames[0][seq.labels[0] == k]
        assert len(col) and (col == col[0]).all()
        painted[np.all(seq.frames == col[0], axis=-1)] = k
    np.testing.assert_array_equal(painted, seq.labels)


def test_video_motion_is_smooth_and_present():
    from dinokit.data.synth_video import draw_sequence

    for index in range(4):
        seq = draw_sequence(11, index, 16, 96, 128, (1, 1))
        ys, xs = [], []
        for lab in seq.labels:
            yy, xx = np.nonzero(lab == 1)
            assert len(yy) > 0
            ys.append(yy.mean())
            xs.append(xx.mean())
        step = np.hypot(np.diff(xs), np.diff(ys))
        assert step.max() < 0.08 * 96  # no jumps
        assert np.hypot(xs[-1] - xs[0], ys[-1] - ys[0]) > 1 or step.sum() > 3  # it does move
        # the background pans: the first and last frames differ away from the object
        bg = (seq.labels[0] == 0) & (seq.labels[-1] == 0)
        assert np.abs(seq.frames[0][bg].astype(int) - seq.frames[-1][bg].astype(int)).mean() > 1


def test_video_is_deterministic_and_checks_options(tmp_path):
    from dinokit.data.synth_video import make_video_dataset, parse_object_range

    kw = dict(sequences=1, frames=3, height=32, width=48)
    make_video_dataset(tmp_path / "a", seed=1, **kw)
    make_video_dataset(tmp_path / "b", seed=1, **kw)
    make_video_dataset(tmp_path / "c", seed=2, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b and a != c
    assert parse_object_range("2") == (2, 2) and parse_object_range("1-3") == (1, 3)
    for bad in ("3-1", "0", "x", "1-99"):
        r = _run("synth", "video", "--output", str(tmp_path / "bad"), "--objects", bad, "--frames", "2",
                 "--height", "32", "--width", "32")
        assert r.exit_code == 2 and "--objects" in r.output and "Traceback" not in r.output


# -- copydays ---------------------------------------------------------------------------------------


def _thumb(path_or_img, side: int = 24) -> np.ndarray:
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR), np.float32)


@pytest.fixture(scope="module")
def copydays_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cd") / "set"
    r = _run("synth", "copydays", "--output", str(out), "--originals", "6", "--distractors", "3",
             "--whitening", "2", "--size", "64", "--seed", "4", "-q")
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
        err = [np.abs(np.asarray(Image.open(cd / "jpegqual" / str(q) / o.name).convert("RGB"), np.float32) - ref).mean()
               for q in (3, 20, 75)]
        assert err[0] > err[1] > err[2]
    for s in (cd / "strong").iterdir():
        orig = cd / "original" / f"{s.name[:4]}00.jpg"
        assert np.abs(_thumb(s) - _thumb(orig)).mean() > 3, s.name


def test_copydays_images_are_distinct(copydays_root):
    cd = copydays_root / "copydays"
    paths = sorted((cd / "original").iterdir()) + sorted((copydays_root / "distractors").iterdir()) + sorted(
        (copydays_root / "whitening").iterdir())
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


def test_copydays_strong_edits_each_work():
    """Each kind of strong edit runs on odd sizes and changes the picture."""
    from dinokit.data import synth_copydays as sc

    img = Image.fromarray(sc.original_picture(0, 1, 50)[1])
    for name, fn in sc._EDITS.items():
        rng = synth.item_rng(0, "copydays", 9, len(name))
        out = fn(rng, img, 50).convert("RGB")
        assert min(out.size) >= 8, name
        assert out.size != img.size or np.abs(np.asarray(out, np.float32) - np.asarray(img, np.float32)).mean() > 1, name


def test_copydays_is_deterministic(tmp_path):
    from dinokit.data.synth_copydays import make_copydays_dataset

    kw = dict(originals=2, distractors=1, whitening=1, size=40)
    make_copydays_dataset(tmp_path / "a", seed=3, **kw)
    make_copydays_dataset(tmp_path / "b", seed=3, **kw)
    make_copydays_dataset(tmp_path / "c", seed=4, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert any(a[k] != c.get(k) for k in a if k.endswith(".jpg"))


def test_video_crowded_frames_keep_only_objects_seen_in_the_first_frame():
    from dinokit.data.synth_video import draw_sequence

    for index in range(3):
        seq = draw_sequence(0, index, 3, 32, 32, (12, 12))
        assert 1 <= seq.n_objects <= 12
        assert set(np.unique(seq.labels[0])) == set(range(seq.n_objects + 1))
        assert seq.labels.max() == seq.n_objects

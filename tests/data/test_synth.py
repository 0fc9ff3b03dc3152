"""The built-in synthetic data sets through the library: exact masks, determinism, naming."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinokit.data import synth
from tests.helpers import file_bytes


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
    a, b, c = (file_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_classify_many_classes_are_distinct():
    names = synth.class_names(synth.MAX_CLASSES)
    assert len(set(names)) == synth.MAX_CLASSES >= 40
    assert names[:10] == [
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "ring",
        "hexagon",
        "crescent",
        "heart",
        "arrow",
    ]
    # no two classes have the same outline, whatever the rotation: 1 - IoU stays clear of 0
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    rot = np.stack(
        [
            np.stack(
                [
                    synth.rasterize(synth.place_parts(synth.shape_parts(n), 48, 48, 42, a), 96, 96)
                    for a in angles
                ]
            )
            for n in names
        ]
    )  # (classes, angles, 96, 96)
    flat = rot.reshape(len(names), len(angles), -1).astype(np.float32)
    ref = flat[:, 0]  # each class at angle 0
    inter = np.einsum("ip,jap->ija", ref, flat)
    union = ref.sum(1)[:, None, None] + flat.sum(2)[None] - inter
    distance = (1 - inter / union).min(axis=2)
    np.fill_diagonal(distance, 1.0)
    i, j = np.unravel_index(distance.argmin(), distance.shape)
    assert distance.min() > 0.1, (names[i], names[j], distance.min())


def test_classify_overwrite_leaves_no_stale_images(tmp_path):
    synth.make_classify_dataset(tmp_path / "d", classes=3, per_class=2, val_fraction=0.5, size=16)
    synth.make_classify_dataset(
        tmp_path / "d", classes=2, per_class=2, val_fraction=0.5, size=16, overwrite=True
    )
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["circle", "square"]


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_classify_val_fraction(tmp_path, fraction):
    s = synth.make_classify_dataset(tmp_path / "v", classes=2, per_class=4, val_fraction=fraction, size=16)
    assert s.n_val == 2 * round(4 * fraction) and s.n_train + s.n_val == 8
    assert len(list((tmp_path / "v" / "train").rglob("*.png"))) == s.n_train


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
            assert (
                np.abs(np.diff(img.astype(np.float32), axis=1))[:, :, :][~(mask[:, 1:] | mask[:, :-1])].mean()
                < 3
            )


def _hue(rgb: np.ndarray) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*(rgb / 255.0))[0]


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1 - d)


def test_classify_class_colour_makes_hue_a_noisy_class_cue(tmp_path):
    n = 5
    s = synth.make_classify_dataset(
        tmp_path / "c", classes=n, per_class=6, val_fraction=0.0, size=32, style="simple", class_colour=1.0
    )
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
            far += (
                _hue_distance(_hue(np.median(img[mask].astype(np.float32), axis=0)), synth.class_hue(ci, n))
                > 0.1
            )
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
            img, mask = synth.draw_simple_image(
                synth.item_rng(0, "classify", ci, i), "square", 96, pattern=(kind, period)
            )
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
    s = synth.make_classify_dataset(
        tmp_path / "t",
        classes=2,
        per_class=20,
        val_fraction=0.0,
        size=48,
        style="simple",
        class_texture=0.5,
        seed=1,
    )
    patterned = 0
    for c in s.classes:
        for f in (s.train_dir / c).iterdir():
            img = np.asarray(Image.open(f))
            mask = np.asarray(Image.open(s.mask_dir / "train" / c / f.name)) > 0
            patterned += _surface_edge_density(img, mask) > 0.02
    assert 10 <= patterned <= 30  # about half of 40


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


def test_copydays_strong_edits_each_work():
    """Each kind of strong edit runs on odd sizes and changes the picture."""
    from dinokit.data import synth_copydays as sc

    img = Image.fromarray(sc.original_picture(0, 1, 50)[1])
    for name, fn in sc._EDITS.items():
        rng = synth.item_rng(0, "copydays", 9, len(name))
        out = fn(rng, img, 50).convert("RGB")
        assert min(out.size) >= 8, name
        assert (
            out.size != img.size
            or np.abs(np.asarray(out, np.float32) - np.asarray(img, np.float32)).mean() > 1
        ), name


def test_copydays_is_deterministic(tmp_path):
    from dinokit.data.synth_copydays import make_copydays_dataset

    kw = dict(originals=2, distractors=1, whitening=1, size=40)
    make_copydays_dataset(tmp_path / "a", seed=3, **kw)
    make_copydays_dataset(tmp_path / "b", seed=3, **kw)
    make_copydays_dataset(tmp_path / "c", seed=4, **kw)
    a, b, c = (file_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert any(a[k] != c.get(k) for k in a if k.endswith(".jpg"))


def test_video_crowded_frames_keep_only_objects_seen_in_the_first_frame():
    from dinokit.data.synth_video import draw_sequence

    for index in range(3):
        seq = draw_sequence(0, index, 3, 32, 32, (12, 12))
        assert 1 <= seq.n_objects <= 12
        assert set(np.unique(seq.labels[0])) == set(range(seq.n_objects + 1))
        assert seq.labels.max() == seq.n_objects

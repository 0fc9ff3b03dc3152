"""The DAVIS 2017 J&F scorer against the official toolkit's numbers and hand-worked cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dinokit.errors import DataError
from dinokit.eval import davis_metrics as dm

DATA = Path(__file__).parents[1] / "assets"


@pytest.mark.parametrize("name", ["davis", "davis-ellipses"])
def test_reproduces_official_toolkit(name):
    expected = json.loads((DATA / name / "expected.json").read_text())
    scores = dm.evaluate_davis(DATA / name / "gt", DATA / name / "pred")
    assert set(scores.per_object) == set(expected["per_object"])
    for key, want in expected["per_object"].items():
        for measure, value in want.items():
            assert scores.per_object[key][measure] == pytest.approx(value, abs=1e-6), (key, measure)
    overall = scores.overall()
    for measure, value in expected["overall"].items():
        assert overall[measure] == pytest.approx(value, abs=1e-6), measure
    for seq, want in expected["per_sequence"].items():
        for measure, value in want.items():
            assert scores.per_sequence()[seq][measure] == pytest.approx(value, abs=1e-6)
    assert list(scores.metrics())[:7] == list(dm.MEASURES)


def test_boundary_map_hand_worked():
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    # a pixel is on the boundary when it differs from its east, south or south-east neighbour
    want = np.array(
        [
            [1, 1, 1, 1, 0],
            [1, 0, 0, 1, 0],
            [1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(dm.boundary_map(m), want)
    # last row: only the east neighbour counts, last column: only the south one (the zero padding
    # there is ignored), so a mask filling the frame has no boundary at all
    assert not dm.boundary_map(np.ones((3, 3), bool)).any()
    col = np.zeros((3, 3), bool)
    col[:, 2] = True  # an object in the last column: its west neighbours are boundary, it is not
    np.testing.assert_array_equal(dm.boundary_map(col)[:, 1:].astype(int), [[1, 0], [1, 0], [1, 0]])


def test_disk_dilation_equals_structuring_element():
    rng = np.random.default_rng(0)
    b = rng.random((60, 70)) > 0.995
    b[0, 0] = b[59, 69] = True
    for r in (1, 3, 8):
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = xx**2 + yy**2 <= r**2
        want = ndimage.binary_dilation(b, structure=disk, border_value=0)
        np.testing.assert_array_equal(dm._dilate_disk(b, r), want)


def test_tolerance_and_edge_cases():
    assert dm.boundary_tolerance(480, 854) == 8
    assert dm.boundary_tolerance(480, 910) == math.ceil(0.008 * math.hypot(480, 910)) == 9
    empty = np.zeros((20, 20), bool)
    obj = empty.copy()
    obj[5:10, 5:10] = True
    assert dm.f_measure(empty, empty) == 1.0  # both empty: P = R = 1
    assert dm.f_measure(obj, empty) == 0.0  # prediction empty: P = 1, R = 0
    assert dm.f_measure(empty, obj) == 0.0  # ground truth empty: P = 0, R = 1
    assert dm.jaccard(empty, empty) == 1.0
    assert dm.jaccard(obj, empty) == 0.0
    assert dm.f_measure(obj, obj) == 1.0


def _official_decay(v):
    """The toolkit's decay with its uint8 bin edges (a faithful transcription for the test)."""
    ids = np.round(np.linspace(1, len(v), 5) + 1e-10) - 1
    ids = ids.astype(np.uint8)
    bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
    with np.errstate(invalid="ignore"):
        return np.nanmean(bins[0]) - np.nanmean(bins[3])


def test_decay_bins_and_long_sequences():
    assert dm.decay_bins(18) == [(0, 5), (4, 10), (9, 14), (13, 18)]
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 18, 102, 255):
        v = rng.random(n)
        assert dm.statistics(v)[2] == pytest.approx(_official_decay(v), abs=1e-12)
    # from 256 frames on the uint8 edges wrap (the toolkit's decay is NaN or wrong); dinokit's decay stays the first-minus-last quarter
    n = 400
    v = np.zeros(n)
    v[: n // 8] = 1.0  # only the start is good
    mean, recall, decay = dm.statistics(v)
    first = dm.decay_bins(n)[0]
    assert decay == pytest.approx(v[first[0] : first[1]].mean())
    assert not math.isnan(decay) and recall == pytest.approx(1 / 8)


def test_csv_files(tmp_path):
    scores = dm.evaluate_davis(DATA / "davis-ellipses" / "gt", DATA / "davis-ellipses" / "pred")
    g, s = scores.write_csvs(tmp_path)
    assert g.name == "global_results-val.csv" and s.name == "per-sequence_results-val.csv"
    head, row = g.read_text().splitlines()
    assert head == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert row.split(",")[0] == "0.840"
    lines = s.read_text().splitlines()
    assert lines[0] == "Sequence,J-Mean,F-Mean"
    assert "ellipses-perfect_1,1.000,1.000" in lines and len(lines) == 5


def _copy_seq(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_bad_predictions_name_the_file(tmp_path):
    from PIL import Image

    gt = DATA / "davis-ellipses" / "gt"
    pred = tmp_path / "pred"
    for seq in ("ellipses-drift", "ellipses-perfect"):
        _copy_seq(DATA / "davis-ellipses" / "pred" / seq, pred / seq)
    (pred / "ellipses-drift" / "00004.png").unlink()
    with pytest.raises(DataError, match=r"00004\.png is missing"):
        dm.evaluate_davis(gt, pred)
    _copy_seq(DATA / "davis-ellipses" / "pred" / "ellipses-drift", tmp_path / "fresh")
    (pred / "ellipses-drift" / "00004.png").write_bytes((tmp_path / "fresh" / "00004.png").read_bytes())
    target = pred / "ellipses-perfect" / "00003.png"
    lab = np.array(Image.open(target))
    lab[:10, :10] = 3
    img = Image.fromarray(lab.astype(np.uint8), mode="P")
    img.putpalette(dm_palette())
    img.save(target)
    with pytest.raises(DataError, match=r"00003\.png holds object 3.*only 2 object"):
        dm.evaluate_davis(gt, pred)
    Image.fromarray(np.stack([lab.astype(np.uint8)] * 3, -1), mode="RGB").save(target)
    with pytest.raises(DataError, match=r"00003\.png is an RGB image, not an indexed"):
        dm.evaluate_davis(gt, pred)


def dm_palette():
    from dinokit.data.palette import DAVIS_PALETTE

    return DAVIS_PALETTE

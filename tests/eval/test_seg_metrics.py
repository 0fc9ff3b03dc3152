"""Segmentation scores against a hand-worked example and against the official definition re-stated
directly (mmsegmentation / dinov3 ``metrics.py``: histograms over valid pixels, summed, nanmean)."""

import math

import numpy as np
import pytest
import torch

from dinokit.errors import DataError
from dinokit.eval.seg_metrics import SegScores, intersect_and_union


def test_hand_worked_example_with_void_and_an_absent_class():
    # 4 classes; class 3 appears in neither labels nor predictions; 255 is void.
    label = torch.tensor([[0, 0, 1, 1],
                          [0, 2, 2, 255],
                          [255, 255, 1, 1]])  # fmt: skip
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 0],
                         [2, 2, 1, 0]])  # fmt: skip
    # valid pixels (label != 255): 9. per class:
    # class 0: label 3 (0,0),(0,1),(1,0); pred on valid pixels: (0,0),(1,0),(1,2),(2,3) = 4; inter 2
    # class 1: label 4; pred on valid: (0,1),(0,2),(0,3),(2,2) = 4; inter 3
    # class 2: label 2; pred on valid: (1,1) = 1; inter 1
    # class 3: nothing -> NaN, skipped
    s = SegScores(4)
    s.add(pred, label)
    assert s.areas.tolist() == [[2, 3, 1, 0], [5, 5, 2, 0], [4, 4, 1, 0], [3, 4, 2, 0]]
    iou, acc, pixels = s.per_class()
    assert iou[:3] == pytest.approx([40.0, 60.0, 50.0]) and math.isnan(iou[3])
    assert acc[:3] == pytest.approx([200 / 3, 75.0, 50.0]) and math.isnan(acc[3])
    assert pixels == [3, 4, 2, 0]
    out = s.summary()
    assert out["mIoU"] == pytest.approx(50.0)
    assert out["aAcc"] == pytest.approx(600 / 9)
    assert out["mAcc"] == pytest.approx((200 / 3 + 75 + 50) / 3)


def _official(preds, labels, num_classes, ignore=255):
    """The official definition, re-stated: float histograms with histc over valid pixels, summed."""
    tot = np.zeros((4, num_classes))
    for p, t in zip(preds, labels):
        p, t = p.astype(float), t.astype(float)
        m = t != ignore
        p, t = p[m], t[m]
        i = p[p == t]
        hist = lambda a: np.histogram(a, bins=num_classes, range=(0, num_classes - 1))[0]  # noqa: E731
        ai, ap, al = hist(i), hist(p), hist(t)
        tot += np.stack([ai, ap + al - ai, ap, al])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tot[0] / tot[1]
        acc = tot[0] / tot[3]
    return {
        "mIoU": np.nanmean(iou) * 100,
        "aAcc": tot[0].sum() / tot[3].sum() * 100,
        "mAcc": np.nanmean(acc) * 100,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_official_definition_on_random_label_maps(seed):
    rng = np.random.default_rng(seed)
    C = 7
    preds, labels = [], []
    s = SegScores(C)
    for _ in range(5):
        h, w = rng.integers(5, 30, size=2)
        t = rng.integers(0, C - 1, size=(h, w))  # class C-1 never in the labels
        t[rng.random((h, w)) < 0.2] = 255
        p = rng.integers(0, C - 2, size=(h, w))  # and never predicted either: NaN, skipped
        agree = (rng.random((h, w)) < 0.5) & (t != 255)
        p[agree] = t[agree]
        preds.append(p)
        labels.append(t)
        s.add(torch.from_numpy(p), torch.from_numpy(t))
    got, want = s.summary(), _official(preds, labels, C)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    assert math.isnan(s.per_class()[0][C - 1])


def test_all_void_is_refused():
    s = SegScores(3)
    s.add(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    with pytest.raises(DataError):
        s.summary()


def test_areas_equal_for_an_identical_prediction():
    t = torch.tensor([[0, 1], [2, 255]])
    a = intersect_and_union(t.clone(), t, 3)
    assert a[0].tolist() == a[1].tolist() == a[2].tolist() == a[3].tolist() == [1, 1, 1]

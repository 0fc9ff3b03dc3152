"""Attention maps, mass thresholding and the attention-mask Jaccard protocol, held against
hand-worked examples, brute force and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.masks import GroundTruth
from dinokit.errors import DataError, DinokitError
from dinokit.eval.attention import (
    AttentionConfig,
    attention_maps,
    cls_attention_maps,
    evaluate_jaccard,
    jaccard_best_head,
    jaccard_per_object,
    mass_threshold,
    preprocess,
    resize_labels,
)
from tests.helpers import coins_ground_truth


# -- mass_threshold ---------------------------------------------------------------------------------
def test_mass_threshold_hand_made_vectors():
    a = np.array([[0.1, 0.4, 0.2, 0.3]])
    # 0.4 alone is short of 0.6; 0.4 + 0.3 reaches it
    assert mass_threshold(a, 0.6).tolist() == [[False, True, False, True]]
    # exactly reaching the target is enough (0.4 + 0.3 == 0.7 up to rounding)
    assert mass_threshold(a, 0.7).tolist() == [[False, True, False, True]]
    assert mass_threshold(a, 0.71).tolist() == [[False, True, True, True]]
    assert mass_threshold(a, 0.4).tolist() == [[False, True, False, False]]
    assert mass_threshold(a, 1.0).tolist() == [[True, True, True, True]]
    assert mass_threshold(a, 0.0).tolist() == [[False, False, False, False]]
    # rows are thresholded independently and need not be normalised
    b = np.array([[0.1, 0.4, 0.2, 0.3], [4.0, 1.0, 3.0, 2.0]])
    assert mass_threshold(b, 0.6).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_mass_threshold_ties_are_taken_in_patch_order():
    # four equal values: two are needed for half the mass, the first two are kept
    assert mass_threshold(np.full((1, 4), 0.25), 0.5).tolist() == [[True, True, False, False]]
    # a tie at the boundary: 0.4 plus one of the three 0.2 values reaches 0.5 -> the lowest index
    assert mass_threshold(np.array([[0.2, 0.4, 0.2, 0.2]]), 0.5).tolist() == [[True, True, False, False]]
    assert mass_threshold(np.array([[0.2, 0.2, 0.2, 0.4]]), 0.5).tolist() == [[True, False, False, True]]
    # a tie inside the kept set keeps both
    assert mass_threshold(np.array([[0.2, 0.3, 0.3, 0.2]]), 0.5).tolist() == [[False, True, True, False]]
    # rounding: five times 0.2 summed in float is not exactly 0.6 after three, yet three reach it
    assert mass_threshold(np.full((1, 5), 0.2), 0.6).sum() == 3


def test_mass_threshold_zeros_and_types():
    assert mass_threshold(np.array([[0.5, 0.5, 0.0]]), 1.0).tolist() == [[True, True, False]]
    assert not mass_threshold(np.zeros((2, 3)), 0.6).any()
    t = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    out = mass_threshold(t, 0.6)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    assert isinstance(mass_threshold(t.numpy(), 0.6), np.ndarray)
    # any leading shape
    assert mass_threshold(torch.rand(2, 3, 7), 0.5).shape == (2, 3, 7)
    with pytest.raises(DinokitError):
        mass_threshold(t, 1.5)


def test_mass_threshold_is_the_smallest_set_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 9))
        # small integers make ties frequent; some rows have zeros
        v = rng.integers(0, 5, size=n).astype(np.float64)
        if v.sum() == 0:
            v[0] = 1.0
        f = float(rng.choice([0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0]))
        target = f * v.sum()
        best = None
        for k in range(0, n + 1):
            if any(v[list(c)].sum() >= target - 1e-12 for c in itertools.combinations(range(n), k)):
                best = k
                break
        got = mass_threshold(v[None], f)[0]
        assert got.sum() == best, (v, f)
        assert v[got].sum() >= target - 1e-9
        # the kept patches are the largest ones
        if got.any() and (~got).any():
            assert v[got].min() >= v[~got].max()


def test_mass_threshold_equals_reference_rule_without_ties():
    # the reference: sort ascending, normalise, cumsum > 1 - f, scatter back
    a = torch.randn(6, 200).softmax(-1)
    val, idx = torch.sort(a, dim=1)
    val = val / val.sum(dim=1, keepdim=True)
    th = torch.cumsum(val, dim=1) > (1 - 0.6)
    ref = torch.zeros_like(th)
    for h in range(6):
        ref[h, idx[h]] = th[h]
    assert torch.equal(mass_threshold(a, 0.6), ref)


# -- jaccard_best_head ------------------------------------------------------------------------------
GT = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 2, 2],
        [0, 0, 2, 255],
    ]
)


def _box(r0, r1, c0, c1):
    m = np.zeros((4, 4), bool)
    m[r0:r1, c0:c1] = True
    return m


HEADS = np.stack([_box(0, 2, 0, 3), _box(1, 3, 1, 3), _box(2, 4, 1, 4)])


def test_jaccard_best_head_hand_worked():
    # object 1 (4 px): head0 4/6, head1 1/7, head2 0      -> best 2/3
    # object 2 (3 px): head0 0,   head1 1/6, head2 3/6    -> best 1/2 (the void pixel is in head2's union)
    ids, iou = jaccard_per_object(HEADS, GT)
    assert ids == [1, 2]
    np.testing.assert_allclose(iou, [[4 / 6, 1 / 7, 0.0], [0.0, 1 / 6, 3 / 6]])
    assert jaccard_best_head(HEADS, GT) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # void pixels left out of the union: head2 on object 2 becomes 3/5
    assert jaccard_best_head(HEADS, GT, void=255) == pytest.approx((2 / 3 + 3 / 5) / 2)
    # with only 0 ignored, 255 is an object too (1 px, inside head2 only: 1/6)
    ids, iou = jaccard_per_object(HEADS, GT, ignore=(0,))
    assert ids == [1, 2, 255]
    assert iou[2].tolist() == pytest.approx([0.0, 0.0, 1 / 6])


def test_jaccard_best_head_no_object_and_shape_check():
    assert jaccard_best_head(HEADS, np.where(GT == 255, 255, 0)) is None
    with pytest.raises(DinokitError):
        jaccard_best_head(HEADS[:, :3], GT)


def test_jaccard_per_object_brute_force():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 9, 11)) > 0.6
    gt = rng.integers(0, 4, size=(9, 11))
    gt[0, :3] = 255
    for void in (None, 255):
        ids, iou = jaccard_per_object(masks, gt, void=void)
        valid = np.ones_like(gt, bool) if void is None else gt != void
        for o, i in enumerate(ids):
            for h in range(4):
                m = masks[h] & valid
                obj = gt == i
                assert iou[o, h] == pytest.approx((m & obj).sum() / (m | obj).sum())


# -- preprocessing ---------------------------------------------------------------------------------
def test_preprocess_matches_torchvision_pipeline():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    x, rgb = preprocess(img, 50, 16, "t")
    ref = T.Compose(
        [T.Resize((50, 50)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )(img)
    assert x.shape == (3, 48, 48) and rgb.shape == (48, 48, 3)
    torch.testing.assert_close(x, ref[:, :48, :48], atol=1e-6, rtol=0)
    # no resize: crop only
    x0, _ = preprocess(img, None, 16, "t")
    assert x0.shape == (3, 32, 48)
    with pytest.raises(DataError, match="smaller than one 16x16 patch"):
        preprocess(img.resize((10, 40)), 480, 16, "small.png")


def test_resize_labels_is_pil_nearest_then_crop():
    labels = np.zeros((30, 20), np.int32)
    labels[5:12, 3:9] = 7
    labels[20:, :] = 255
    out = resize_labels(labels, 50, 16)
    ref = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((50, 50), Image.NEAREST))[:48, :48]
    assert out.dtype == np.int32 and out.shape == (48, 48)
    np.testing.assert_array_equal(out, ref)


def test_cls_attention_maps_equal_last_selfattention():
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 8, depth=2).eval()
    x = torch.randn(2, 3, 32, 48)
    maps = cls_attention_maps(model, x)
    ref = model.get_last_selfattention(x)[:, :, 0, 1:].reshape(2, 3, 4, 6)
    torch.testing.assert_close(maps, ref, atol=1e-6, rtol=1e-5)


def test_attention_maps_batches_by_size_and_keeps_order(tmp_path):
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 40), (64, 40), (40, 40)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    cfg = AttentionConfig(image_size=None, threshold=0.6, batch_size=3)
    out = list(attention_maps(model, paths, cfg))
    assert [r.path for r in out] == paths
    assert [r.maps.shape for r in out] == [(3, 2, 2), (3, 2, 4), (3, 2, 2)]
    # batched result equals one image at a time
    single = list(attention_maps(model, paths[1:2], AttentionConfig(image_size=None, batch_size=1)))
    np.testing.assert_allclose(out[1].maps, single[0].maps, atol=1e-6)
    # the CLS row without the CLS token itself: positive, summing to less than 1
    sums = out[0].maps.reshape(3, -1).sum(1)
    assert (out[0].maps > 0).all() and (sums < 1).all()


# -- the evaluation on a real photograph --------------------------------------------------------------
def test_coins_evaluation_end_to_end(tmp_path):
    image_path, mask_path, labels = coins_ground_truth(tmp_path)
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    items = [GroundTruth(image=image_path, name="coins", mask=mask_path)]
    cfg = AttentionConfig(image_size=224, threshold=0.6, batch_size=1)
    res = evaluate_jaccard(model, items, cfg)
    gt = resize_labels(labels, 224, 16)
    n_objects = len(np.setdiff1d(np.unique(gt), [0, 255]))
    assert res.images == 1 and res.objects == n_objects
    assert 0.0 < res.jaccard < 1.0 and len(res.jaccard_per_head) == 3
    # independently: maps -> masks -> pixels -> brute-force IoU per coin
    x, _ = preprocess(Image.open(image_path).convert("RGB"), 224, 16)
    attn = model.get_last_selfattention(x[None])[0, :, 0, 1:]
    m = mass_threshold(attn, 0.6).reshape(3, 14, 14).numpy()
    m = m.repeat(16, axis=1).repeat(16, axis=2)
    best = []
    for i in np.setdiff1d(np.unique(gt), [0, 255]):
        obj = gt == i
        best.append(max((m[h] & obj).sum() / (m[h] | obj).sum() for h in range(3)))
    assert res.jaccard == pytest.approx(np.mean(best), abs=1e-9)
    assert res.best_head == int(np.argmax(res.jaccard_per_head))

    # closed form: at 100% mass every head keeps every patch, so an object's Jaccard is its area share
    res_all = evaluate_jaccard(model, items, AttentionConfig(image_size=224, threshold=1.0))
    areas = [(gt == i).mean() for i in np.setdiff1d(np.unique(gt), [0, 255])]
    assert res_all.jaccard == pytest.approx(np.mean(areas), abs=1e-9)
    assert res_all.jaccard_per_head == pytest.approx([np.mean(areas)] * 3, abs=1e-9)


def test_evaluation_means_over_objects_then_images(tmp_path):
    """Two images with 1 and 3 objects at 100% mass: the protocol averages per image first."""
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    items, shares = [], []
    for k, n_obj in enumerate((1, 3)):
        lab = np.zeros((32, 32), np.uint8)
        for o in range(n_obj):
            lab[o * 8 : o * 8 + 4, : 4 + 8 * o] = o + 1
        Image.fromarray(lab).save(tmp_path / f"m{k}.png")
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / f"i{k}.png")
        items.append(GroundTruth(image=tmp_path / f"i{k}.png", name=str(k), mask=tmp_path / f"m{k}.png"))
        shares.append(np.mean([(lab == o + 1).mean() for o in range(n_obj)]))
    res = evaluate_jaccard(model, items, AttentionConfig(image_size=None, threshold=1.0))
    assert res.images == 2 and res.objects == 4
    assert res.jaccard == pytest.approx(np.mean(shares))
    assert [s.jaccard for s in res.per_image] == pytest.approx(shares)


def test_evaluation_rejects_resnet_and_empty_ground_truth(tmp_path):
    model = dinokit.build_backbone("resnet50")
    with pytest.raises(DinokitError, match="ViT"):
        evaluate_jaccard(model, [GroundTruth(image=tmp_path / "x.png", name="x")], AttentionConfig())
    vit = dinokit.build_backbone("vit_tiny", 16, depth=1)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i.png")
    with pytest.raises(DataError, match="No image has a ground-truth object"):
        evaluate_jaccard(
            vit,
            [GroundTruth(image=tmp_path / "i.png", name="i", mask=tmp_path / "m.png")],
            AttentionConfig(image_size=None),
        )

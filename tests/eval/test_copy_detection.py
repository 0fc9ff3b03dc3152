"""Copy detection: GeM, whitening and Holidays AP against formulas written here, a hand-worked mAP,
and the Copydays layout rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.data.copydays import copydays_positives, scan_copydays
from dinokit.errors import DataError
from dinokit.eval.copy_detection import mean_average_precision, rank_database
from dinokit.eval.descriptors import copy_descriptor, copy_transform, gem, learn_whitening
from dinokit.eval.metrics import trapezoid_ap as holidays_ap
from tests.helpers import ap_from_relevance


# ---------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------
def test_gem_matches_pooling_of_the_patch_grid():
    torch.manual_seed(0)
    b, h, w, d = 2, 3, 4, 5
    tokens = torch.randn(b, h * w, d)
    # the reference's formulation: clamp, 4th power, average-pool the whole grid, 4th root
    grid = tokens.reshape(b, h, w, d).clamp(min=1e-6).permute(0, 3, 1, 2)
    ref = torch.nn.functional.avg_pool2d(grid.pow(4), (h, w)).pow(1.0 / 4).reshape(b, -1)
    assert torch.allclose(gem(tokens), ref, atol=1e-6)
    # element by element: (mean x^4)^(1/4) with negatives clamped to 1e-6
    x = tokens[1, :, 2].numpy().astype(np.float64)
    expect = np.mean(np.maximum(x, 1e-6) ** 4) ** 0.25
    assert gem(tokens)[1, 2].item() == pytest.approx(expect, rel=1e-5)
    # p = 1 on positive tokens is the mean; large p approaches the max
    pos = torch.rand(b, h * w, d) + 0.1
    assert torch.allclose(gem(pos, p=1), pos.mean(dim=1), atol=1e-6)
    assert torch.allclose(gem(pos, p=64), pos.amax(dim=1), rtol=5e-2)


def test_descriptor_is_cls_then_gem_of_last_block_after_norm():
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        desc = copy_descriptor(model, x)
        last = model.get_intermediate_layers(x, 1)[0]  # after the final norm
        cls = model(x)
    assert desc.shape == (2, 2 * 192)
    assert torch.allclose(desc[:, :192], cls, atol=1e-5)
    patches = last[:, 1:].reshape(2, 3, 4, 192).clamp(min=1e-6).permute(0, 3, 1, 2)
    ref = torch.nn.functional.avg_pool2d(patches.pow(4), (3, 4)).pow(0.25).reshape(2, -1)
    assert torch.allclose(desc[:, 192:], ref, atol=1e-5)


def _numpy_whitening(f: np.ndarray, eps=1e-5):
    cov = f.T @ f / f.shape[0]  # UNcentred second moment, as the reference
    d, v = np.linalg.eigh(cov)
    floor = d.max() * eps
    d = np.where(d < floor, floor, d)
    idx = np.argsort(d)[::-1]
    d, v = d[idx], v[:, idx]
    return f.mean(0), np.diag(d**-0.5) @ v.T, d


def test_whitening_equals_eigendecomposition_formula():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0  # a mean far from 0
    w = learn_whitening(torch.from_numpy(f).float())
    mean, proj, eig = _numpy_whitening(f)
    assert np.allclose(w.mean.numpy(), mean, atol=1e-5)
    assert np.allclose(w.eigenvalues.numpy(), eig, rtol=1e-4)
    # eigenvectors are defined up to sign: compare P^T P = V diag(1/eig) V^T and |P|
    assert np.allclose(
        w.projection.double().numpy().T @ w.projection.double().numpy(), proj.T @ proj, rtol=1e-3
    )
    assert np.allclose(np.abs(w.projection.numpy()), np.abs(proj), rtol=1e-3, atol=1e-5)
    # P M P^T = I for the uncentred second moment M (nothing clamped here)
    m = f.T @ f / len(f)
    p = w.projection.double().numpy()
    assert np.allclose(p @ m @ p.T, np.eye(6), atol=1e-4)
    assert w.n_clamped == 0
    # projection: normalise(P (x - mean))
    x = rng.normal(size=(3, 6))
    y = (x - mean) @ proj.T
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    got = w.apply(torch.from_numpy(x).float()).double().numpy()
    assert np.allclose(np.abs(got), np.abs(y), atol=1e-4)
    assert np.allclose(got @ got.T, y @ y.T, atol=1e-4)  # cosines do not depend on the signs


def test_whitening_clamps_small_eigenvalues():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(3, 8))  # rank 3 in 8 dimensions: 5 zero eigenvalues
    w = learn_whitening(torch.from_numpy(f).float())
    _, _, eig = _numpy_whitening(f)
    assert w.n_clamped == 5
    floor = eig.max() * 1e-5
    assert np.allclose(w.eigenvalues.numpy()[-5:], floor, rtol=1e-3)
    assert np.all(np.isfinite(w.projection.numpy()))
    assert np.allclose(w.eigenvalues.numpy(), eig, rtol=1e-3)


def test_holidays_ap_equals_trapezoid_formula():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rel = (rng.random(12) < 0.3).astype(int).tolist()
        n_pos = sum(rel) + int(rng.integers(0, 3))  # some positives never retrieved
        if n_pos == 0:
            continue
        ranks = [i for i, r in enumerate(rel) if r]
        assert holidays_ap(ranks, n_pos) == pytest.approx(ap_from_relevance(rel, n_pos))
    assert holidays_ap([0, 1, 2], 3) == pytest.approx(1.0)
    assert holidays_ap([], 2) == 0.0


def _scores_to_vectors(scores):
    """Query vectors whose cosine with the one-hot database rows orders them as ``scores`` do."""
    q = torch.tensor(scores, dtype=torch.float32)
    return torch.nn.functional.normalize(q, dim=1), torch.eye(q.shape[1])


def test_three_queries_five_images_map_by_hand():
    # rankings: q0 -> [2,0,4,1,3], q1 -> [1,3,0,2,4], q2 -> [4,2,3,0,1]
    scores = [[4, 2, 5, 1, 3], [3, 5, 2, 4, 1], [2, 1, 4, 3, 5]]
    positives = [[2], [3, 4], [4, 0, 1]]
    q, db = _scores_to_vectors(scores)
    ranked, sims = rank_database(q, db, top=None)
    assert ranked.tolist() == [[2, 0, 4, 1, 3], [1, 3, 0, 2, 4], [4, 2, 3, 0, 1]]
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    # by hand: q0 positive at rank 0 -> (1 + 1)/2 = 1
    # q1 positives at ranks 1, 4 -> (0 + 1/2)/2 * 1/2 + (1/4 + 2/5)/2 * 1/2 = 0.125 + 0.1625 = 0.2875
    # q2 positives at ranks 0, 3, 4 -> 1/3 + (1/3 + 2/4)/6 + (2/4 + 3/5)/6 = 0.655556
    mAP, aps = mean_average_precision(ranked, positives)
    assert aps == pytest.approx([1.0, 0.2875, 1 / 3 + (1 / 3 + 0.5) / 6 + (0.5 + 0.6) / 6])
    assert mAP == pytest.approx((1.0 + 0.2875 + 0.6555556) / 3, abs=1e-6)
    # cut at the top 3: q1 keeps only its rank-1 positive, q2 only its rank-0 one
    ranked3, _ = rank_database(q, db, top=3)
    mAP3, _ = mean_average_precision(ranked3, positives)
    assert mAP3 == pytest.approx((1.0 + 0.125 + 1 / 3) / 3)


def test_positives_follow_copydays_naming():
    originals = [Path(f"{g:04d}00.jpg") for g in (2000, 2001, 2002)]
    strong = [Path("200001.jpg"), Path("200002.jpg"), Path("200203.jpg")]
    assert copydays_positives("strong", strong, originals) == [[0], [0], [2]]
    jpeg = [Path("200100.jpg"), Path("200000.jpg")]
    assert copydays_positives("jpegqual/50", jpeg, originals) == [[1], [0]]
    # a 4-character prefix shared by two originals makes both positives
    originals2 = [Path("100000.jpg"), Path("100050.jpg")]
    assert copydays_positives("strong", [Path("100001.jpg")], originals2) == [[0, 1]]
    with pytest.raises(DataError):
        copydays_positives("crops/10", [Path("999900.jpg")], originals)


# ---------------------------------------------------------------------------------------------
# a tiny Copydays
# ---------------------------------------------------------------------------------------------
def test_scan_reads_blocks_from_folders(copydays):
    layout = scan_copydays(copydays)
    assert list(layout.blocks) == ["original", "strong", "jpegqual/10", "jpegqual/50", "crops/50"]
    assert len(layout.blocks["strong"]) == 5
    assert [p.name for p in layout.originals] == ["200000.jpg", "200100.jpg", "200200.jpg", "200300.jpg"]


def test_transform_resizes_to_a_square_ignoring_aspect():
    img = Image.new("RGB", (120, 40), (200, 10, 10))
    x = copy_transform(32)(img)
    assert x.shape == (3, 32, 32)
    assert x[0].mean().item() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-2)

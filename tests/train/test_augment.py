"""Fine-tuning's batch mixing (mixup / cutmix + label smoothing) and soft cross-entropy, held against
hand computations of the same formulas (Zhang et al. 2018; Yun et al. 2019; Szegedy et al. 2016)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.train.augment import BatchMixer, smooth_one_hot, soft_cross_entropy

K = 5  # classes


def one_hot(y: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(y), K)
    for i, c in enumerate(y.tolist()):
        out[i, c] = 1.0
    return out


def batch(b: int = 4, h: int = 6, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, 3, h, w, generator=g), torch.tensor([0, 3, 1, 4, 2, 2, 0, 1][:b])


@pytest.fixture
def fixed_lambda(monkeypatch):
    """Every Beta draw (the mixing ratio of mixup and cutmix) returns ``lam``."""
    lam = 0.3
    monkeypatch.setattr(
        torch.distributions.Beta, "sample", lambda self, sample_shape=torch.Size(): torch.tensor([lam])
    )
    return lam


def test_mixup_mixes_each_image_with_the_previous_one(fixed_lambda):
    lam, s = fixed_lambda, 0.1
    x, y = batch()
    mixed, targets = BatchMixer(K, mixup_alpha=0.8, smoothing=s)(x.clone(), y)
    # image i is paired with image i - 1 (the batch rolled by one)
    want = torch.stack([lam * x[i] + (1 - lam) * x[i - 1] for i in range(len(x))])
    torch.testing.assert_close(mixed, want)
    hard = torch.stack([lam * one_hot(y)[i] + (1 - lam) * one_hot(y)[i - 1] for i in range(len(y))])
    torch.testing.assert_close(targets, (1 - s) * hard + s / K)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(y)))


def test_cutmix_pastes_a_box_and_weights_labels_by_area(fixed_lambda):
    lam, s = fixed_lambda, 0.1
    x, y = batch(h=6, w=8)
    h, w = x.shape[-2:]
    torch.manual_seed(3)
    mixed, targets = BatchMixer(K, cutmix_alpha=1.0, smoothing=s)(x.clone(), y)
    # the box: centre drawn uniformly (x first, then y), half-sides sqrt(1 - lam) / 2 of the image
    torch.manual_seed(3)
    cx, cy = int(torch.randint(w, (1,))), int(torch.randint(h, (1,)))
    half_w, half_h = int(0.5 * math.sqrt(1 - lam) * w), int(0.5 * math.sqrt(1 - lam) * h)
    x1, x2 = max(cx - half_w, 0), min(cx + half_w, w)
    y1, y2 = max(cy - half_h, 0), min(cy + half_h, h)
    assert (x2 - x1) * (y2 - y1) > 0
    want = x.clone()
    for i in range(len(x)):
        want[i, :, y1:y2, x1:x2] = x[i - 1, :, y1:y2, x1:x2]
    torch.testing.assert_close(mixed, want)
    kept = 1 - (x2 - x1) * (y2 - y1) / (h * w)  # the label weight is the area actually kept
    hard = torch.stack([kept * one_hot(y)[i] + (1 - kept) * one_hot(y)[i - 1] for i in range(len(y))])
    torch.testing.assert_close(targets, (1 - s) * hard + s / K)


def test_no_mixing_gives_smoothed_one_hot_targets():
    x, y = batch()
    mixed, targets = BatchMixer(K, smoothing=0.2)(x.clone(), y)
    torch.testing.assert_close(mixed, x)
    torch.testing.assert_close(targets, 0.8 * one_hot(y) + 0.2 / K)
    # one image has nothing to mix with
    mixed, targets = BatchMixer(K, mixup_alpha=0.8, cutmix_alpha=1.0)(x[:1].clone(), y[:1])
    torch.testing.assert_close(mixed, x[:1])
    torch.testing.assert_close(targets, one_hot(y[:1]))


def test_smooth_one_hot_keeps_soft_targets_soft():
    soft = torch.tensor([[0.25, 0.75, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(smooth_one_hot(soft, K, 0.1), 0.9 * soft + 0.1 / K)


def test_soft_cross_entropy_is_the_expected_negative_log_likelihood():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K, generator=g) * 3
    t = torch.rand(6, K, generator=g)
    t = t / t.sum(dim=1, keepdim=True)
    # written out in float64: log p_k = z_k - log sum_j exp(z_j)
    z = logits.double()
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    want = -(t.double() * log_p).sum(dim=1).mean()
    got = soft_cross_entropy(logits, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_soft_cross_entropy_of_smoothed_one_hot_is_label_smoothing(smoothing):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, K, generator=g)
    y = torch.randint(K, (8,), generator=g)
    got = soft_cross_entropy(logits, (1 - smoothing) * one_hot(y) + smoothing / K)
    torch.testing.assert_close(got, F.cross_entropy(logits, y, label_smoothing=smoothing))

"""The linear segmentation head, its inputs, its schedule and its sliding window against the official
definitions (DINOv3 eval/segmentation: linear_head.py, schedulers.py, inference.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.seg_transforms import CAT_MAX_RATIO, random_crop, short_side_size, train_sample
from dinokit.eval.seg_head import (
    SegmentationHead,
    patch_features,
    predict_labels,
    slide_logits,
    warmup_cosine_lr,
    window_starts,
)
from tests.helpers import tiny_vit


def test_schedule_matches_warmup_one_cycle_worked_by_hand():
    base, total, warm = 1e-3, 100, 10
    assert warmup_cosine_lr(0, total, warm, base) == pytest.approx(base * 1e-6)
    k = 0.5 * (1 - 1e-6)  # step 5: halfway through the warm-up, times (1 - 5/100)
    assert warmup_cosine_lr(5, total, warm, base) == pytest.approx(base * (1 - k) * 0.95)
    assert warmup_cosine_lr(10, total, warm, base) == pytest.approx(
        base * (math.cos(math.pi * 11 / 100) + 1) / 2
    )
    assert warmup_cosine_lr(99, total, warm, base) == pytest.approx(0.0, abs=1e-18)


def test_head_initialisation_and_order():
    torch.manual_seed(0)
    head = SegmentationHead(256, 50)
    assert torch.all(head.conv.bias == 0)
    assert head.conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert head.conv.kernel_size == (1, 1)
    x = torch.randn(3, 256, 4, 5)
    keep = torch.ones(3, 256)
    keep[:, ::2] = 0
    head.train()
    got = head(x, keep)
    # dropout first, then the batch's statistics, then the 1x1 conv
    d = x * keep[:, :, None, None]
    mean, var = d.mean(dim=(0, 2, 3)), d.var(dim=(0, 2, 3), unbiased=False)
    z = (d - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    want = (
        torch.einsum("bchw,kc->bkhw", z, head.conv.weight[:, :, 0, 0]) + head.conv.bias[None, :, None, None]
    )
    assert torch.allclose(got, want, atol=1e-5)


def test_patch_features_drop_cls_and_registers_after_the_norm():
    model = tiny_vit(depth=3, num_register_tokens=4)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        f1 = patch_features(model, x, 1)
        tokens = model.forward_all_tokens(x)  # CLS, 4 registers, 12 patches, after the final norm
        f4 = patch_features(model, x, 4 if len(model.blocks) >= 4 else 3)
    assert f1.shape == (2, 192, 3, 4)
    assert torch.allclose(f1, tokens[:, 5:].transpose(1, 2).reshape(2, 192, 3, 4), atol=1e-6)
    assert f4.shape == (2, 3 * 192, 3, 4) and torch.allclose(f4[:, -192:], f1, atol=1e-6)


def test_window_starts_as_slide_inference():
    # slide_inference: ceil((10 - 4) / 3) + 1 = 3 windows, the last shifted inside
    assert window_starts(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert window_starts(5, 8, 5) == [(0, 5)]


@pytest.mark.parametrize("h, w, crop", [(48, 64, 64), (32, 32, 48)])
def test_one_window_covering_the_image_is_whole_image_inference(h, w, crop):
    model = tiny_vit(depth=2)
    head = SegmentationHead(192, 5).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        whole = F.interpolate(
            head(patch_features(model, x)), size=(h, w), mode="bilinear", align_corners=False
        )
        slid = slide_logits(model, head, x, crop, crop * 2 // 3, 1)
        labels = predict_labels(model, head, x, (2 * h, 2 * w), crop, crop * 2 // 3, 1)
    assert torch.allclose(slid, whole, atol=1e-5)
    up = F.interpolate(whole, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(labels, up)


def test_overlapping_windows_are_averaged_not_summed():
    class PixelTokens(torch.nn.Module):  # a "backbone" whose patch tokens are the pixels (patch size 1)
        patch_size = 1

        def get_intermediate_layers(self, x, n=1):
            return [torch.cat([torch.zeros(x.shape[0], 1, 3), x.flatten(2).transpose(1, 2)], dim=1)]

    class FirstChannelPlusOne(torch.nn.Module):
        num_classes = 1

        def forward(self, feats):
            return feats[:, :1] + 1

    x = torch.randn(1, 3, 32, 80)
    out = slide_logits(PixelTokens(), FirstChannelPlusOne(), x, 32, 16, 1)  # windows at 0, 16, 32, 48 overlap
    assert torch.allclose(out, x[:, :1] + 1, atol=1e-6)


def test_train_sample_shapes_pad_and_flip():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    labels = np.ones((20, 30), np.int64)
    x, y = train_sample(rng, image, labels, 64, photometric=True)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert set(torch.unique(y).tolist()) <= {1, 255}
    assert short_side_size(30, 20, 10) == (15, 10) and short_side_size(20, 30, 10) == (10, 15)


def test_crop_avoids_one_class_covering_75_percent_when_it_can():
    labels = np.zeros((100, 100), np.int64)
    labels[:, 60:] = 1  # a crop of 50 wide holds both classes only where it straddles x = 60
    hits = sum(
        (lambda c: c.min() > 0 and c.max() / c.sum() < CAT_MAX_RATIO)(
            np.bincount(labels[y : y + 50, x : x + 50].ravel(), minlength=2))
        for y, x in (random_crop(np.random.default_rng(s), labels, 50) for s in range(20))
    )  # fmt: skip
    assert hits >= 19  # one random draw alone satisfies it about half of the time (x in 23..47 of 0..50)

"""The linear segmentation head on frozen patch features, its inputs, its schedule and its sliding-
window inference, as DINOv3's ``eval/segmentation`` defines them:

- inputs (``models/backbone/dinov3_adapter.py`` and the linear config's ``backbone_out_layers: LAST``,
  ``use_backbone_norm: True``, ``use_cls_token: False``): the patch tokens of the last block, or of
  the last 4 concatenated, after the backbone's final norm, as a (B, C, H/p, W/p) map; the CLS,
  register and storage tokens are not patch tokens;
- the head (``models/heads/linear_head.py``): Dropout2d(0.1), BatchNorm (SyncBatchNorm under DDP), a
  1x1 convolution with weights ~ N(0, 0.01) and bias 0; logits upsampled bilinearly to the labels;
- the schedule (``schedulers.py`` WarmupOneCycleLR with the config's warm-up 1,500 of 40,000
  iterations from ratio 1e-6, cosine to 0): :func:`warmup_cosine_lr`;
- sliding-window inference (``inference.py`` ``slide_inference``): windows of ``crop`` every
  ``stride`` pixels, the last ones shifted inside the image, logits of overlapping windows averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DinokitError
from ..models.registry import is_vit
from ..models.vit import VisionTransformer

DROPOUT = 0.1
WARMUP_RATIO = 1e-6


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole batch over every torchrun process
    (what SyncBatchNorm does, also on CPUs under gloo, where SyncBatchNorm does not run); in one
    process, or in eval mode, it is BatchNorm2d. Its state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n_local = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n_local])
        stats = all_reduce(stats)  # differentiable: the gradient flows through every rank's statistics
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean
        # track_running_stats (the default): the running statistics exist
        assert (
            self.running_mean is not None
            and self.running_var is not None
            and self.num_batches_tracked is not None
        )
        with torch.no_grad():
            m = self.momentum
            assert m is not None  # a momentum (0.1 by default), not BatchNorm's cumulative average
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
            self.num_batches_tracked += 1
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


class SegmentationHead(nn.Module):
    """The linear head: channel dropout, BatchNorm, 1x1 convolution (see the module's text).

    ``keep`` (B, C) gives the dropout mask (scaled keep factors) drawn by the caller from the
    sample's own seed, so that a sample's dropout does not depend on the process it ran in; without
    it, training draws from torch's generator as Dropout2d does."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = DROPOUT):
        super().__init__()
        self.in_channels, self.num_classes, self.dropout = int(in_channels), int(num_classes), float(dropout)
        self.bn = GlobalBatchNorm2d(self.in_channels)
        self.conv = nn.Conv2d(self.in_channels, self.num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        assert self.conv.bias is not None  # a Conv2d has a bias by default
        nn.init.constant_(self.conv.bias, 0.0)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            x = x * keep[:, :, None, None] if keep is not None else F.dropout2d(x, self.dropout, True)
        return self.conv(self.bn(x))


def dropout_keep(generator: torch.Generator, channels: int, p: float = DROPOUT) -> torch.Tensor:
    """One sample's Dropout2d mask: each channel kept with probability 1 - p, scaled by 1 / (1 - p)."""
    return (torch.rand(channels, generator=generator) >= p).float() / (1.0 - p)


def check_backbone(model: nn.Module) -> VisionTransformer:
    """``model``, refused unless it is a ViT."""
    if not is_vit(model):
        raise DinokitError("dinokit segment trains on the patch tokens of a ViT; this backbone is not one.")
    return model


def patch_features(model: VisionTransformer, x: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The patch tokens of the last ``blocks`` blocks after the final norm, concatenated over the
    channels: (B, blocks * D, H/p, W/p). CLS, register and storage tokens are left out."""
    p = model.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    layers = model.get_intermediate_layers(x, n=blocks)  # registers already dropped: (B, 1 + N, D)
    maps = [t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w) for t in layers]
    return torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]


def warmup_cosine_lr(
    step: int, total: int, warmup: int, base_lr: float, warmup_ratio: float = WARMUP_RATIO
) -> float:
    """The learning rate of iteration ``step`` (0-based) under DINOv3's WarmupOneCycleLR as its linear
    config sets it (final_div_factor inf, pct_start 0): during the warm-up ``base_lr * (1 - k) *
    (1 - step / total)`` with ``k = (1 - step / warmup) * (1 - warmup_ratio)``; after it a cosine from
    ``base_lr`` at ``step + 1`` of ``total`` to 0."""
    if step < warmup:
        k = (1 - step / warmup) * (1 - warmup_ratio)
        return base_lr * (1 - k) * (1 - step / total)
    return base_lr * (math.cos(math.pi * (step + 1) / total) + 1) / 2


@torch.no_grad()
def window_logits(
    model: VisionTransformer,
    head: SegmentationHead,
    crop: torch.Tensor,
    blocks: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The head's logits for one window (B, 3, h, w), upsampled to the window: (B, K, h, w) fp32."""
    from ..runtime import autocast

    with autocast(crop.device, dtype):
        feats = patch_features(model, crop, blocks)
    logits = head(feats.float())
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)


def window_starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """The (start, end) of the windows along one side, the last shifted inside (slide_inference)."""
    crop = min(crop, length)
    count = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(count):
        end = min(i * stride + crop, length)
        out.append((max(end - crop, 0), end))
    return out


@torch.no_grad()
def slide_logits(
    model: VisionTransformer,
    head: SegmentationHead,
    image: torch.Tensor,
    crop: int,
    stride: int,
    blocks: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sliding-window logits of one image (1, 3, H, W): (1, K, H, W), the average over the windows
    covering each pixel. A side shorter than ``crop`` is one window of its own length; an image
    smaller than the crop on both sides is covered by square windows of its shorter side, as
    the official code does."""
    _, _, H, W = image.shape
    ch = cw = crop
    if crop > H and crop > W:
        ch = cw = min(H, W)
    out = torch.zeros(1, head.num_classes, H, W)
    count = torch.zeros(1, 1, H, W)
    for y1, y2 in window_starts(H, ch, stride):
        for x1, x2 in window_starts(W, cw, stride):
            out[:, :, y1:y2, x1:x2] += window_logits(
                model, head, image[:, :, y1:y2, x1:x2], blocks, dtype
            ).cpu()
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def predict_labels(
    model: VisionTransformer,
    head: SegmentationHead,
    image: torch.Tensor,
    out_size: tuple[int, int],
    crop: int,
    stride: int,
    blocks: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The predicted class of every pixel at ``out_size`` (H, W): sliding-window logits upsampled
    bilinearly to the labels' size, then the arg max; (H, W) int64."""
    logits = slide_logits(model, head, image, crop, stride, blocks, dtype)
    H, W = out_size
    if tuple(logits.shape[-2:]) == (H, W):
        return logits[0].argmax(0)
    full = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    return full[0].argmax(0)


__all__ = [
    "GlobalBatchNorm2d",
    "SegmentationHead",
    "check_backbone",
    "dropout_keep",
    "patch_features",
    "predict_labels",
    "slide_logits",
    "warmup_cosine_lr",
    "window_logits",
    "window_starts",
]

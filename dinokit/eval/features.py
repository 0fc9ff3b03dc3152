"""Batched (and, under torchrun, sharded) feature extraction: the piece every evaluation shares.

:func:`extract_features` runs a ``feature_fn(model, images) -> (B, D)`` over a dataset that yields
``(image, label, index)``; under torchrun each rank embeds a strided shard and the features are
gathered so every rank ends with all of them, in dataset order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data.images import collate_skip_none
from ..progress import NULL_PROGRESS, Progress
from ..runtime import autocast, dist_env, is_dist

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def cls_feature_fn(n_last_blocks: int = 1, avgpool_patch_tokens: bool = False) -> FeatureFn:
    """The frozen-evaluation feature (spec frozen-eval): the CLS token after the final norm, or the CLS
    tokens of the last ``n`` blocks concatenated, optionally with the average of the last block's patch
    tokens. With both and n=1 the reference's element order is kept: [CLS_0, avg_0, CLS_1, avg_1, ...].
    ResNet backbones give their 2048-d average pool.
    """

    def fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not hasattr(model, "get_intermediate_layers"):
            return model(images)
        if n_last_blocks == 1 and not avgpool_patch_tokens:
            return model(images)
        layers = model.get_intermediate_layers(images, n_last_blocks)
        out = torch.cat([x[:, 0] for x in layers], dim=-1)
        if avgpool_patch_tokens:
            avg = layers[-1][:, 1:].mean(dim=1)
            out = torch.cat((out.unsqueeze(-1), avg.unsqueeze(-1)), dim=-1).reshape(out.shape[0], -1)
        return out

    return fn


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    feature_fn: FeatureFn | None = None,
    progress: Progress = NULL_PROGRESS,
    description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``dataset``; returns (features (N, D) float32 on the CPU, kept (N,) bool).

    Items the dataset returns as ``None`` (unreadable images, with ``skip_unreadable``) get a zero row
    and ``kept = False``.
    """
    device = torch.device(device)
    feature_fn = feature_fn or (lambda m, x: m(x))
    env = dist_env()
    n = len(dataset)
    indices = list(range(env.rank, n, env.world_size)) if is_dist() else list(range(n))
    shard = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device).eval()
    feats: torch.Tensor | None = None
    kept = torch.zeros(n, dtype=torch.bool)
    task = progress.task(description, total=len(indices))
    for batch, skipped in loader:
        if batch is None:
            task.advance(skipped)
            continue
        images, _, idx = batch
        with autocast(device, dtype):
            out = feature_fn(model, images.to(device, non_blocking=True))
        out = out.float().cpu()
        if feats is None:
            feats = torch.zeros(n, out.shape[1])
        feats[idx] = out
        kept[idx] = True
        task.advance(len(idx) + skipped)
    task.close()
    if feats is None:
        feats = torch.zeros(n, 0)
    if is_dist():
        # every rank contributes its rows; the sum over ranks fills the full table
        dim = torch.tensor([feats.shape[1]], dtype=torch.long)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if feats.shape[1] != dim.item():
            feats = torch.zeros(n, int(dim.item()))
        backend_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        f = feats.to(backend_device)
        k = kept.to(backend_device, torch.uint8)
        torch.distributed.all_reduce(f)
        torch.distributed.all_reduce(k)
        feats, kept = f.cpu(), k.cpu().bool()
    return feats, kept

"""DINOv2's and DINOv3's linear protocol: a grid of linear heads trained together on a frozen backbone.

The official code (dinov2 ``dinov2/eval/linear.py``, dinov3 ``dinov3/eval/linear.py``) trains one
linear head per learning rate of a grid of 13 (1e-5 ... 0.1, each scaled by batch x processes / 256)
and per input: the CLS tokens of the last 1 or 4 blocks, with or without the mean of the last block's
patch tokens appended (DINOv2: 13 x 2 x 2 = 52 heads); DINOv3 keeps the last block with the mean (13
heads). Every head sees the same batches from one backbone forward; SGD (momentum 0.9, no weight
decay) with a cosine to 0 stepped every iteration over ``epochs x epoch_length`` iterations (10 x 1250),
on an endless stream of reshuffled training images (RandomResizedCrop bicubic + flip); the head with
the best top-1 on the validation split at the end is the result, in the grid's order, the first on a
tie (as the official code picks it).

The backbone's tokens are computed once per batch as one vector: the CLS tokens of the last ``k``
blocks, then the patch-token mean (:func:`token_vector`); each head reads its slice of it
(:func:`head_slice`), so a head's input is exactly the official ``create_linear_input``. With
cached features (``--augment none``) the vectors of every image are computed once and the whole grid
trains on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.head import LinearClassifier
from ..models.vit import VisionTransformer

#: the official grid of base learning rates (dinov2 and dinov3 ``eval/linear.py``)
LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
#: the official length: epochs of ``epoch_length`` iterations
EPOCHS, EPOCH_LENGTH = 10, 1250
PROTOCOLS = ("dino", "dinov2", "dinov3")


def protocol_of(generation: int) -> str:
    """The protocol that goes with weights of DINO generation 1, 2 or 3."""
    return PROTOCOLS[min(max(generation, 1), 3) - 1]


@dataclass(frozen=True)
class HeadSpec:
    """One head of the grid: its base learning rate (before scaling), last blocks and patch mean."""

    lr: float
    n_blocks: int
    avgpool: bool

    def name(self, scale: float) -> str:
        """The official code's name of the head (its learning rate scaled, to 5 decimals; a smaller
        one, which 5 decimals would round into its neighbour's name, in full: ``lr_5em06``)."""
        lr = self.lr * scale
        text = f"{lr:.5f}" if abs(round(lr, 5) - lr) <= 1e-12 * max(lr, 1e-30) or lr >= 1e-3 else f"{lr:.6g}"
        return f"classifier_{self.n_blocks}_blocks_avgpool_{self.avgpool}_lr_{text}".replace(
            ".", "_"
        ).replace("-", "m")

    def record(self, scale: float) -> dict:
        return {
            "name": self.name(scale),
            "lr": self.lr,
            "lr_scaled": self.lr * scale,
            "n_last_blocks": self.n_blocks,
            "avgpool_patch_tokens": self.avgpool,
        }


def protocol_heads(
    protocol: str,
    lrs: Sequence[float] = LEARNING_RATES,
    blocks: Sequence[int] | None = None,
    avgpool: Sequence[bool] | None = None,
) -> list[HeadSpec]:
    """The heads of ``protocol``'s grid in the official order (blocks, then mean, then lr):
    DINOv2 1 and 4 blocks, without and with the mean; DINOv3 the last block with the mean.
    ``blocks`` / ``avgpool`` narrow it (the options typed)."""
    if blocks is None:
        blocks = (1, 4) if protocol == "dinov2" else (1,)
    if avgpool is None:
        avgpool = (False, True) if protocol == "dinov2" else (True,)
    return [HeadSpec(float(lr), int(n), bool(a)) for n in blocks for a in avgpool for lr in lrs]


def token_vector(model: VisionTransformer, images: torch.Tensor, k: int) -> torch.Tensor:
    """[CLS of block -k, ..., CLS of the last block, mean of the last block's patch tokens], each after
    the final norm (registers and storage tokens left out): every head's input is a slice of it."""
    layers = model.get_intermediate_layers(images, k)
    return torch.cat([*(x[:, 0] for x in layers), layers[-1][:, 1:].mean(dim=1)], dim=-1).float()


def head_slice(spec: HeadSpec, k: int, dim: int) -> slice:
    """Where ``spec``'s input lies in a :func:`token_vector` of ``k`` blocks of width ``dim``: the
    official ``create_linear_input(tokens, spec.n_blocks, spec.avgpool)``."""
    return slice((k - spec.n_blocks) * dim, k * dim + (dim if spec.avgpool else 0))


class LinearGrid(nn.Module):
    """The heads of a grid, each a ``LinearClassifier`` (weight N(0, 0.01), bias 0) on its slice."""

    def __init__(self, specs: Sequence[HeadSpec], k: int, dim: int, num_classes: int):
        super().__init__()
        self.specs, self.k, self.dim = list(specs), int(k), int(dim)
        self.slices = [head_slice(s, k, dim) for s in self.specs]
        self.heads = nn.ModuleList(LinearClassifier(sl.stop - sl.start, num_classes) for sl in self.slices)

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [head(tokens[:, sl]) for head, sl in zip(self.heads, self.slices)]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sum of every head's cross-entropy (the heads' gradients stay apart: each is its own)."""
        losses = [F.cross_entropy(out, labels) for out in self(tokens)]
        return sum(losses[1:], losses[0])


def grid_optimizer(grid: LinearGrid, scale: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """SGD with one parameter group per head at its scaled lr, and the official per-iteration cosine
    (``CosineAnnealingLR`` over every iteration, to 0): call ``scheduler.step()`` after each step."""
    groups: list[dict[str, Any]] = [
        {"params": list(h.parameters()), "lr": s.lr * scale} for h, s in zip(grid.heads, grid.specs)
    ]
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)


def cosine_lr(base: float, iteration: int, total: int) -> float:
    """The cosine's closed form: the lr of ``iteration`` (0-based) of ``total``."""
    return 0.5 * base * (1.0 + math.cos(math.pi * iteration / total))


def batch_indices(n: int, batch: int, seed: int, iteration: int) -> torch.Tensor:
    """The images of ``iteration``: the ``iteration``-th run of ``batch`` from an endless stream of
    reshuffled orders of the ``n`` images (the official infinite sampler: no batch is ever short,
    and a small set is gone through several times in one batch's worth). Any iteration can be
    computed on its own, so a resumed run sees the batches an uninterrupted one would."""
    start = iteration * batch
    out, pos = [], start
    while pos < start + batch:
        turn, offset = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + turn))
        take = min(n - offset, start + batch - pos)
        out.append(order[offset : offset + take])
        pos += take
    return torch.cat(out)


def iterations(start: int, end: int, n: int, batch: int, seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    for it in range(start, end):
        yield it, batch_indices(n, batch, seed, it)


@torch.no_grad()
def grid_counts(grid: LinearGrid, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(heads, 2): each head's top-1 and top-5 correct counts on a batch."""
    out = torch.zeros(len(grid.heads), 2, dtype=torch.float64)
    for i, logits in enumerate(grid(tokens)):
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        out[i, 0] = float(hit[:, 0].sum())
        out[i, 1] = float(hit.any(dim=1).sum())
    return out


def choose_head(top1: Sequence[float]) -> int:
    """The index of the best head on validation: the highest top-1, the first in the grid's order on
    a tie (the official code's strict comparison)."""
    best = 0
    for i, v in enumerate(top1):
        if v > top1[best]:
            best = i
    return best


__all__: Sequence[str] = [
    "EPOCHS",
    "EPOCH_LENGTH",
    "HeadSpec",
    "LEARNING_RATES",
    "LinearGrid",
    "PROTOCOLS",
    "batch_indices",
    "choose_head",
    "cosine_lr",
    "grid_counts",
    "grid_optimizer",
    "head_slice",
    "iterations",
    "protocol_heads",
    "protocol_of",
    "token_vector",
]

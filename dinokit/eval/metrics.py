"""Scores several protocols share, written once: top-1/top-5 accuracy and trapezoid average precision,
and the guard that keeps non-finite features out of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DataError


def require_finite(features: torch.Tensor, what: str = "the features") -> None:
    """Refuse features holding NaN or inf before a score is computed from them: a neighbour search or
    a classifier on such rows still prints a plausible-looking number."""
    if features.is_floating_point() and not bool(torch.isfinite(features).all()):
        rows = int((~torch.isfinite(features)).any(dim=-1).sum()) if features.ndim > 1 else 1
        raise DataError(
            f"{what} hold non-finite values (NaN or inf) in {rows} of {len(features)} rows; the weights or the "
            "precision that computed them is broken (try --precision fp32)."
        )


def ranked_hits(ranked: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many rows of ``ranked`` (class indices, best first) hold the target first, and within the
    first five. With fewer than five ranked classes, "top-5" counts all of them (top-C)."""
    hit = ranked == targets.to(ranked.device).long()[:, None]
    return int(hit[:, 0].sum()), int(hit[:, :5].any(dim=1).sum())


def topk_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Counts of correct top-1 and top-5 predictions of ``logits`` (top-C when there are fewer than 5
    classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return ranked_hits(ranked, targets)


def percent(count: float, total: float) -> float:
    """``count`` of ``total`` in percent; NaN for an empty set (no score rather than a made-up one)."""
    return count * 100.0 / total if total else float("nan")


def trapezoid_ap(positive_ranks: Sequence[int], n_positives: int) -> float:
    """Average precision as the area under the precision-recall curve summed as trapezoids, one per
    retrieved positive: the evaluation of Holidays/Copydays and of the revisited Oxford/Paris toolkit.

    ``positive_ranks`` are the 0-based ranks at which positives were retrieved (ignored images
    already removed; only those inside the evaluated list); ``n_positives`` is the number of
    positives that exist. The i-th positive (0-based) found at rank r adds a trapezoid of width
    1 / n_positives between the precisions i / r (1 when r = 0) and (i + 1) / (r + 1).
    """
    if n_positives <= 0:
        raise ValueError("a query needs at least one positive")
    ap = 0.0
    step = 1.0 / n_positives
    for i, r in enumerate(sorted(int(x) for x in positive_ranks)):
        before = 1.0 if r == 0 else i / r
        at = (i + 1) / (r + 1)
        ap += (before + at) * step / 2.0
    return ap

"""Semantic segmentation scores as the DINOv3 evaluation computes them (``dinov3/eval/segmentation/
metrics.py``, the mmsegmentation definition): per image and per class the areas of intersection,
union, prediction and label over the valid pixels (the ignore index left out), summed over the whole
split; then IoU = intersection / union and Acc = intersection / label per class, mIoU and mAcc the
mean over the classes where they are defined (a class absent from both the labels and the
predictions is NaN and skipped), aAcc = total intersection / total label. In percent, as the papers'
tables."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError

#: the scale of each score in metrics.json
SEG_UNITS = {"mIoU": "percent", "aAcc": "percent", "mAcc": "percent"}


def intersect_and_union(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(4, C) int64 areas of one prediction against its label map: intersection, union, prediction,
    label, counted over the pixels whose label is not ``ignore_index``. Labels other than the ignore
    index must lie in 0..C-1 (the readers check it); predicted values outside are not counted, as the
    official histogram's range drops them."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
    valid = label != ignore_index
    p = pred[valid].long()
    t = label[valid].long()
    inside = (p >= 0) & (p < num_classes)
    area_pred = torch.bincount(p[inside], minlength=num_classes)[:num_classes]
    area_label = torch.bincount(t, minlength=num_classes)[:num_classes]
    area_inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes]
    union = area_pred + area_label - area_inter
    return torch.stack([area_inter, union, area_pred, area_label]).cpu()


@dataclass
class SegScores:
    """The per-class areas summed over a split (int64, exact at any size), and the scores from them."""

    num_classes: int
    ignore_index: int = 255

    def __post_init__(self) -> None:
        self.areas = torch.zeros(4, self.num_classes, dtype=torch.int64)

    def add(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.areas += intersect_and_union(pred, label, self.num_classes, self.ignore_index)

    def add_areas(self, areas: torch.Tensor) -> None:
        self.areas += areas.to(torch.int64).cpu()

    def per_class(self) -> tuple[list[float], list[float], list[int]]:
        """IoU and accuracy per class in percent (NaN where undefined) and the label pixels per class."""
        inter, union, _, label = (self.areas[i].double() for i in range(4))
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan)) * 100.0
        acc = torch.where(label > 0, inter / label.clamp(min=1), torch.full_like(inter, math.nan)) * 100.0
        return iou.tolist(), acc.tolist(), [int(v) for v in self.areas[3]]

    def summary(self) -> dict[str, float]:
        """mIoU, aAcc and mAcc in percent; refused when no pixel was labelled (no score, not a made-up one)."""
        total_label = int(self.areas[3].sum())
        if total_label == 0:
            raise DataError(
                "No labelled pixel was evaluated (every pixel is void); there is no score to give."
            )
        iou, acc, _ = self.per_class()
        return {
            "mIoU": _nanmean(iou),
            "aAcc": float(self.areas[0].sum()) * 100.0 / total_label,
            "mAcc": _nanmean(acc),
        }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


__all__ = ["SEG_UNITS", "SegScores", "intersect_and_union"]

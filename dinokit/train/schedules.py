"""Training schedules. DINO's (spec "Schedules"): per-iteration learning rate, weight decay and
teacher momentum, and the per-epoch teacher temperature; fine-tuning's learning rate. Value k of a
per-iteration schedule is used at global iteration k, so a resumed run follows the uninterrupted
one exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .loss import teacher_temperature_schedule

__all__ = [
    "DINOSchedules",
    "build_schedules",
    "cosine_scheduler",
    "finetune_lr_schedule",
    "scaled_lr",
    "teacher_temperature_schedule",
]


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: ``linspace(start, base, W*I)`` (endpoints included), then for
    i = 0 .. E*I - W*I - 1: ``final + 0.5 (base - final)(1 + cos(pi i / (E*I - W*I)))``
    (DINO spec, "Schedules"; value k is used at global iteration k)."""
    total = int(epochs * niter_per_ep)
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    rest = total - warmup_iters
    iters = np.arange(rest)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * iters / max(rest, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule the paper uses: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256.0


@dataclass
class DINOSchedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def at(self, it: int, epoch: int) -> dict[str, float]:
        return {
            "lr": float(self.lr[it]),
            "wd": float(self.wd[it]),
            "momentum": float(self.momentum[it]),
            "teacher_temp": float(self.teacher_temp[min(epoch, len(self.teacher_temp) - 1)]),
        }


def build_schedules(
    *,
    epochs: int,
    niter_per_epoch: int,
    global_batch: int,
    lr: float = 5e-4,
    min_lr: float = 1e-6,
    warmup_epochs: float = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.996,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 0,
) -> DINOSchedules:
    """lr: linear warm-up from 0 over ``warmup_epochs`` to ``lr * global_batch / 256``, then cosine to
    ``min_lr``; weight decay: cosine ``weight_decay -> weight_decay_end``; teacher momentum: cosine
    ``momentum_teacher -> 1``; teacher temperature: per epoch (see :func:`teacher_temperature_schedule`)."""
    return DINOSchedules(
        lr=cosine_scheduler(
            scaled_lr(lr, global_batch), min_lr, epochs, niter_per_epoch, warmup_epochs=warmup_epochs
        ),
        wd=cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_epoch),
        momentum=cosine_scheduler(momentum_teacher, 1.0, epochs, niter_per_epoch),
        teacher_temp=teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs
        ),
    )


def finetune_lr_schedule(
    *,
    epochs: int,
    niter_per_epoch: int,
    peak_lr: float,
    min_lr: float,
    warmup_epochs: float,
    head_warmup_epochs: int = 0,
) -> np.ndarray:
    """Fine-tuning's per-iteration lr: the head-only warm-up epochs at ``peak_lr`` (constant), then
    the full phase with ``warmup_epochs`` of linear warm-up from 0 and a cosine down to ``min_lr``."""
    head = int(head_warmup_epochs)
    full = epochs - head
    warm = min(float(warmup_epochs), float(full))
    parts = [np.full(head * niter_per_epoch, peak_lr, dtype=np.float64)]
    if full > 0:
        parts.append(cosine_scheduler(peak_lr, min_lr, full, niter_per_epoch, warmup_epochs=warm))
    return np.concatenate(parts)

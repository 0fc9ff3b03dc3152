"""The DINO loss: cross-entropy between the teacher's centred, sharpened output and the student's
output over every (teacher global crop, student crop) pair but a crop with itself (paper Sec. 3.1,
Eq. 2-4, and Algorithm 1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import is_dist


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: ``linspace(warmup, final, W)`` for epochs 0..W-1, then final."""
    w = int(warmup_teacher_temp_epochs)
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, w),
            np.ones(max(int(nepochs) - w, 0)) * teacher_temp,
        )
    )


class DINOLoss(nn.Module):
    """DINO's self-distillation loss with centering and sharpening.

    Called as ``loss(student_output, teacher_output, epoch)``: ``student_output`` is
    (ncrops * B, out_dim) with crop c in rows c*B .. (c+1)*B - 1 (the two globals first),
    ``teacher_output`` is (2 * B, out_dim) for the two globals. Returns the mean over the
    2 * (ncrops - 1) pairs of the batch-mean cross-entropy ``sum_k -p_t log p_s``, with
    ``p_t = softmax((t - center) / temp_t)`` (no gradient) and ``p_s = softmax(s / student_temp)``.
    After the loss the ``center`` buffer moves towards the teacher's batch mean (all-reduced over
    ranks): ``center = m * center + (1 - m) * mean(t)``; the loss itself uses the old centre.

    The student's log-softmax is computed once per crop, not once per pair, and the sum over the
    student crops is shared by both teacher crops, so the cost does not grow with the pair count.
    The arithmetic runs in float32 whatever the autocast dtype.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        if ncrops < 2:
            raise ValueError("DINO needs at least the two global crops (ncrops >= 2)")
        self.out_dim = int(out_dim)
        self.ncrops = int(ncrops)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def teacher_temp(self, epoch: int) -> float:
        sched = self.teacher_temp_schedule
        return float(sched[min(int(epoch), len(sched) - 1)])

    @property
    def n_pairs(self) -> int:
        return 2 * (self.ncrops - 1)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        batch = teacher_output.shape[0] // 2
        if student_output.shape[0] != self.ncrops * batch:
            raise ValueError(
                f"student_output has {student_output.shape[0]} rows; expected ncrops * B = {self.ncrops * batch}"
            )
        temp = self.teacher_temp(epoch)
        log_p_s = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        log_p_s = log_p_s.view(self.ncrops, batch, -1)
        with torch.no_grad():
            p_t = F.softmax((teacher_output.detach().float() - self.center) / temp, dim=-1).view(2, batch, -1)
        # sum_v!=iq <p_t[iq], log p_s[v]> = <p_t[iq], sum_v log p_s[v]> - <p_t[iq], log p_s[iq]>
        total_log_p_s = log_p_s.sum(dim=0)
        cross = (p_t * (total_log_p_s.unsqueeze(0) - log_p_s[:2])).sum(dim=-1)  # (2, B)
        loss = -cross.mean(dim=1).sum() / self.n_pairs
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the batch of every rank."""
        batch_center = teacher_output.detach().float().sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if is_dist():
            torch.distributed.all_reduce(batch_center)
            count *= torch.distributed.get_world_size()
        batch_center = batch_center / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

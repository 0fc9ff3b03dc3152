"""DINO's trained state and its step (Caron et al. 2021, Sec. 3.1 and Algorithm 1).

A student and a teacher (backbone + DINO head) see multi-crop views of the same images; the student
learns to match the teacher's centred, sharpened output and the teacher is an EMA of the student.
:class:`DINOTrainingState` holds what is trained (and what a checkpoint restores); :func:`dino_step`
is one update: crops in, loss out, update applied. The loop around it is :mod:`dinokit.train.pretrain`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.head import DINOHead, MultiCropWrapper
from ..models.init import feature_dim
from ..models.registry import build_backbone, is_vit_arch
from ..runtime import autocast, is_dist, seed_everything
from .loss import DINOLoss
from .optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_parameter,
    ema_update,
    get_params_groups,
)
from .pretrain_settings import PretrainConfig
from .reduced_weights import ReducedWeights


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _fp32_head(head: nn.Module) -> None:
    """Run the head outside autocast: its logits are divided by temperatures as low as 0.04, where
    bf16's 8-bit mantissa would visibly blur the targets. The head is a few percent of the compute."""
    inner = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return inner(x.float())

    head.forward = forward


def build_student_teacher(cfg: PretrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop path) and teacher (same weights, no gradients), both backbone + DINO head."""
    assert cfg.out_dim is not None, "settings_for_run chooses out_dim"
    kw = {} if cfg.depth is None else {"depth": int(cfg.depth)}
    stochastic_depth = {"drop_path_rate": cfg.drop_path} if is_vit_arch(cfg.arch) else {}  # a ViT option
    student_bb = build_backbone(cfg.arch, cfg.patch_size, **stochastic_depth, **kw)
    teacher_bb = build_backbone(cfg.arch, cfg.patch_size, **kw)
    dim = feature_dim(student_bb)
    student = MultiCropWrapper(
        student_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
    )
    teacher = MultiCropWrapper(teacher_bb, DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


# ---------------------------------------------------------------------------------------------
# The training state and the DINO step
# ---------------------------------------------------------------------------------------------
@dataclass
class DINOTrainingState:
    """What a DINO run trains and what its checkpoint restores: student and teacher (backbone +
    DINO head), the optimiser, the fp16 gradient scaler (None otherwise) and the loss with its
    centre (Sec. 3.1: the teacher's output is centred and sharpened).

    ``student_forward``/``teacher_forward`` are what the step calls: the modules themselves, or
    their DistributedDataParallel / ``torch.compile`` wrappers. ``clip_grad``, ``clip_mode`` and
    ``freeze_last_layer`` are the step's recipe (Appendix: gradient clipping at 3.0, the head's
    last layer frozen during the first epoch).
    """

    student: MultiCropWrapper
    teacher: MultiCropWrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dino_loss: DINOLoss
    device: torch.device
    dtype: torch.dtype | None
    clip_grad: float = 3.0
    clip_mode: str = "param"
    freeze_last_layer: int = 1
    student_forward: Callable[..., Any] | None = None
    teacher_forward: Callable[..., Any] | None = None
    #: bf16 backbone weights cast once per step (the teacher's once per EMA update) instead of by
    #: autocast at every call: bitwise the same numbers (:mod:`dinokit.train.reduced_weights`)
    cast_once: bool = False

    def __post_init__(self) -> None:
        # "is None", not "or": a torch.compile wrapper has no truth value (it raises on len())
        if self.student_forward is None:
            self.student_forward = self.student
        if self.teacher_forward is None:
            self.teacher_forward = self.teacher
        self.last_layer_params = [p for n, p in self.student.named_parameters() if "last_layer" in n]
        self.trained_params = [p for p in self.student.parameters() if p.requires_grad]
        self.student_params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())
        self.student_weights = self.teacher_weights = None
        if self.cast_once and self.dtype is not None:
            self.student_weights = ReducedWeights(self.student, self.dtype)
            self.teacher_weights = ReducedWeights(self.teacher, self.dtype, keep=True)

    def forward_teacher(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's output for ``crops`` (call inside the step's autocast region, without grad)."""
        if self.teacher_weights is not None:
            return self.teacher_weights(self.teacher, crops)
        assert self.teacher_forward is not None  # set by __post_init__
        return self.teacher_forward(crops)

    def forward_student(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """The student's output for ``crops`` (call inside the step's autocast region)."""
        if self.student_weights is not None:
            return self.student_weights(self.student, crops)
        assert self.student_forward is not None  # set by __post_init__
        return self.student_forward(crops)

    def update_teacher(self, momentum: float) -> None:
        """The teacher follows the student by EMA; its bf16 copy is made again at its next forward."""
        ema_update(self.teacher_params, self.student_params, momentum)
        if self.teacher_weights is not None:
            self.teacher_weights.invalidate()

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": self.dino_loss.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's entries; raises KeyError/RuntimeError/ValueError when they do
        not fit these models (another arch, out_dim, optimiser)."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        if self.teacher_weights is not None:  # the teacher's weights were replaced in place
            self.teacher_weights.invalidate()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_training_state(
    cfg: PretrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    rank: int = 0,
    cast_once: bool | None = None,
) -> DINOTrainingState:
    """Student, teacher, optimiser, scaler and loss for ``cfg`` (with its data-chosen settings
    filled in). The weights are the same on every rank; then each rank gets its own random stream.

    ``cast_once`` (default: in bf16, in one process without ``torch.compile``): the backbones' bf16
    weights are cast once per step instead of by autocast at each call (the same numbers); under DDP
    or compile autocast casts them as before."""
    seed_everything(cfg.seed, 0)
    student, teacher = build_student_teacher(cfg)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
    if has_bn and is_dist():
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    _fp32_head(student.head)
    _fp32_head(teacher.head)
    student.to(device).train()
    teacher.to(device).train()
    seed_everything(cfg.seed, rank)

    student_ddp: nn.Module = student
    if is_dist():
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    student_forward: Callable[..., Any] = student_ddp
    teacher_forward: Callable[..., Any] = teacher
    if cfg.compile:
        student_forward = torch.compile(student_ddp)
        teacher_forward = torch.compile(teacher)
    if cast_once is None:
        cast_once = dtype == torch.bfloat16 and not is_dist() and not cfg.compile
    optimizer = build_optimizer(cfg.optimizer, get_params_groups(student))
    assert cfg.out_dim is not None, "settings_for_run chooses out_dim"
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    dino_loss = DINOLoss(
        cfg.out_dim,
        2 + cfg.local_crops,
        cfg.warmup_teacher_temp,
        cfg.teacher_temp,
        cfg.warmup_teacher_temp_epochs,
        cfg.epochs,
        center_momentum=cfg.center_momentum,
    ).to(device)
    return DINOTrainingState(
        student, teacher, optimizer, scaler, dino_loss, device, dtype,
        clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode, freeze_last_layer=cfg.freeze_last_layer,
        student_forward=student_forward, teacher_forward=teacher_forward, cast_once=bool(cast_once),
    )  # fmt: skip


def dino_step(
    state: DINOTrainingState, crops: list[torch.Tensor], epoch: int, values: dict[str, float]
) -> torch.Tensor:
    """One DINO update (Algorithm 1): the teacher sees the two global crops, the student all of
    them; the loss is back-propagated, gradients clipped, the head's last layer kept frozen in the
    first epochs, the optimiser steps and the teacher follows the student by EMA.

    ``values`` holds this iteration's ``lr``, ``wd`` (first parameter group only: biases and norms
    are not decayed) and teacher ``momentum``. Returns the loss (detached, on the device).
    """
    optimizer, scaler = state.optimizer, state.scaler
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = values["lr"]
        if i == 0:
            group["weight_decay"] = values["wd"]
    crops = [c.to(state.device, non_blocking=True) for c in crops]
    with autocast(state.device, state.dtype):
        with torch.no_grad():
            teacher_output = state.forward_teacher(crops[:2])
        student_output = state.forward_student(crops)
    loss = state.dino_loss(student_output, teacher_output, epoch)

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if state.clip_grad and state.clip_grad > 0:
        if state.clip_mode == "global":
            clip_gradients_global(state.trained_params, state.clip_grad)
        else:
            clip_gradients_per_parameter(state.trained_params, state.clip_grad)
    cancel_last_layer_gradients(state.last_layer_params, epoch, state.freeze_last_layer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    state.update_teacher(values["momentum"])
    return loss.detach()

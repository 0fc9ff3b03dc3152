"""The settings of a DINO pretraining run: :class:`PretrainConfig` (the reference code's ViT defaults), the
defaults chosen from the size of the data when left unset, their checks, and the settings a resumed
run keeps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DinokitError
from ..models.registry import arch_generation, canonical_arch
from ..run import RunOptions
from ..runtime import RuntimeOptions, check_numbers
from .optim import OPTIMIZERS

log = logging.getLogger("dinokit")

#: config fields a resumed run takes from the command line rather than from the saved config
RUNTIME_FIELDS = (
    "resume",
    "overwrite",
    "stop_after",
    "num_workers",
    "threads",
    "device",
    "compile",
    "output",
    "data",
    "checkpoint_minutes",
    "strict",
)
#: settings chosen from the data when left unset
AUTO_FIELDS = ("out_dim", "momentum_teacher", "warmup_epochs", "global_scale")


@dataclass
class PretrainConfig(RuntimeOptions, RunOptions):
    """Everything a DINO run needs; defaults are the reference code's (``main_dino.py``), the paper's ViT
    recipe except its teacher-temperature warm-up 0.04 -> 0.07 over 30 epochs (spec "Schedules").

    ``out_dim``, ``momentum_teacher`` and ``warmup_epochs`` left as None are chosen from the data
    (see :func:`resolve_auto_settings`). The runtime fields (device, precision, batch_size,
    num_workers, seed) come from :class:`~dinokit.runtime.RuntimeOptions`; a pretraining run builds
    its own student and teacher, so it has arch and patch size but no weights. How the run is driven
    (resume, overwrite, stop_after, checkpoint_minutes, threads) comes from
    :class:`~dinokit.run.RunOptions`.
    """

    data: str | None = None
    output: str = "runs/pretrain"
    arch: str = "vit_small"
    patch_size: int = 16
    depth: int | None = None
    epochs: int = 100
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float | None = None
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float | None = None
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    out_dim: int | None = None
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    freeze_last_layer: int = 1
    clip_grad: float = 3.0
    clip_mode: str = "param"
    drop_path: float = 0.1
    optimizer: str = "adamw"
    local_crops: int = 8
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] = (0.05, 0.4)
    center_momentum: float = 0.9
    compile: bool = False
    num_workers: int = field(
        default=4, kw_only=True
    )  #: RuntimeOptions says 0; DINO decodes many crops per image
    save_every: int = 20

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("global_scale", "local_scale"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Settings that follow the data
# ---------------------------------------------------------------------------------------------
AUTO_RULE = (
    "Left unset, out_dim is the power of two nearest the number of images, between 1024 and 65536 "
    "(65536 from about 46k images); the teacher momentum is 0.996, lowered to 1 - 10/T (at least 0.99) "
    "when the run has fewer than T = 2500 iterations; the lr warm-up is 10 epochs, or a tenth of "
    "--epochs when that is fewer; the per-process batch is cut to fit a data set smaller than one "
    "global batch."
)


def auto_out_dim(n_images: int) -> int:
    return int(min(65536, max(1024, 2 ** round(math.log2(max(n_images, 1))))))


def auto_momentum_teacher(total_iterations: int) -> float:
    if total_iterations >= 2500:
        return 0.996
    return float(max(0.99, 1.0 - 10.0 / max(total_iterations, 1)))


def auto_warmup_epochs(epochs: int) -> float:
    return float(min(10.0, epochs / 10.0))


def resolve_auto_settings(
    cfg: PretrainConfig, n_images: int, world_size: int
) -> tuple[PretrainConfig, list[str]]:
    """Fill the settings left as None from the data (rule: :data:`AUTO_RULE`); returns notes for the log."""
    notes = []
    cfg = dataclasses.replace(cfg)
    if cfg.batch_size * world_size > n_images:
        new = max(1, n_images // world_size)
        notes.append(f"batch size {cfg.batch_size} per process is more than the data set allows; using {new}")
        cfg.batch_size = new
    iters = n_images // (cfg.batch_size * world_size)
    if cfg.out_dim is None:
        cfg.out_dim = auto_out_dim(n_images)
        notes.append(f"out_dim {cfg.out_dim} for {n_images} images")
    if cfg.momentum_teacher is None:
        cfg.momentum_teacher = auto_momentum_teacher(iters * cfg.epochs)
        notes.append(f"teacher momentum {cfg.momentum_teacher:.4g} for {iters * cfg.epochs} iterations")
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = auto_warmup_epochs(cfg.epochs)
        notes.append(f"lr warm-up {cfg.warmup_epochs:g} epochs")
    if cfg.global_scale is None:
        cfg.global_scale = (0.4, 1.0) if cfg.local_crops > 0 else (0.14, 1.0)
    return cfg, notes


def validate_config(cfg: PretrainConfig) -> None:
    if arch_generation(cfg.arch) != 1:
        raise DinokitError(
            f"{canonical_arch(cfg.arch)} is a DINOv{arch_generation(cfg.arch)} architecture; dinokit pretrain "
            "trains DINO (v1) ViTs and the ResNet-50 only, so choose vit_tiny, vit_small, vit_base or resnet50."
        )
    check_numbers(
        cfg,
        positive=("lr", "teacher_temp", "warmup_teacher_temp"),
        non_negative=(
            "min_lr",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "checkpoint_minutes",
            "drop_path",
        ),
        fractions=("momentum_teacher", "center_momentum"),
    )
    if cfg.epochs < 1:
        raise DinokitError("--epochs must be at least 1.")
    if cfg.warmup_epochs is not None and cfg.warmup_epochs > cfg.epochs:
        raise DinokitError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs {cfg.epochs}.")
    if cfg.local_crops < 0:
        raise DinokitError("--local-crops must be 0 or more.")
    if cfg.optimizer.lower() not in OPTIMIZERS:
        raise DinokitError(f"Unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if cfg.clip_mode not in ("param", "global"):
        raise DinokitError("--clip-mode must be 'param' or 'global'.")
    for name, scale in (("--global-scale", cfg.global_scale), ("--local-scale", cfg.local_scale)):
        if scale is not None and not (0 < scale[0] <= scale[1] <= 1):
            raise DinokitError(f"{name} must be two fractions 0 < min <= max <= 1, got {scale}.")
    if cfg.arch != "resnet50" and canonical_arch(cfg.arch) != "resnet50":
        for name, size in (("--global-size", cfg.global_size), ("--local-size", cfg.local_size)):
            if size < cfg.patch_size:
                raise DinokitError(f"{name} {size} is smaller than one {cfg.patch_size}-pixel patch.")
    if cfg.out_dim is not None and cfg.out_dim < 2:
        raise DinokitError("--out-dim must be at least 2.")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise DinokitError("--stop-after must be at least 1.")


def settings_for_run(
    cfg: PretrainConfig, saved: dict | None, n_images: int, world_size: int
) -> PretrainConfig:
    """``cfg`` with the data-chosen settings filled in. A resumed run (``saved``: its checkpoint's
    config) keeps the settings it chose from the data, even if the folder changed, and warns about
    recipe settings that differ from the saved ones."""
    if saved is not None:
        fill = {k: saved[k] for k in AUTO_FIELDS if getattr(cfg, k) is None and saved.get(k) is not None}
        cfg = PretrainConfig.from_dict({**cfg.to_dict(), **fill})
    cfg, notes = resolve_auto_settings(cfg, n_images, world_size)
    if saved is not None:
        changed = [
            k for k, v in cfg.to_dict().items()
            if k not in RUNTIME_FIELDS and k in saved and saved[k] != v
        ]  # fmt: skip
        if changed:
            log.warning("resuming with settings that differ from the saved run: %s", ", ".join(changed))
    for n in notes:
        log.info("%s", n)
    validate_config(cfg)
    return cfg

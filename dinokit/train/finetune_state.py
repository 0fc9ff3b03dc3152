"""What a fine-tuning run is made of (paper, Sec. 4.2.3; the recipe is :mod:`dinokit.train.finetune`):
its batch plan, the model it builds, its datasets, what stays fixed while it trains
(:class:`FinetuneSetup`) and what changes and is checkpointed (:class:`FinetuneState`)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..checkpoints import FINETUNE_CHECKPOINT_FORMAT, load_backbone
from ..checkpoints.backbone import backbone_normalization, given_normalization
from ..data.images import ImageDataset
from ..data.normalization import IMAGENET, Normalization
from ..data.splits import SeededImages, Splits
from ..data.transforms import eval_transform, resize_for
from ..errors import DataError
from ..models.head import FinetuneModel
from ..models.registry import backbone_spec, build_backbone, is_vit
from ..runtime import DistEnv, derive_seed, loader_workers
from .augment import BatchMixer, finetune_train_transform
from .optim import layer_decay_param_groups

if TYPE_CHECKING:  # the recipe imports this module
    from ..run import TrainingRun
    from .finetune import FinetuneConfig

log = logging.getLogger("dinokit")


@dataclass
class BatchPlan:
    batch_size: int  # per process
    global_batch: int
    num_workers: int
    niter: int  # steps per epoch
    peak_lr: float


def plan_batches(cfg: FinetuneConfig, num_train: int, world: int, device: torch.device) -> BatchPlan:
    """Batch size, workers, steps per epoch and the peak lr (linear scaling to the global batch)."""
    # fewer images than one global batch: shrink the batch instead of training on nothing
    batch_size = cfg.batch_size
    if num_train < batch_size * world:
        batch_size = num_train // world
        if batch_size < 1:
            raise DataError(
                f"{num_train} training image{'s' if num_train != 1 else ''} cannot be shared among {world} processes."
            )
        log.warning(
            "--batch-size %d is more than the %d training images; using batches of %d images.",
            cfg.batch_size,
            num_train,
            batch_size * world,
        )
    global_batch = batch_size * world
    num_workers = loader_workers(cfg.num_workers, device, world)
    if num_workers < cfg.num_workers:
        log.info("%d data-loader worker(s) instead of %d: the compute threads take the other cores", num_workers,
                 cfg.num_workers)  # fmt: skip
    niter = num_train // global_batch
    return BatchPlan(batch_size, global_batch, num_workers, niter, cfg.lr * global_batch / 1024.0)


@dataclass
class FinetuneSetup:
    """What stays fixed while a run trains."""

    cfg: FinetuneConfig
    out: Path
    env: DistEnv
    device: torch.device
    dtype: torch.dtype | None
    classes: list[str]
    spec: dict  # the backbone's shape (see dinokit.models.registry.backbone_spec)
    plan: BatchPlan
    schedule: np.ndarray
    mixer: BatchMixer
    train_ds: SeededImages
    val_ds: ImageDataset
    run: TrainingRun  #: the run skeleton: stop, checkpoint cadence, checkpoint writing


@dataclass
class EpochTotals:
    """The running sums of an epoch (saved in a mid-epoch checkpoint so the epoch's log line is exact)."""

    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0
    images: int = 0


@dataclass
class FinetuneState:
    """What changes while a run trains, and what its ``checkpoint.pth`` saves."""

    model: FinetuneModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    best: dict = field(default_factory=lambda: {"top1": None, "top5": None, "epoch": None})
    totals: EpochTotals = field(default_factory=EpochTotals)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        model: FinetuneModel,
        cfg: FinetuneConfig,
        peak_lr: float,
        device: torch.device,
        dtype: torch.dtype | None,
    ) -> FinetuneState:
        """AdamW over the layer-decay parameter groups, and a gradient scaler for fp16."""
        groups = layer_decay_param_groups(model, cfg.weight_decay, cfg.layer_decay)
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "param_names"} for g in groups],
            lr=peak_lr,
            betas=(0.9, 0.999),
        )
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(model, optimizer, scaler)

    def checkpoint(self, setup: FinetuneSetup, epoch: int, step: int) -> dict:
        return {
            "format": FINETUNE_CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "niter": setup.plan.niter,
            "best": self.best,
            "carry": dataclasses.asdict(self.totals),  # key name kept: earlier runs' checkpoints resume
            "config": setup.cfg.to_dict(),
            "classes": setup.classes,
            "backbone_spec": setup.spec,
        }

    def restore(self, saved: dict) -> tuple[int, int]:
        """Load a checkpoint's model, optimiser, scaler, best score and epoch totals; returns the
        (epoch, step) to continue from."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.best = dict(saved["best"])
        self.totals = EpochTotals(**saved["carry"])
        return int(saved["epoch"]), int(saved["step"])


def build_model(
    cfg: FinetuneConfig, resume_state: dict | None, num_classes: int
) -> tuple[FinetuneModel, dict]:
    """The backbone (as saved when resuming, else loaded and seeded) with a new head; and its spec."""
    if resume_state is not None:
        spec = resume_state["backbone_spec"]
        backbone = build_backbone(spec["arch"], spec["patch_size"], **spec["kwargs"])
    else:
        # stochastic depth, and the position table of a random init at the training size; the
        # weights decide whether the backbone is a ViT, so load_backbone applies them
        vit_options: dict = {"drop_path_rate": cfg.drop_path}
        if cfg.weights == "random":
            vit_options["img_size"] = cfg.image_size
        # The random init (and the head's) is seeded from (seed, 3), not by prepare_backbone's
        # seed_everything(seed): the same --seed keeps giving the same network as before.
        torch.manual_seed(derive_seed(cfg.seed, 3))
        backbone = load_backbone(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, vit_options=vit_options,
                                 **cfg.model_kwargs)  # fmt: skip
        spec = backbone_spec(backbone, cfg.drop_path)
        # the input normalisation belongs to the weights (--mean/--std on top); kept with the spec, so
        # that a resumed run and the model.pth it writes use the same
        spec["normalization"] = given_normalization(
            backbone_normalization(backbone), cfg.mean, cfg.std
        ).record()
        if not is_vit(backbone) and cfg.drop_path:
            log.info("drop path applies to ViT backbones only; the ResNet-50 trains without it.")
    return FinetuneModel(backbone, num_classes), spec


def spec_normalization(spec: dict) -> Normalization:
    """The input normalisation a backbone spec keeps (ImageNet's for a spec saved without one)."""
    saved = spec.get("normalization")
    if not saved:
        return IMAGENET
    return Normalization(tuple(saved["mean"]), tuple(saved["std"]), saved.get("source", IMAGENET.source))


def build_datasets(
    cfg: FinetuneConfig, splits: Splits, norm: Normalization = IMAGENET
) -> tuple[SeededImages, ImageDataset]:
    """The augmented, seeded training set and the centre-cropped validation set, normalised with ``norm``."""
    train_ds = SeededImages(
        ImageDataset(
            [p for p, _ in splits.train],
            [t for _, t in splits.train],
            transform=finetune_train_transform(cfg.image_size, cfg.randaugment, cfg.min_crop_scale, norm),
            strict=cfg.strict,
            exact_decode=cfg.exact_decode,
        ),
        cfg.seed,
    )
    val_ds = ImageDataset(
        [p for p, _ in splits.val],
        [t for _, t in splits.val],
        transform=eval_transform(resize_for(cfg.image_size), cfg.image_size, norm),
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )
    return train_ds, val_ds

"""The linear probe on frozen features (paper, Sec. 4.1 and Appendix), and the logistic-regression probe.

The backbone is frozen; a ``Linear(dim, classes)`` (weight N(0, 0.01), bias 0) is trained with SGD
(momentum 0.9, no weight decay) at ``lr = 0.001 * batch / 256`` following a cosine to 0 over 100
epochs. The paper's path trains on images with RandomResizedCrop(224) + horizontal flip and
validates with Resize(256) + CenterCrop(224); the fast path (``features_only``) trains on the
cached centre-crop features instead (no augmentation, much faster, usually a little lower).
Defaults per architecture follow the paper: ViT-S uses the CLS tokens of the last 4 blocks, ViT-B
the last CLS token with the average of the patch tokens (interleaved, as the released heads need).
DINOv2 and DINOv3 backbones follow DINOv2's linear protocol: the CLS tokens of the last 1 or 4
blocks, optionally followed by the average patch token (appended, not interleaved; 4 blocks with the
average by default, the input of DINOv2's released 4-layer heads).

A checkpoint is written after every epoch (atomically) and ``resume`` continues from it. The
released heads (``*_linearweights.pth``) are validated with ``evaluate``. The appendix's
logistic-regression probe on frozen features is :func:`logistic_probe` (scikit-learn).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from ..checkpoints import (
    LINEAR_PRESETS,
    BackboneOptions,
    extract_backbone_state_dict,
    infer_arch,
    load_linear_head,
    map_weight_norm_keys,
    prepare_backbone,
    read_checkpoint,
    weights_needed,
)
from ..data.images import ImageDataset, collate_skip_none, readable_batches
from ..data.normalization import IMAGENET, Normalization
from ..data.transforms import normalize
from ..errors import CheckpointError, DataError, DinokitError
from ..io import append_jsonl, prepare_output_dir, write_metrics
from ..models.head import LinearClassifier
from ..models.inference import inference_model
from ..models.registry import backbone_arch, canonical_arch, is_vit
from ..models.vit import variant_generation
from ..presets import fetch_hf_weights, is_hf_repo_id, resolve_preset
from ..progress import NULL_PROGRESS, Progress
from ..run import RunKind, RunOptions, TrainingRun
from ..runtime import (
    RuntimeOptions,
    autocast,
    check_numbers,
    dist_env,
    ensure_finite_loss,
    get_rng_state,
    is_dist,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from .features import (
    MODEL_KEYS,
    Embedder,
    FeatureSpec,
    align_labels,
    check_fingerprint,
    check_same_model,
    cls_feature_fn,
    load_features,
    rank_shard_loader,
    scan_images,
)
from .linear_grid import EPOCHS as GRID_EPOCHS
from .linear_grid import PROTOCOLS, protocol_of
from .linear_grid_run import GRID_FORMAT, train_grid
from .metrics import percent, require_finite, topk_correct

log = logging.getLogger("dinokit")

#: the scale of each score in metrics.json: accuracies in percent, as the paper reports them
UNITS = {"top1": "percent", "top5": "percent"}
CHECKPOINT_NAME = "checkpoint.pth"
#: the files a probe run writes: a fresh run in the same folder removes an earlier run's first (the
#: feature caches stay: they are reused when their fingerprint matches)
RUN_FILES = ("log.jsonl", CHECKPOINT_NAME, "metrics.json")
MISSING_WEIGHTS = weights_needed("for the backbone to probe")
CHECKPOINT_FORMAT = "dinokit-linear-1"
#: DINO's probe (the paper's): 100 epochs at a base lr of 0.001
DINO_EPOCHS, DINO_LR = 100, 0.001
#: a probe run's folder, to the run skeleton: a resumed run may change where its data is and how it
#: runs; its epochs are its recipe (the cosine schedule depends on them)
LINEAR_RUN = RunKind(
    command="linear", noun="linear probe run", files=RUN_FILES, formats=(CHECKPOINT_FORMAT, GRID_FORMAT),
    keys=("state_dict", "optimizer", "epoch"), unit="epoch",
    may_change=frozenset({"train", "val", "train_features", "val_features", "num_workers", "device", "precision",
                          "strict", "exact_decode"}),
)  # fmt: skip


def default_feature_options(arch: str) -> tuple[int, bool]:
    """(n_last_blocks, avgpool_patch_tokens) of one probe for ``arch``: the DINO paper's for DINO's
    ViTs; for DINOv2 backbones the input of DINOv2's released 4-layer heads (the CLS tokens of the last
    4 blocks followed by the average patch token); for DINOv3 backbones DINOv3's (the last block's CLS
    token followed by the average patch token). The DINOv2/DINOv3 protocols search a grid of them
    (:mod:`dinokit.eval.linear_grid`)."""
    if variant_generation(arch) == 3:
        return 1, True
    if variant_generation(arch) == 2:
        return 4, True
    if arch == "vit_base":
        return 1, True
    if arch in ("vit_small", "vit_tiny"):
        return 4, False
    return 1, False


@dataclass
class LinearConfig(BackboneOptions, RuntimeOptions, RunOptions):
    """What ``dinokit linear`` needs. ``weights`` None: no backbone (and no check of given feature
    files); the backbone, runtime and run fields come from the option mixins (the probe writes its
    checkpoint at the end of each epoch: ``checkpoint_minutes`` does not apply)."""

    output: Path
    train: Path | None = None
    val: Path | None = None
    train_features: Path | None = None
    val_features: Path | None = None
    n_last_blocks: int | None = None  # None: the paper's default for the arch
    avgpool_patch_tokens: bool | None = None
    epochs: int | None = (
        None  # None: the protocol's (DINO: 100 epochs; DINOv2/v3: 10 of epoch_length iterations)
    )
    batch_size: int = field(default=128, kw_only=True)
    lr: float | None = None  # scaled by batch * world / 256; None: DINO's 0.001, or DINOv2/v3's grid
    protocol: str | None = None  # dino, dinov2 or dinov3; None: the weights' generation
    epoch_length: int | None = None  # DINOv2/v3: iterations per epoch (None: 1250)
    momentum: float = 0.9
    weight_decay: float = 0.0
    features_only: bool = False  # = augment "none"
    augment: str = "official"  # "none": features computed once (centre crops), the probe trains on them
    logistic: bool = False
    logistic_c: float = 1.0
    logistic_max_iter: int = 1000
    evaluate: bool = False
    linear_weights: str | None = None
    val_every: int = 1
    resize: int = 256
    crop: int = 224
    min_scale: float = 0.08

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class LinearResult:
    mode: str  # "images", "features", "evaluate" or "logistic"
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    num_classes: int = 0
    feature_dim: int = 0
    n_train: int = 0
    n_val: int = 0
    n_last_blocks: int = 1
    avgpool_patch_tokens: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0  #: of the schedule (training modes)
    epochs_done: int = 0  #: of the schedule, when this invocation ended
    signal: int = 0  #: the signal that stopped it (0: none)
    stopped_by: str | None = None  #: a signal's name, "stop-after", or None when the schedule ended
    exit_code: int = 0
    metrics_path: Path | None = None
    protocol: str = "dino"  #: whose recipe trained it: dino, dinov2 or dinov3
    heads: list[dict] = field(default_factory=list)  #: DINOv2/v3: every head with its val accuracy
    chosen: dict | None = None  #: DINOv2/v3: the head chosen on the validation split
    epoch_length: int = 0  #: DINOv2/v3: iterations per epoch

    def metrics(self) -> dict[str, Any]:
        if self.mode.startswith("grid"):
            headline = (
                {k: self.chosen[k] for k in ("top1", "top5")} if self.chosen and "top1" in self.chosen else {}
            )
            return {
                "linear": {**headline, "protocol": self.protocol, "chosen": self.chosen, "heads": self.heads}
            }
        if self.mode == "logistic":
            return {"logistic": self.final}
        if self.mode == "evaluate":
            return {"linear": {"final": self.final}}
        # the headline is the best epoch, as the reference reports it and the paper quotes it
        headline = {k: self.best[k] for k in ("top1", "top5", "epoch") if k in self.best}
        return {"linear": {**headline, "final": self.final, "best": self.best}}


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def _feature_spec(cfg: LinearConfig, n_last_blocks: int, avgpool: bool, batch_size: int | None = None):
    return FeatureSpec(
        weights=cfg.weights,
        arch=cfg.arch,
        patch_size=cfg.patch_size,
        checkpoint_key=cfg.checkpoint_key,
        model_kwargs=dict(cfg.model_kwargs),
        mean=cfg.mean,
        std=cfg.std,
        n_last_blocks=n_last_blocks,
        avgpool_patch_tokens=avgpool,
        resize=cfg.resize,
        crop=cfg.crop,
        batch_size=batch_size or cfg.batch_size,
        num_workers=cfg.num_workers,
        device=cfg.device,
        precision=cfg.precision,
        seed=cfg.seed,
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )


def _resolve_options(cfg: LinearConfig, model: nn.Module | None) -> tuple[int, bool]:
    if model is not None and not is_vit(model):
        return 1, False
    arch = backbone_arch(model) if model is not None else (cfg.arch or "vit_small")
    n, avg = default_feature_options(arch)
    n = min(n, getattr(model, "depth", n) or n)  # a shallow test model has fewer than 4 blocks
    return (
        cfg.n_last_blocks if cfg.n_last_blocks is not None else n,
        cfg.avgpool_patch_tokens if cfg.avgpool_patch_tokens is not None else avg,
    )


def probe_train_transform(
    crop: int = 224, min_scale: float = 0.08, norm: Normalization = IMAGENET, bicubic: bool = False
) -> T.Compose:
    """The probe's augmentation: RandomResizedCrop + horizontal flip + the weights' normalisation;
    bilinear as DINO's reference, bicubic as DINOv2's and DINOv3's official transforms
    (fine-tuning's stronger augmentation is :func:`dinokit.train.augment.train_transform`)."""
    mode = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.RandomResizedCrop(crop, scale=(min_scale, 1.0), interpolation=mode),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize(norm),
        ]
    )


def dino_recipe(cfg: LinearConfig) -> LinearConfig:
    """``cfg`` with DINO's probe length and learning rate where it leaves them to the protocol."""
    return replace(
        cfg,
        epochs=cfg.epochs if cfg.epochs is not None else DINO_EPOCHS,
        lr=cfg.lr if cfg.lr is not None else DINO_LR,
    )


def _recipe(cfg: LinearConfig) -> dict[str, Any]:
    """The probe's recipe in its run identity (with the features, classes and mode)."""
    return {
        "batch_size": cfg.batch_size,
        "lr_base": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
    }


def _head_state(probe: nn.Module) -> dict[str, torch.Tensor]:
    m = getattr(probe, "module", probe)  # the classifier inside a DistributedDataParallel
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


class _ProbeRun:
    """Optimiser, schedule, checkpointing and the epoch bookkeeping shared by both training paths,
    inside the run skeleton ``run`` (folder, lock, resume, stop)."""

    def __init__(
        self,
        cfg: LinearConfig,
        dim: int,
        num_classes: int,
        identity: dict,
        world: int,
        device,
        run: TrainingRun,
    ):
        cfg = dino_recipe(cfg)
        assert cfg.epochs is not None and cfg.lr is not None  # dino_recipe fills both in
        self.cfg = cfg
        self.total_epochs = cfg.epochs
        self.run = run
        self.out = Path(cfg.output)
        self.identity = identity
        seed_everything(cfg.seed)
        self.probe: nn.Module = LinearClassifier(dim, num_classes).to(device)
        self.lr = cfg.lr * cfg.batch_size * world / 256.0
        self.optimizer = torch.optim.SGD(
            self.probe.parameters(), lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs, eta_min=0)
        self.start_epoch = 0
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.history: list[dict] = []
        self.signum = 0

    def maybe_resume(self, progress: Progress) -> None:
        """Continue from the checkpoint the run resumes (its identity checked), or start afresh."""
        self.run.check_identity(self.identity)
        ck = self.run.checkpoint
        if ck is None:
            return
        path = self.out / CHECKPOINT_NAME
        if int(ck.get("epochs", self.total_epochs)) != self.total_epochs:
            raise CheckpointError(
                f"{path} was made for {ck.get('epochs')} epochs, not {self.total_epochs}; the cosine schedule "
                "depends on it, so pass the same --epochs."
            )
        target = getattr(self.probe, "module", self.probe)  # the classifier inside a DistributedDataParallel
        target.load_state_dict(ck["state_dict"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.start_epoch = int(ck["epoch"])
        self.best = dict(ck.get("best", {}))
        self.last = dict(ck.get("last", {}))
        self.history = list(ck.get("history", []))
        if "rng" in ck:
            set_rng_state(ck["rng"])
        progress.log(f"resuming from epoch {self.start_epoch} of {self.total_epochs}")

    def epochs(self) -> range:
        """The epochs of this invocation: from the resumed one to the schedule's end or --stop-after."""
        return range(self.start_epoch, self.run.end(self.total_epochs))

    def stopping(self) -> bool:
        """Between steps: whether a signal asked every rank to stop (the step in flight is done; the
        checkpoint of the last whole epoch is the state to resume, exactly)."""
        self.signum = self.signum or self.run.poll()[0]
        return bool(self.signum)

    def end_epoch(self, epoch: int, loss: float, scores: dict | None, is_main: bool) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        row = {"epoch": epoch + 1, "loss": loss, "lr": lr}
        if scores is not None:
            row.update(scores)
            self.last = dict(scores)
            if not self.best or scores["top1"] > self.best["top1"]:
                self.best = {**scores, "epoch": epoch + 1}
        self.history.append(row)
        with self.run.saving():
            if is_main:
                append_jsonl(self.out / "log.jsonl", row)
            self.run.write_checkpoint({
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "epochs": self.total_epochs,
                "state_dict": _head_state(self.probe),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "best": self.best,
                "last": self.last,
                "history": self.history,
                "identity": self.identity,
                "config": self.cfg.to_dict(),
                "rng": get_rng_state(),
            })  # fmt: skip
        self.signum = self.signum or self.run.agreed_signal()

    def result(self, mode: str, **kw) -> LinearResult:
        epochs_done = self.history[-1]["epoch"] if self.history else self.start_epoch
        outcome = self.run.outcome(epochs_done, self.total_epochs, self.signum)
        return LinearResult(
            mode=mode,
            final=dict(self.last),
            best=dict(self.best),
            epochs_run=len(self.history),
            epochs=self.total_epochs,
            epochs_done=epochs_done,
            signal=self.signum,
            stopped_by=outcome.stopped_by,
            exit_code=outcome.exit_code,
            **kw,
        )


# ---------------------------------------------------------------------------------------------
# Fast path: cached features
# ---------------------------------------------------------------------------------------------
def _feature_sets(cfg: LinearConfig, progress: Progress, n: int | None = None, avg: bool | None = None):
    """Train/val feature sets (from files, or embedded and cached in the output) and the options used."""
    given = (cfg.train_features is not None, cfg.val_features is not None)
    if any(given) and not all(given):
        raise DataError("Give both --train-features and --val-features, or neither.")
    if cfg.train_features is not None and cfg.val_features is not None:
        train, val = load_features(cfg.train_features), load_features(cfg.val_features)
        check_same_model(train, val, str(cfg.train_features), str(cfg.val_features))
        if cfg.weights is not None:
            model = prepare_backbone(cfg, missing=MISSING_WEIGHTS).model
            n0, avg0 = _resolve_options(cfg, model)
            emb = Embedder(
                _feature_spec(
                    cfg,
                    train.fingerprint.get("n_last_blocks", n0),
                    train.fingerprint.get("avgpool_patch_tokens", avg0),
                ),
                model=model,
            )
            check_fingerprint(train, emb.fingerprint, str(cfg.train_features), MODEL_KEYS)
        fp = train.fingerprint
        return train, val, fp.get("n_last_blocks", 1), fp.get("avgpool_patch_tokens", False)
    if cfg.train is None or cfg.val is None:
        raise DataError("Give --train and --val image folders (or --train-features and --val-features).")
    train_images = scan_images(cfg.train, labelled=True)
    val_images = scan_images(cfg.val, classes=train_images.classes, labelled=True)
    model = prepare_backbone(cfg, missing=MISSING_WEIGHTS).model
    if n is None:
        n, avg = _resolve_options(cfg, model)
    assert avg is not None  # given with n, or resolved with it
    emb = Embedder(_feature_spec(cfg, n, avg), model=model)
    out = Path(cfg.output)
    train = emb.embed(
        train_images, cache=out / "train_features.pt", progress=progress, description="train features"
    )
    val = emb.embed(val_images, cache=out / "val_features.pt", progress=progress, description="val features")
    return train, val, n, avg


def train_on_features(
    cfg: LinearConfig, run: TrainingRun, progress: Progress = NULL_PROGRESS
) -> LinearResult:
    """The fast path: the probe trained on cached (centre-crop) features, inside ``run``."""
    train, val, n, avg = _feature_sets(cfg, progress)
    require_finite(train.features, "The training features")
    require_finite(val.features, "The validation features")
    val_labels = align_labels(train, val, "training", "validation")
    C = max(len(train.classes), int(train.labels.max()) + 1)
    device = resolve_device(cfg.device)
    identity = {
        "mode": "features",
        "feature_fingerprint": {k: v for k, v in train.fingerprint.items() if k != "data"},
        "num_classes": C,
        "dim": train.dim,
        "classes": list(train.classes),
        **_recipe(cfg),
    }
    probe = _ProbeRun(cfg, train.dim, C, identity, world=1, device=device, run=run)
    probe.maybe_resume(progress)
    xs, ys = train.features.to(device), train.labels.to(device)
    xv, yv = val.features.to(device), val_labels.to(device)
    n_train = len(train)
    steps = math.ceil(n_train / cfg.batch_size)
    task = progress.task("linear probe (features)", total=len(probe.epochs()) * steps)
    for epoch in probe.epochs():
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(n_train, generator=g).to(device)
        probe.probe.train()
        total = 0.0
        for s in range(steps):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            loss = F.cross_entropy(probe.probe(xs[idx]), ys[idx])
            probe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            probe.optimizer.step()
            total += loss.item() * len(idx)
            task.advance(1, epoch=epoch + 1, loss=loss.item())
            if probe.stopping():
                break
        if probe.signum:
            break
        _check_finite(total, epoch)
        scores = None
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            scores = _score_logits(probe.probe, xv, yv, cfg.batch_size * 8)
        probe.end_epoch(epoch, total / n_train, scores, dist_env().is_main)
        if probe.signum:
            break
    task.close()
    return probe.result(
        "features",
        num_classes=C,
        feature_dim=train.dim,
        n_train=n_train,
        n_val=len(val),
        n_last_blocks=n,
        avgpool_patch_tokens=avg,
        fingerprint=dict(train.fingerprint),
    )


def _check_finite(loss: float, epoch: int) -> None:
    ensure_finite_loss(loss, f"The probe's loss became {{loss}} in epoch {epoch + 1}; lower --lr.")


@torch.no_grad()
def _score_logits(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> dict[str, float]:
    probe.eval()
    c1 = c5 = 0
    for s in range(0, len(x), chunk):
        a, b = topk_correct(probe(x[s : s + chunk]), y[s : s + chunk])
        c1, c5 = c1 + a, c5 + b
    return {"top1": percent(c1, len(x)), "top5": percent(c5, len(x))}


# ---------------------------------------------------------------------------------------------
# The paper's path: images with augmentation
# ---------------------------------------------------------------------------------------------
def train_on_images(cfg: LinearConfig, run: TrainingRun, progress: Progress = NULL_PROGRESS) -> LinearResult:
    """The paper's probe: frozen backbone, RandomResizedCrop + flip on the training images; under
    torchrun each process takes a shard of every epoch and the probe is wrapped in DDP."""
    if cfg.train is None or cfg.val is None:
        raise DataError("Give --train and --val image folders for the probe on images.")
    train_images = scan_images(cfg.train, labelled=True)
    val_images = scan_images(cfg.val, classes=train_images.classes, labelled=True)
    backbone = prepare_backbone(cfg, missing=MISSING_WEIGHTS)
    model, device = backbone.model, backbone.device
    for p in model.parameters():
        p.requires_grad_(False)
    n, avg = _resolve_options(cfg, model)
    emb = Embedder(_feature_spec(cfg, n, avg), model=model)
    feature_fn = cls_feature_fn(n, avg)
    with torch.no_grad():
        probe_in = torch.zeros(1, 3, cfg.crop, cfg.crop, device=device)
        dim = int(feature_fn(model, probe_in).shape[1])
    C = len(train_images.classes)
    world = dist_env().world_size if is_dist() else 1
    identity = {
        "mode": "images",
        "feature_fingerprint": {k: v for k, v in emb.fingerprint.items() if k != "data"},
        "num_classes": C,
        "dim": dim,
        "classes": list(train_images.classes),
        **_recipe(cfg),
    }
    probe = _ProbeRun(cfg, dim, C, identity, world=world, device=device, run=run)
    probe.maybe_resume(progress)
    if is_dist():
        probe.probe = nn.parallel.DistributedDataParallel(
            probe.probe, device_ids=[device.index] if device.type == "cuda" else None
        )
    loaders = _ImageLoaders(cfg, train_images, val_images, emb.transform, device, emb.normalization)
    run_model, run_dtype = inference_model(model, backbone.dtype)  # the frozen backbone: bf16 is cast once
    _train_image_epochs(probe, loaders, run_model, run_dtype, feature_fn, device, progress)
    return probe.result(
        "images",
        num_classes=C,
        feature_dim=dim,
        n_train=len(loaders.train_set),
        n_val=len(loaders.val_set),
        n_last_blocks=n,
        avgpool_patch_tokens=avg,
        fingerprint=dict(emb.fingerprint),
    )


class _ImageLoaders:
    """The probe's training loader (augmented, sharded and reshuffled per epoch under torchrun) and
    its validation loader (this rank's share of the val images, centre crops)."""

    def __init__(
        self,
        cfg: LinearConfig,
        train_images,
        val_images,
        val_transform,
        device: torch.device,
        normalization: Normalization = IMAGENET,
        bicubic: bool = False,
    ):
        self.train_set = ImageDataset(
            train_images.paths, train_images.labels,
            probe_train_transform(cfg.crop, cfg.min_scale, normalization, bicubic=bicubic),
            strict=cfg.strict, exact_decode=cfg.exact_decode,
        )  # fmt: skip
        self.val_set = ImageDataset(
            val_images.paths,
            val_images.labels,
            val_transform,
            strict=cfg.strict,
            exact_decode=cfg.exact_decode,
        )
        self.sampler: torch.utils.data.DistributedSampler[int] | None = (
            torch.utils.data.DistributedSampler(self.train_set, seed=cfg.seed) if is_dist() else None
        )
        loader_kw: dict[str, Any] = dict(num_workers=cfg.num_workers, collate_fn=collate_skip_none, pin_memory=device.type == "cuda",
                         persistent_workers=cfg.num_workers > 0)  # fmt: skip
        self.generator = torch.Generator()
        self.train = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            drop_last=False, generator=self.generator, **loader_kw,
        )  # fmt: skip
        self.val, _ = rank_shard_loader(
            self.val_set, cfg.batch_size, cfg.num_workers, device, persistent_workers=cfg.num_workers > 0
        )

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.generator.manual_seed(seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)


def _train_image_epochs(
    run: _ProbeRun, loaders: _ImageLoaders, model, dtype, feature_fn, device, progress: Progress
) -> None:
    """The epochs of the probe on images: train on augmented crops, validate every ``val_every``."""
    cfg = run.cfg
    steps = len(loaders.train)
    task = progress.task("linear probe (images)", total=len(run.epochs()) * steps)
    for epoch in run.epochs():
        loaders.set_epoch(cfg.seed, epoch)
        run.probe.train()
        total = torch.zeros(2, dtype=torch.float64)
        for x, y, _ in readable_batches(loaders.train):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), autocast(device, dtype):
                feats = feature_fn(model, x)
            loss = F.cross_entropy(run.probe(feats.float()), y)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            total += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64)
            task.advance(1, epoch=epoch + 1, loss=loss.item())
            if run.stopping():
                break
        if run.signum:
            break
        if is_dist():
            torch.distributed.all_reduce(total)
        mean_loss = float(total[0]) / max(float(total[1]), 1.0)
        _check_finite(mean_loss, epoch)
        scores = None
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            scores = _validate_images(model, run.probe, feature_fn, loaders.val, device, dtype)
        run.end_epoch(epoch, mean_loss, scores, dist_env().is_main)
        if run.signum:
            break
    task.close()


@torch.no_grad()
def _validate_images(model, probe, feature_fn, loader, device, dtype) -> dict[str, float]:
    probe.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for x, y, _ in readable_batches(loader):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            feats = feature_fn(model, x)
        a, b = topk_correct(probe(feats.float()), y)
        counts += torch.tensor([a, b, len(y)], dtype=torch.float64)
    if is_dist():
        c = counts.to(device) if torch.distributed.get_backend() == "nccl" else counts
        torch.distributed.all_reduce(c)
        counts = c.cpu()
    n = max(float(counts[2]), 1.0)
    return {"top1": percent(float(counts[0]), n), "top5": percent(float(counts[1]), n)}


# ---------------------------------------------------------------------------------------------
# Released heads and the logistic-regression probe
# ---------------------------------------------------------------------------------------------
def evaluate_head(cfg: LinearConfig, progress: Progress = NULL_PROGRESS) -> LinearResult:
    """Validate a trained linear head (a released ``*_linearweights.pth``, a preset name, or a dinokit
    probe checkpoint) on the val images, without training."""
    if not cfg.linear_weights:
        raise DataError("--evaluate needs --linear-weights (a *_linearweights.pth file or a preset name).")
    if cfg.val is None:
        raise DataError("--evaluate needs --val, the labelled validation images.")
    if cfg.weights is None and cfg.linear_weights in LINEAR_PRESETS:
        cfg = replace(cfg, weights=cfg.linear_weights)  # a released head goes with its own backbone
    if cfg.weights is None:
        raise DataError("--evaluate needs --weights, the backbone the linear head was trained on.")
    assert cfg.linear_weights and cfg.val is not None  # checked above; replace() keeps them
    head = load_linear_head(cfg.linear_weights)
    w, b = head["linear.weight"].float(), head["linear.bias"].float()
    classes = scan_images(cfg.train, labelled=True).classes if cfg.train is not None else None
    val_images = scan_images(cfg.val, classes=classes, labelled=True)
    if w.shape[0] != len(val_images.classes):
        raise DataError(
            f"The linear head has {w.shape[0]} classes but {cfg.train or cfg.val} has {len(val_images.classes)} "
            "class folders; pass the training folder with --train so the class order matches."
        )
    model = prepare_backbone(cfg, missing=MISSING_WEIGHTS).model
    n, avg = _resolve_options(cfg, model)
    emb = Embedder(_feature_spec(cfg, n, avg), model=model)
    val = emb.embed(
        val_images, cache=Path(cfg.output) / "val_features.pt", progress=progress, description="val features"
    )
    if val.dim != w.shape[1]:
        raise DataError(
            f"The linear head takes {w.shape[1]}-d features but these weights with n_last_blocks={n} and "
            f"avgpool_patch_tokens={avg} give {val.dim}-d; set --n-last-blocks / --avgpool-patch-tokens to match."
        )
    logits = val.features @ w.T + b
    assert val.labels is not None  # embedded from labelled folders
    c1, c5 = topk_correct(logits, val.labels)
    final = {"top1": percent(c1, len(val)), "top5": percent(c5, len(val))}
    return LinearResult(
        "evaluate",
        final=final,
        best=dict(final),
        num_classes=w.shape[0],
        feature_dim=val.dim,
        n_val=len(val),
        n_last_blocks=n,
        avgpool_patch_tokens=avg,
        fingerprint=dict(val.fingerprint),
    )


def logistic_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """The appendix's logistic regression on frozen (L2-normalised) features: top-1/top-5 in percent."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    xtr = F.normalize(train_features.float(), dim=1).numpy()
    xte = F.normalize(test_features.float(), dim=1).numpy()
    ytr = train_labels.numpy()
    if len(np.unique(ytr)) < 2:
        raise DataError("Logistic regression needs training images of at least two classes.")
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(xtr, ytr)
    proba = clf.predict_proba(xte)
    ranked = clf.classes_[np.argsort(-proba, axis=1, kind="stable")[:, :5]]
    y = test_labels.numpy()
    top1 = float((ranked[:, 0] == y).mean() * 100.0)
    top5 = float((ranked == y[:, None]).any(axis=1).mean() * 100.0)
    return {"top1": top1, "top5": top5}


def logistic_eval(cfg: LinearConfig, progress: Progress = NULL_PROGRESS) -> LinearResult:
    train, val, n, avg = _feature_sets(cfg, progress)
    require_finite(train.features, "The training features")
    require_finite(val.features, "The validation features")
    val_labels = align_labels(train, val, "training", "validation")
    task = progress.task("logistic regression", total=None)
    final = logistic_probe(
        train.features, train.labels, val.features, val_labels, cfg.logistic_c, cfg.logistic_max_iter
    )
    task.close()
    return LinearResult(
        "logistic",
        final=final,
        best=dict(final),
        num_classes=len(train.classes),
        feature_dim=train.dim,
        n_train=len(train),
        n_val=len(val),
        n_last_blocks=n,
        avgpool_patch_tokens=avg,
        fingerprint=dict(train.fingerprint),
    )


def linear_eval(
    cfg: LinearConfig, progress: Progress = NULL_PROGRESS, explicit: set[str] | None = None
) -> LinearResult:
    """``dinokit linear``: the probe of the weights' generation (``cfg.protocol`` overrides): DINO's
    single head, or DINOv2's / DINOv3's grid of heads; on images (default) or on features computed
    once (``augment="none"``), a released head, or logistic regression; writes the run folder,
    ``metrics.json`` included. The probe runs inside the run skeleton (:mod:`dinokit.run`):
    ``explicit`` names the options typed, as for the other training commands."""
    if cfg.epochs is not None and cfg.epochs < 1:
        raise DinokitError("--epochs must be at least 1.")
    if cfg.epoch_length is not None and cfg.epoch_length < 1:
        raise DinokitError("--epoch-length must be at least 1.")
    if cfg.protocol is not None and cfg.protocol not in PROTOCOLS:
        raise DinokitError(f"--protocol takes {', '.join(PROTOCOLS)}, not {cfg.protocol!r}.")
    if cfg.augment not in ("official", "none"):
        raise DinokitError(f"--augment takes official or none, not {cfg.augment!r}.")
    check_numbers(
        cfg,
        positive=("lr", *(("logistic_c",) if cfg.logistic else ())),
        non_negative=("weight_decay",),
        fractions=("momentum",),
    )
    if sum([cfg.evaluate, cfg.logistic]) > 1:
        raise DinokitError("Choose one of --evaluate and --logistic.")
    if (cfg.evaluate or cfg.logistic) and (cfg.resume or cfg.stop_after):
        raise DinokitError(f"--{'evaluate' if cfg.evaluate else 'logistic'} trains no probe to resume or stop; leave "
                           "out --resume and --stop-after.")  # fmt: skip
    if cfg.evaluate or cfg.logistic:
        prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
        result = evaluate_head(cfg, progress) if cfg.evaluate else logistic_eval(cfg, progress)
        if dist_env().is_main:
            result.metrics_path = write_metrics(
                cfg.output, result.metrics(), _record(cfg, result), units=UNITS
            )
        return result
    device = resolve_device(cfg.device)
    with TrainingRun(LINEAR_RUN, cfg.output, cfg, device) as run:
        cfg = _resumed(cfg, run, explicit)
        run.plan_threads(cfg.threads, cfg.num_workers)
        arch = weights_arch(cfg)
        # --lr or --epochs without --protocol pin one head, trained as before (DINO's recipe, the tokens
        # of the weights' generation); else the generation's protocol, or the one asked for
        pinned = cfg.lr is not None or cfg.epochs is not None
        protocol = cfg.protocol or ("dino" if pinned else protocol_of(variant_generation(arch)))
        cached = cfg.features_only or cfg.augment == "none" or cfg.train_features is not None
        if protocol == "dino":
            cfg = dino_recipe(cfg)
            result = train_on_features(cfg, run, progress) if cached else train_on_images(cfg, run, progress)
        else:
            result = _train_grid(cfg, run, protocol, arch, cached, progress)
        result.metrics_path = run.write_metrics(run.outcome(result.epochs_done, result.epochs, result.signal),
                                                result.metrics(), _record(cfg, result), units=UNITS)  # fmt: skip
        return result


def weights_arch(cfg: LinearConfig) -> str:
    """The architecture the probe's backbone is (its generation picks the protocol): from the
    features file, ``--arch``, the preset table, or the weights file's tensors."""
    if cfg.train_features is not None:
        return str(load_features(cfg.train_features).fingerprint.get("arch") or "")
    if cfg.arch:
        return canonical_arch(cfg.arch)
    if cfg.weights is None:
        raise CheckpointError(MISSING_WEIGHTS)
    preset = resolve_preset(cfg.weights)
    if cfg.weights == "random" or (preset is not None and not Path(cfg.weights).exists()):
        return preset[1] if preset is not None else "vit_small"
    path = Path(cfg.weights).expanduser()
    if not path.exists() and is_hf_repo_id(cfg.weights):
        path = fetch_hf_weights(cfg.weights)
    if not path.exists():
        raise CheckpointError(f"The weights file {path} does not exist.")
    sd = extract_backbone_state_dict(read_checkpoint(path), cfg.checkpoint_key, source=str(path))
    return infer_arch(map_weight_norm_keys(sd))[0]


def _train_grid(
    cfg: LinearConfig, run: TrainingRun, protocol: str, arch: str, cached: bool, progress: Progress
) -> LinearResult:
    """DINOv2's or DINOv3's grid (:mod:`dinokit.eval.linear_grid_run`); ``--lr`` pins one head (with
    the generation's blocks and mean unless they are given too)."""
    if variant_generation(arch) == 1:
        log.warning(
            "--protocol %s with DINO (v1) weights: %s's grid of heads is trained on a DINO backbone, "
            "as asked.",
            protocol,
            "DINOv2" if protocol == "dinov2" else "DINOv3",
        )
    if cfg.lr is not None:
        n0, avg0 = (
            default_feature_options(arch)
            if variant_generation(arch) > 1
            else ((1, True) if protocol == "dinov3" else (4, True))
        )
        cfg = replace(
            cfg,
            n_last_blocks=cfg.n_last_blocks if cfg.n_last_blocks is not None else n0,
            avgpool_patch_tokens=cfg.avgpool_patch_tokens if cfg.avgpool_patch_tokens is not None else avg0,
        )
    epochs = cfg.epochs if cfg.epochs is not None else GRID_EPOCHS
    cfg = replace(cfg, epochs=epochs)
    out = train_grid(
        cfg,
        run,
        protocol,
        _feature_spec,
        _official_train_transform(cfg),
        progress,
        cached,
        missing=MISSING_WEIGHTS,
    )
    data, chosen = out["data"], out["chosen"]
    outcome = run.outcome(out["epochs_done"], epochs, out["signal"])
    return LinearResult(
        f"grid-{'features' if cached else 'images'}", final={k: chosen[k] for k in ("top1", "top5")} if chosen else {},
        best={}, epochs_run=out["epochs_run"], num_classes=len(data.classes),
        feature_dim=(data.k + 1) * data.dim, n_train=data.n_train, n_val=data.n_val,
        n_last_blocks=chosen["n_last_blocks"] if chosen else data.k,
        avgpool_patch_tokens=chosen["avgpool_patch_tokens"] if chosen else True, fingerprint=data.fingerprint,
        epochs=epochs, epochs_done=out["epochs_done"], signal=out["signal"], stopped_by=outcome.stopped_by,
        exit_code=outcome.exit_code, protocol=protocol, heads=out["heads"], chosen=chosen,
        epoch_length=out["epoch_length"],
    )  # fmt: skip


def _official_train_transform(cfg: LinearConfig):
    """DINOv2's and DINOv3's training transform (RandomResizedCrop bicubic, flip, the weights'
    normalisation), for the normalisation the backbone turns out to have."""
    return lambda norm: probe_train_transform(cfg.crop, cfg.min_scale, norm, bicubic=True)


def _resumed(cfg: LinearConfig, run: TrainingRun, explicit: set[str] | None) -> LinearConfig:
    """The probe's settings: ``cfg`` for a fresh run; for a resumed one the saved recipe with this
    command line's run control on top (a checkpoint of an older dinokit, without its config, is
    compared through its identity only)."""
    if run.checkpoint is None:
        return cfg
    saved = run.checkpoint.get("config")
    if not isinstance(saved, dict):
        return cfg
    run.saved_config = saved  # the probe keeps no config.json: its checkpoint is the record
    merged = run.resumed_config(cfg.to_dict(), explicit, [f.name for f in dataclasses.fields(LinearConfig)])
    for k in ("output", "train", "val", "train_features", "val_features"):
        if merged.get(k) is not None:
            merged[k] = Path(merged[k])
    return LinearConfig(**merged)


def _record(cfg: LinearConfig, result: LinearResult) -> dict[str, Any]:
    """The config as metrics.json records it: the options and what they resolved to."""
    return {
        **cfg.to_dict(),
        "n_last_blocks": result.n_last_blocks,
        "avgpool_patch_tokens": result.avgpool_patch_tokens,
        "mode": result.mode,
        "num_classes": result.num_classes,
        "feature_dim": result.feature_dim,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "epochs_run": result.epochs_run,
        "protocol": result.protocol,
        **({"epochs": result.epochs} if result.epochs else {}),
        **({"epoch_length": result.epoch_length} if result.epoch_length else {}),
        "tokens": _tokens_used(result),
        "fingerprint": result.fingerprint,
    }


def _tokens_used(result: LinearResult) -> str:
    """Which tokens the (chosen) head reads, in words."""
    if result.chosen is None and not result.mode.startswith("grid"):
        return str(result.fingerprint.get("tokens", ""))
    n, avg = result.n_last_blocks, result.avgpool_patch_tokens
    cls = "the CLS token of the last block" if n == 1 else f"the CLS tokens of the last {n} blocks"
    return (
        cls
        + (" followed by the mean of the last block's patch tokens" if avg else "")
        + " (after the final norm)"
    )


__all__: Sequence[str] = [
    "LinearConfig",
    "LinearResult",
    "default_feature_options",
    "evaluate_head",
    "linear_eval",
    "logistic_probe",
    "probe_train_transform",
    "train_on_features",
    "train_on_images",
]

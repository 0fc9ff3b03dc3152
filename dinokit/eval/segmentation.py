"""``dinokit segment``: linear semantic segmentation on frozen patch features, the DINOv2/DINOv3
protocol (DINOv3 ``eval/segmentation``; the head, its inputs, schedule and sliding window are in
:mod:`dinokit.eval.seg_head`, the transforms in :mod:`dinokit.data.seg_transforms`, the scores in
:mod:`dinokit.eval.seg_metrics`).

A run trains the head for ``iterations`` steps inside the run skeleton (:class:`dinokit.run.
TrainingRun`, counted in iterations: ``--resume``, ``--stop-after``, ``--overwrite``, the folder's lock),
then evaluates it on the val split with the sliding window and writes ``metrics.json``,
``per_class.csv``, ``head.pth``, ``predictions/STEM.png`` and ``pictures/``. Each training sample
(which image, its rescale, crop, flip, colour distortion and dropout mask) is a function of the seed
and of its place in the stream of samples alone, so a stopped and resumed run is bitwise the
uninterrupted one and N torchrun processes train on exactly the batch one process would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints import BackboneOptions, prepare_backbone, state_dict_fingerprint, weights_needed
from ..data.images import DecodeNeed, read_image_or_skip
from ..data.normalization import IMAGENET, Normalization
from ..data.palette import VOID_LABEL
from ..data.seg_transforms import eval_input, train_sample
from ..data.segmentation import SegSplit, load_splits
from ..errors import DinokitError
from ..io import append_jsonl
from ..models.registry import backbone_arch
from ..models.vit import VisionTransformer
from ..progress import NULL_PROGRESS, Progress
from ..run import RunKind, RunOptions, TrainingRun
from ..runtime import (
    RuntimeOptions,
    autocast,
    check_numbers,
    derive_seed,
    dist_env,
    ensure_finite_loss,
    is_dist,
    resolve_device,
    resolve_precision,
)
from .seg_head import (
    SegmentationHead,
    check_backbone,
    dropout_keep,
    patch_features,
    predict_labels,
    warmup_cosine_lr,
)
from .seg_metrics import SEG_UNITS, SegScores
from .seg_outputs import comparison_picture, save_label_png, write_per_class

log = logging.getLogger("dinokit")

CHECKPOINT_FORMAT = "dinokit-segment-1"
HEAD_FORMAT = "dinokit-segment-head-1"
RUN_FILES = ("checkpoint.pth", "config.json", "log.jsonl", "metrics.json", "per_class.csv", "head.pth",
             "predictions/*.png", "pictures/*.png")  # fmt: skip
SEGMENT_RUN = RunKind(
    command="segment", noun="segmentation probe run", files=RUN_FILES, formats=(CHECKPOINT_FORMAT,), unit="iteration",
    may_change=frozenset({"data", "num_workers", "device", "precision", "strict", "exact_decode", "pictures"}),
)  # fmt: skip
#: the official linear config (DINOv3 config-ade20k-linear-training.yaml) and what dinokit's CPU defaults scale
OFFICIAL = {"iterations": 40000, "warmup": 1500, "global_batch": 16, "image_size": 512, "stride": 341, "lr": 1e-3,
            "weight_decay": 1e-3}  # fmt: skip


@dataclass
class SegmentConfig(BackboneOptions, RuntimeOptions, RunOptions):
    """What ``dinokit segment`` needs. The defaults are scaled for a CPU (fewer iterations, a smaller
    crop and batch); :data:`OFFICIAL` holds the paper's, docs/segmentation.md the command."""

    output: Path
    data: Path | None = None
    dataset: str = "folder"
    iterations: int = 1000
    warmup: int | None = None  #: None: 1500/40000 of the iterations, the official proportion
    batch_size: int = field(default=4, kw_only=True)
    lr: float = 1e-3
    weight_decay: float = 1e-3
    image_size: int = 224  #: the training crop, the shorter side at evaluation and the sliding window
    blocks: int = 1  #: patch tokens of the last block, or of the last 4 concatenated
    ignore_index: int = VOID_LABEL  #: the void value of a folder set's masks
    photometric: bool = True
    pictures: int = 4

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @property
    def warmup_iterations(self) -> int:
        if self.warmup is not None:
            return int(self.warmup)
        return int(round(self.iterations * OFFICIAL["warmup"] / OFFICIAL["iterations"]))

    @property
    def stride(self) -> int:
        return max(1, self.image_size * 2 // 3)


@dataclass
class SegmentResult:
    scores: dict[str, float] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, list] = field(default_factory=dict)
    iterations: int = 0
    iterations_done: int = 0
    last_loss: float = math.nan
    n_train: int = 0
    n_val: int = 0
    skipped: int = 0
    feature_dim: int = 0
    stopped_by: str | None = None
    exit_code: int = 0
    signal: int = 0
    train_seconds: float = 0.0  #: this invocation's training iterations
    eval_seconds: float = 0.0  #: the sliding-window evaluation of the val split
    metrics_path: Path | None = None


def normalization_of(model: torch.nn.Module) -> Normalization:
    """The mean and std that belong to the backbone's weights (ImageNet's where it says none)."""
    norm = getattr(model, "normalization", None)
    return norm if isinstance(norm, Normalization) else IMAGENET


def backbone_fingerprint(model: VisionTransformer, weights: str | None) -> dict[str, Any]:
    """What a head.pth says of the backbone it was trained on (the state's hash decides)."""
    return {"state": state_dict_fingerprint(model.state_dict()), "arch": backbone_arch(model),
            "patch_size": int(model.patch_size), "embed_dim": int(model.embed_dim), "weights": str(weights)}  # fmt: skip


# -- the training stream ------------------------------------------------------------------------------
class TrainBatches(torch.utils.data.Dataset):
    """Item ``it``: this rank's share of iteration ``it``'s global batch (images, labels, dropout keep
    factors, unreadable images skipped). Global sample ``p`` of the stream is image
    ``perm(epoch)[p mod n]`` with ``epoch = p // n``, augmented from the seed ``(seed, p)``."""

    def __init__(
        self,
        split: SegSplit,
        cfg: SegmentConfig,
        channels: int,
        rank: int,
        world: int,
        norm: Normalization = IMAGENET,
    ):
        self.split, self.cfg, self.channels, self.rank, self.world = split, cfg, channels, rank, world
        self.norm = norm
        self.need = None if cfg.exact_decode else DecodeNeed(short_side=2 * cfg.image_size)

    def __len__(self) -> int:
        return self.cfg.iterations

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations, per worker
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed & 0xFFFFFFFF, 17, epoch]).permutation(
            len(self.split.samples)
        )

    def __getitem__(self, it: int):
        cfg, n = self.cfg, len(self.split.samples)
        xs, ys, keeps, skipped = [], [], [], 0
        for j in range(cfg.batch_size):
            p = (it * self.world + self.rank) * cfg.batch_size + j
            sample = self.split.samples[int(self._perm(p // n)[p % n])]
            decoded = read_image_or_skip(sample.image, self.need, cfg.strict)
            if decoded is None:
                skipped += 1
                continue
            labels = self.split.read_labels(sample)
            image = decoded.image
            if image.size != (labels.shape[1], labels.shape[0]):  # a reduced decode: back to the mask's size
                image = image.resize((labels.shape[1], labels.shape[0]))
            rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 19, p])
            x, y = train_sample(rng, image, labels, cfg.image_size, cfg.photometric, self.norm)
            xs.append(x)
            ys.append(y)
            keeps.append(
                dropout_keep(torch.Generator().manual_seed(derive_seed(cfg.seed, 23, p)), self.channels)
            )
        if not xs:
            return None, None, None, skipped
        return torch.stack(xs), torch.stack(ys), torch.stack(keeps), skipped


class _Trainer:
    """The head, its optimiser and the loop of iterations inside the run skeleton."""

    def __init__(self, cfg: SegmentConfig, run: TrainingRun, channels: int, num_classes: int, device):
        self.cfg, self.run, self.device = cfg, run, device
        torch.manual_seed(cfg.seed)
        self.head = SegmentationHead(channels, num_classes).to(device)
        self.opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.weight_decay)  # fmt: skip
        self.start, self.signum, self.last_loss = 0, 0, math.nan
        ck = run.checkpoint
        if ck is not None:
            if int(ck["iterations"]) != cfg.iterations:
                raise DinokitError(f"The run in {cfg.output} was made for {ck['iterations']} iterations, not "
                                   f"{cfg.iterations}; the schedule depends on it, so pass the same --iterations.")  # fmt: skip
            self.head.load_state_dict(ck["head"])
            self.opt.load_state_dict(ck["optimizer"])
            self.start, self.last_loss = int(ck["iteration"]), float(ck.get("loss", math.nan))

    def save(self, iteration: int) -> None:
        with self.run.saving():
            self.run.write_checkpoint({
                "format": CHECKPOINT_FORMAT, "iteration": int(iteration), "iterations": self.cfg.iterations,
                "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.opt.state_dict(), "loss": float(self.last_loss), "config": self.cfg.to_dict(),
            })  # fmt: skip

    def step(self, it: int, model, dtype, x, y, keep) -> float:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = warmup_cosine_lr(it, cfg.iterations, cfg.warmup_iterations, cfg.lr)
        x, y, keep = x.to(self.device), y.to(self.device), keep.to(self.device)
        with torch.no_grad(), autocast(self.device, dtype):
            feats = patch_features(model, x, cfg.blocks)  # the one backbone pass of these images
        logits = F.interpolate(
            self.head(feats.float(), keep), size=y.shape[-2:], mode="bilinear", align_corners=False
        )
        loss_sum = F.cross_entropy(logits, y, ignore_index=VOID_LABEL, reduction="sum")
        tally = torch.stack([loss_sum.detach(), (y != VOID_LABEL).sum().to(loss_sum.dtype)]).double()
        if is_dist():
            tally = _all_reduce(tally, self.device)
        self.opt.zero_grad(set_to_none=True)
        (
            loss_sum / tally[1].clamp(min=1).float()
        ).backward()  # the mean over the whole batch's labelled pixels
        if is_dist():
            for p in self.head.parameters():
                assert p.grad is not None  # every parameter of the head takes part in the loss
                p.grad = _all_reduce(p.grad, self.device)
        self.opt.step()
        return float(tally[0] / tally[1].clamp(min=1))

    def train(self, split: SegSplit, model, dtype, progress: Progress) -> int:
        cfg, run, env = self.cfg, self.run, dist_env()
        end = run.end(cfg.iterations)
        if self.start >= end:
            return self.start
        data = TrainBatches(
            split, cfg, self.head.in_channels, env.rank, env.world_size, normalization_of(model)
        )
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(self.start, end),
                                             num_workers=cfg.num_workers)  # fmt: skip
        task = progress.task("segmentation head", total=end - self.start)
        done = self.start
        self.head.train()
        for it, (x, y, keep, _) in zip(range(self.start, end), loader):
            if x is not None:
                self.last_loss = self.step(it, model, dtype, x, y, keep)
            done = it + 1
            signum, due, (bad,) = run.poll(0.0 if math.isfinite(self.last_loss) else 1.0)
            ensure_finite_loss(self.last_loss, "The segmentation loss became {loss} at iteration " f"{done}; lower "
                               "--lr or use --precision fp32.", elsewhere=bool(bad))  # fmt: skip
            task.advance(1, loss=self.last_loss)
            if env.is_main and (done % 20 == 0 or done == end):
                append_jsonl(cfg.output / "log.jsonl", {"iteration": done, "loss": self.last_loss,
                                                         "lr": self.opt.param_groups[0]["lr"]})  # fmt: skip
            if signum:
                self.signum = signum
                break
            if due:
                self.save(done)
        task.close()
        self.save(done)
        return done


def _all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    dev = t.device
    t = t.to(device) if torch.distributed.get_backend() == "nccl" else t.cpu()
    torch.distributed.all_reduce(t)
    return t.to(dev)


# -- evaluation -----------------------------------------------------------------------------------------
def evaluate(
    cfg: SegmentConfig,
    split: SegSplit,
    model,
    head: SegmentationHead,
    dtype,
    device,
    progress: Progress = NULL_PROGRESS,
    write: bool = True,
) -> SegScores:
    """Sliding-window evaluation of this rank's share of ``split``: the areas summed over every rank;
    with ``write`` the label PNG of each image in predictions/ and the first pictures in pictures/."""
    env = dist_env()
    head.eval()
    scores = SegScores(len(split.classes))
    mine = split.samples[env.rank :: env.world_size]
    need = None if cfg.exact_decode else DecodeNeed(short_side=cfg.image_size)
    task = progress.task("evaluating (sliding window)", total=len(mine))
    for i, sample in enumerate(mine):
        decoded = read_image_or_skip(sample.image, need, cfg.strict)
        task.advance(1)
        if decoded is None:
            split.skipped += 1
            continue
        labels = torch.from_numpy(split.read_labels(sample))
        x = eval_input(decoded.image, cfg.image_size, normalization_of(model))[None].to(device)
        pred = predict_labels(
            model, head, x, (labels.shape[0], labels.shape[1]), cfg.image_size, cfg.stride, cfg.blocks, dtype
        )
        scores.add(pred, labels)
        if write:
            save_label_png(pred.numpy(), cfg.output / "predictions" / f"{sample.stem}.png")
            if env.is_main and i < cfg.pictures:
                photo = np.asarray(decoded.image.resize((labels.shape[1], labels.shape[0])))
                comparison_picture(photo, labels.numpy(), pred.numpy(), split.classes,
                                   cfg.output / "pictures" / f"{sample.stem}.png")  # fmt: skip
    task.close()
    if is_dist():
        scores.areas = _all_reduce(scores.areas, device).cpu()
    return scores


# -- the run ------------------------------------------------------------------------------------------------
def _check(cfg: SegmentConfig) -> None:
    if cfg.data is None and not cfg.resume:
        raise DinokitError("Give --data, the folder of the data set (see --dataset for the layouts).")
    if cfg.iterations < 1:
        raise DinokitError("--iterations must be at least 1.")
    if cfg.blocks not in (1, 4):
        raise DinokitError(
            f"--blocks takes 1 (the last block's patch tokens) or 4 (the last four), not {cfg.blocks}."
        )
    if cfg.image_size < 16:
        raise DinokitError(f"--image-size must be at least 16 pixels, not {cfg.image_size}.")
    if cfg.warmup is not None and not 0 <= cfg.warmup < cfg.iterations:
        raise DinokitError(f"--warmup must lie in 0..{cfg.iterations - 1} (fewer than --iterations).")
    if not 0 <= cfg.ignore_index <= 255:
        raise DinokitError(f"--ignore-index must lie in 0..255, not {cfg.ignore_index}.")
    check_numbers(cfg, positive=("lr",), non_negative=("weight_decay",))


def _resumed(cfg: SegmentConfig, run: TrainingRun, explicit: set[str] | None) -> SegmentConfig:
    if run.checkpoint is None:
        return cfg
    if run.saved_config is None and isinstance(run.checkpoint.get("config"), dict):
        run.saved_config = run.checkpoint["config"]
    merged = run.resumed_config(cfg.to_dict(), explicit, [f.name for f in dataclasses.fields(SegmentConfig)])
    for k in ("output", "data"):
        if merged.get(k) is not None:
            merged[k] = Path(merged[k])
    return SegmentConfig(**merged)


def run_segmentation(
    cfg: SegmentConfig, progress: Progress = NULL_PROGRESS, explicit: set[str] | None = None
) -> SegmentResult:
    """Train the linear head on ``cfg.data``'s train split and evaluate it on its val split (the
    library's entry point of ``dinokit segment``; ``explicit`` names the options typed, for --resume).
    Every input is checked before the run folder is touched."""
    _check(cfg)
    if not cfg.resume:  # a fresh run: every input checked before the folder is made
        train_split, val_split, backbone = _inputs(cfg, progress)
    with TrainingRun(SEGMENT_RUN, cfg.output, cfg, resolve_device(cfg.device)) as run:
        cfg = _resumed(cfg, run, explicit)
        if cfg.resume:  # the run's own data and backbone, from its config
            _check(cfg)
            train_split, val_split, backbone = _inputs(cfg, progress)
        device = backbone.device
        run.plan_threads(cfg.threads, cfg.num_workers)
        vit = check_backbone(backbone.model)  # checked by _inputs
        fingerprint = backbone_fingerprint(vit, cfg.weights)
        channels = cfg.blocks * vit.embed_dim
        run.check_identity(_identity(cfg, fingerprint, train_split, run.env.world_size))
        run.write_config(cfg.to_dict())
        model, dtype = backbone.for_inference()
        trainer = _Trainer(cfg, run, channels, len(train_split.classes), device)
        start = time.perf_counter()
        done = trainer.train(train_split, model, dtype, progress)
        train_seconds = time.perf_counter() - start
        outcome = run.outcome(done, cfg.iterations, trainer.signum)
        result = SegmentResult(classes=list(train_split.classes), iterations=cfg.iterations, iterations_done=done,
                               last_loss=trainer.last_loss, n_train=len(train_split.samples),
                               n_val=len(val_split.samples), feature_dim=channels, stopped_by=outcome.stopped_by,
                               exit_code=outcome.exit_code, signal=trainer.signum,
                               train_seconds=train_seconds)  # fmt: skip
        if outcome.finished:
            eval_dtype = resolve_precision(cfg.precision, device, training=False)
            eval_model = model if eval_dtype == dtype else backbone.model
            start = time.perf_counter()
            scores = evaluate(cfg, val_split, eval_model, trainer.head, eval_dtype, device, progress)
            result.eval_seconds = time.perf_counter() - start
            result.scores = scores.summary()
            iou, acc, pixels = scores.per_class()
            result.per_class = {"iou": iou, "accuracy": acc, "pixels": pixels}
            if run.env.is_main:
                write_per_class(cfg.output / "per_class.csv", train_split.classes, iou, acc, pixels)
                _save_head(cfg, trainer.head, fingerprint, train_split, normalization_of(backbone.model))
        result.skipped = train_split.skipped + val_split.skipped
        config = {**cfg.to_dict(), "normalization": normalization_of(backbone.model).record()}
        result.metrics_path = run.write_metrics(outcome, _metrics(cfg, result), config, units=SEG_UNITS)
        return result


def _inputs(cfg: SegmentConfig, progress: Progress):
    """The checked train and val splits and the frozen backbone."""
    if cfg.data is None:
        raise DinokitError("Give --data, the folder of the data set (see --dataset for the layouts).")
    train_split, val_split = load_splits(cfg.data, cfg.dataset, cfg.ignore_index, cfg.strict, progress)
    backbone = prepare_backbone(cfg, training=True, missing=weights_needed("for the backbone to probe"))
    vit = check_backbone(backbone.model)
    if cfg.blocks > len(vit.blocks):
        raise DinokitError(
            f"--blocks {cfg.blocks} asks for more blocks than the backbone's {len(vit.blocks)}."
        )
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return train_split, val_split, backbone


def _identity(cfg: SegmentConfig, fingerprint: dict, split: SegSplit, world: int) -> dict[str, Any]:
    return {"dataset": cfg.dataset, "classes": list(split.classes), "n_train": len(split.samples),
            "backbone": fingerprint["state"], "global_batch": cfg.batch_size * world, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "iterations": cfg.iterations, "warmup": cfg.warmup_iterations,
            "image_size": cfg.image_size, "blocks": cfg.blocks, "photometric": cfg.photometric, "seed": cfg.seed}  # fmt: skip


def _metrics(cfg: SegmentConfig, r: SegmentResult) -> dict[str, Any]:
    world = dist_env().world_size
    protocol = {
        "head": "linear (Dropout2d 0.1, BatchNorm, 1x1 conv) on frozen patch tokens after the final norm",
        "blocks": cfg.blocks, "feature_dim": r.feature_dim, "iterations": cfg.iterations,
        "warmup": cfg.warmup_iterations, "global_batch": cfg.batch_size * world, "optimizer": "AdamW",
        "lr": cfg.lr, "weight_decay": cfg.weight_decay, "schedule": "warm-up from 1e-6 x lr, cosine to 0",
        "train_transform": f"short side {cfg.image_size} x U(0.5, 2.0), crop {cfg.image_size} (cat_max_ratio 0.75), "
                           f"flip 0.5{', photometric distortion' if cfg.photometric else ''}",
        "evaluation": f"short side {cfg.image_size}, sliding window {cfg.image_size} stride {cfg.stride}, logits "
                      "upsampled to the label size",
        "official": OFFICIAL,
    }  # fmt: skip
    out: dict[str, Any] = {"segmentation": dict(r.scores), "protocol": protocol, "classes": r.classes,
                           "n_train": r.n_train, "n_val": r.n_val, "skipped_images": r.skipped,
                           "last_loss": r.last_loss,
                           "seconds": {"training": r.train_seconds, "evaluation": r.eval_seconds}}  # fmt: skip
    return out


def _save_head(
    cfg: SegmentConfig, head: SegmentationHead, fingerprint: dict, split: SegSplit, norm: Normalization
) -> None:
    from ..checkpoints import save_checkpoint

    save_checkpoint({
        "format": HEAD_FORMAT, "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "in_channels": head.in_channels, "num_classes": head.num_classes, "classes": list(split.classes),
        "dataset": cfg.dataset, "blocks": cfg.blocks, "image_size": cfg.image_size, "stride": cfg.stride,
        "backbone": fingerprint, "normalisation": {"mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std],
                          "source": str(norm.source)},
    }, cfg.output / "head.pth")  # fmt: skip


__all__ = [
    "HEAD_FORMAT",
    "OFFICIAL",
    "SEGMENT_RUN",
    "SegmentConfig",
    "SegmentResult",
    "TrainBatches",
    "backbone_fingerprint",
    "evaluate",
    "run_segmentation",
]

"""Fine-tuning transfer (paper, Sec. 4.2.3 / Table 6): a new linear head on a (DINO-pretrained or
randomly initialised) backbone, the whole network trained with the DeiT recipe.

Recipe: AdamW, linear warm-up then cosine, peak lr = ``lr * global_batch / 1024`` (base 5e-4),
weight decay 0.05 (not on biases, norms, cls_token, pos_embed), label smoothing 0.1, drop path 0.1,
optional layer-wise lr decay, RandAugment, mixup / cutmix, gradient clipping and head-only warm-up
epochs (backbone frozen).

Layer-wise lr decay (``layer_decay`` = d, ViT with L blocks): block i (0-based) is trained at
``lr * d**(L - i)``; the patch embedding, cls_token and pos_embed at ``lr * d**(L + 1)``; the final
norm and the head at ``lr``. ``d = 1`` turns it off (the DeiT recipe the paper uses).

Every random draw is a function of (seed, epoch, image index) for augmentation and of (seed, rank,
global step) for drop path / mixup, so a run stopped at any step and resumed continues bitwise as
the uninterrupted run would (same precision, same device, same number of processes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import (
    backbone_state_dict,
    extract_backbone_state_dict,
    infer_arch,
    load_backbone,
    read_checkpoint,
    save_checkpoint,
)
from ..data.images import ImageDataset, LabelledFolder, collate_skip_none, scan_labelled_folder
from ..errors import CheckpointError, DataError, DinokitError
from ..io import append_jsonl, atomic_write_text, prepare_output_dir, to_json, write_json, write_metrics
from ..models.registry import backbone_arch, build_backbone, is_vit
from ..progress import NULL_PROGRESS, Progress
from ..runtime import (
    GracefulStop,
    all_reduce_mean,
    autocast,
    barrier,
    init_distributed,
    is_dist,
    loader_workers,
    precision_name,
    resolve_device,
    resolve_precision,
)
from .augment import BatchMixer, eval_transform, resize_for, soft_cross_entropy, train_transform
from .schedules import cosine_scheduler

log = logging.getLogger("dinokit")

MODEL_FORMAT = "dinokit-finetuned"
CHECKPOINT_FORMAT = "dinokit-finetune-checkpoint"
#: the files a run writes (an --overwrite run removes an earlier run's first)
RUN_FILES = (
    "log.jsonl", "metrics.json", "confusion.png", "model.pth", "best.pth", "checkpoint.pth", "config.json", "split.json"
)
#: the confusion picture is drawn for at most this many classes
CONFUSION_MAX_CLASSES = 60


# ---------------------------------------------------------------------------------------------
# Configuration and result
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; saved in its checkpoint and ``metrics.json``."""

    train: Path | None
    output: Path
    val: Path | None = None
    val_split: float | None = None  # fraction of train held out when ``val`` is None (0.1 by default)
    weights: str = "random"
    arch: str | None = None
    patch_size: int | None = None
    checkpoint_key: str = "teacher"
    model_kwargs: dict = field(default_factory=dict)  # extra constructor arguments (e.g. depth for tests)
    epochs: int = 100
    batch_size: int = 64  # per process
    lr: float = 5e-4  # at a global batch of 1024; the peak lr is lr * global_batch / 1024
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    randaugment: int = 0  # RandAugment magnitude (2 ops); 0 = off, DeiT uses 9
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off, DeiT uses 0.8
    cutmix: float = 0.0  # 0 = off, DeiT uses 1.0
    clip_grad: float | None = None  # global gradient-norm clip; None = off
    head_warmup_epochs: int = 0  # epochs that train the head alone on the frozen backbone
    warmup_epochs: float = 5.0  # linear lr warm-up of the full fine-tuning phase
    image_size: int = 224
    min_crop_scale: float = 0.08
    num_workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # end cleanly after this many epochs of the schedule
    overwrite: bool = False

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
        return d


#: options a resumed run may change; every other option is the run's recipe and stays as saved
RUN_CONTROL = frozenset(
    {"train", "val", "output", "epochs", "stop_after", "num_workers", "device", "resume", "overwrite"}
)


@dataclass
class FinetuneResult:
    output: Path
    classes: list[str]
    epochs_done: int
    epochs: int
    finished: bool
    signal: int | None = None  # the signal that stopped the run, if any
    stopped_at: tuple[int, int] | None = None  # (epoch, step) of a checkpoint written mid-epoch
    final_top1: float | None = None
    final_top5: float | None = None
    best_top1: float | None = None
    best_top5: float | None = None
    best_epoch: int | None = None
    per_class_top1: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    batch_size: int = 0
    peak_lr: float = 0.0
    num_train: int = 0
    num_val: int = 0


# ---------------------------------------------------------------------------------------------
# The model and its parameter groups
# ---------------------------------------------------------------------------------------------
class FinetuneModel(nn.Module):
    """Backbone -> Linear head (weights trunc-normal, std 2e-5; bias 0: the first logits are ~0)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_init_std: float = 2e-5):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def layer_id(name: str, depth: int) -> int:
    """0 for patch_embed / cls_token / pos_embed, i + 1 for block i, depth + 1 for the rest (norm, head)."""
    name = name.removeprefix("backbone.")
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_lr_scale(layer: int, depth: int, layer_decay: float) -> float:
    """``layer_decay ** (depth + 1 - layer)``: block i gets d^(L - i), the embeddings d^(L + 1), the head 1."""
    return float(layer_decay ** (depth + 1 - layer))


def param_groups(model: FinetuneModel, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: one per (layer, decayed or not), each with its ``lr_scale``.

    No weight decay for biases, 1-d parameters (norms) and the backbone's ``no_weight_decay()``
    names (cls_token, pos_embed), as in DeiT.
    """
    backbone = model.backbone
    vit = is_vit(backbone)
    if not vit and layer_decay != 1.0:
        raise DinokitError("--layer-decay applies to ViT backbones only; leave it at 1 for a ResNet.")
    depth = len(backbone.blocks) if vit else 0
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        bare = name.removeprefix("backbone.")
        no_decay = p.ndim <= 1 or name.endswith(".bias") or bare in skip
        lid = layer_id(name, depth) if vit else (1 if name.startswith("head.") else 0)
        scale = layer_lr_scale(lid, depth, layer_decay) if vit else 1.0
        key = f"layer{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to ``lr * lr_scale`` (the layer-wise decay of :func:`param_groups`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def build_schedule(cfg: FinetuneConfig, niter_per_epoch: int, peak_lr: float) -> np.ndarray:
    """Per-iteration lr: the head-only warm-up epochs at ``peak_lr`` (constant), then the full phase
    with ``warmup_epochs`` of linear warm-up from 0 and a cosine down to ``min_lr``."""
    head = int(cfg.head_warmup_epochs)
    full = cfg.epochs - head
    warm = min(float(cfg.warmup_epochs), float(full))
    parts = [np.full(head * niter_per_epoch, peak_lr, dtype=np.float64)]
    if full > 0:
        parts.append(cosine_scheduler(peak_lr, cfg.min_lr, full, niter_per_epoch, warmup_epochs=warm))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence), for per-epoch / per-image / per-step draws."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class SeededImages(torch.utils.data.Dataset):
    """An :class:`ImageDataset` whose transform draws from a generator seeded by (seed, epoch, index):
    the augmentation of an image does not depend on the order, the worker or what ran before."""

    def __init__(self, base: ImageDataset, seed: int):
        self.base = base
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, 17, self.epoch, i))
            return self.base[i]


def stratified_split(folder: LabelledFolder, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``round(fraction * n_c)`` images of each class (at least one stays in train)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for p, t in folder.samples:
        by_class.setdefault(t, []).append((p, t))
    train, val = [], []
    for t in sorted(by_class):
        items = by_class[t]
        order = rng.permutation(len(items))
        n_val = min(int(round(fraction * len(items))), len(items) - 1)
        val.extend(items[j] for j in sorted(order[:n_val]))
        train.extend(items[j] for j in sorted(order[n_val:]))
    return train, val


@dataclass
class Splits:
    classes: list[str]
    train: list  # (path, label)
    val: list


def load_splits(cfg: FinetuneConfig) -> Splits:
    if cfg.train is None:
        raise DataError("Give the training images with --train.")
    train_folder = scan_labelled_folder(cfg.train)
    classes = train_folder.classes
    if len(classes) < 2:
        raise DataError(
            f"{cfg.train} has a single class ({classes[0]}); fine-tuning a classifier needs at least two "
            "class sub-folders."
        )
    if cfg.val is not None and cfg.val_split is not None:
        raise DinokitError("Give either --val or --val-split, not both.")
    if cfg.val is not None:
        val_folder = scan_labelled_folder(cfg.val, classes=classes)
        return Splits(classes, list(train_folder.samples), list(val_folder.samples))
    fraction = 0.1 if cfg.val_split is None else float(cfg.val_split)
    if not 0.0 < fraction < 1.0:
        raise DinokitError(f"--val-split must be a fraction between 0 and 1, got {fraction}.")
    train, val = stratified_split(train_folder, fraction, cfg.seed)
    if not val:
        raise DataError(
            f"--val-split {fraction} of the {len(train_folder)} images in {cfg.train} leaves no validation "
            "image; give a --val folder or a larger fraction."
        )
    return Splits(classes, train, val)


# ---------------------------------------------------------------------------------------------
# Files: the exported model, the confusion picture
# ---------------------------------------------------------------------------------------------
def backbone_spec(backbone: nn.Module, drop_path: float) -> dict:
    """What rebuilds the backbone's shape: arch, patch size and constructor arguments."""
    if not is_vit(backbone):
        return {"arch": "resnet50", "patch_size": None, "kwargs": {}}
    n = backbone.pos_embed.shape[1] - 1
    side = int(round(math.sqrt(n)))
    return {
        "arch": backbone_arch(backbone),
        "patch_size": int(backbone.patch_size),
        "kwargs": {
            "embed_dim": int(backbone.embed_dim),
            "depth": len(backbone.blocks),
            "num_heads": int(backbone.num_heads),
            "img_size": side * int(backbone.patch_size),
            "drop_path_rate": float(drop_path),
        },
    }


def export_model(model: FinetuneModel, classes: Sequence[str], spec: dict, image_size: int, extra: dict) -> dict:
    """The ``model.pth`` layout (plain tensors, strings and numbers; ``weights_only``-safe):

    ``format`` ("dinokit-finetuned"), ``version`` (1), ``backbone`` (flat backbone state dict, the
    released-weights names), ``head`` (``weight`` (K, D), ``bias`` (K,)), ``classes`` (K names in
    label order), ``arch``, ``patch_size``, ``image_size`` (the crop size), ``resize_size``,
    ``mean``, ``std``, and run facts (``epoch``, ``val_top1``, ...).
    """
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    m = model.module if hasattr(model, "module") else model
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "backbone": backbone_state_dict(m.backbone),
        "head": {k: v.detach().cpu().clone() for k, v in m.head.state_dict().items()},
        "classes": list(classes),
        "arch": spec["arch"],
        "patch_size": spec["patch_size"],
        "image_size": int(image_size),
        "resize_size": resize_for(image_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        **extra,
    }


def load_finetuned(path: str | Path) -> tuple[FinetuneModel, dict]:
    """A fine-tuned model (eval mode, CPU) and its file's metadata, from ``model.pth`` / ``best.pth``
    (or a run folder, meaning its ``model.pth``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pth").is_file():
            raise CheckpointError(f"{path} holds no model.pth; give the model file a fine-tuning run wrote.")
        path = path / "model.pth"
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a fine-tuning checkpoint for resuming; give the run's model.pth or best.pth instead."
        )
    if not (isinstance(ckpt, dict) and ckpt.get("format") == MODEL_FORMAT):
        raise CheckpointError(
            f"{path} is not a dinokit fine-tuned model (it has no classifier head and class names); "
            "make one with dinokit finetune."
        )
    try:
        sd = extract_backbone_state_dict(ckpt, source=str(path))
        arch, patch, extra = infer_arch(sd)
        backbone = build_backbone(arch, patch or 16, **extra)
        backbone.load_state_dict(sd, strict=True)
        head = ckpt["head"]
        classes = list(ckpt["classes"])
        model = FinetuneModel(backbone, len(classes))
        model.head.load_state_dict(head, strict=True)
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path} is a damaged dinokit fine-tuned model ({str(e).splitlines()[0]}).") from e
    meta = {k: v for k, v in ckpt.items() if k not in ("backbone", "head")}
    return model.eval(), meta


def draw_confusion(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> bool:
    """Draw a row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG with PIL.

    Returns False (and draws nothing) above ``CONFUSION_MAX_CLASSES`` classes.
    """
    from PIL import Image, ImageDraw, ImageFont

    k = len(classes)
    if k > CONFUSION_MAX_CLASSES:
        return False
    cell = max(10, min(48, 720 // k))
    font = ImageFont.load_default()
    names = [c if len(c) <= 16 else c[:15] + "~" for c in classes]
    label_w = max(int(font.getlength(n)) for n in names) + 10
    top = 40 + label_w  # column labels are written vertically
    left = label_w + 8
    subtitle = "rows: true class, columns: predicted class (row-normalised)"
    title = title or "Confusion matrix"
    width = max(left + k * cell + 20, int(max(font.getlength(title), font.getlength(subtitle))) + 16)
    height = top + k * cell + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 22), subtitle, fill=(90, 90, 90), font=font)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    for i in range(k):
        for j in range(k):
            v = float(frac[i, j])
            shade = (int(255 - 225 * v), int(255 - 170 * v), int(255 - 60 * v))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(225, 225, 225))
            if cell >= 24 and cm[i, j] > 0:
                txt = str(int(cm[i, j]))
                tw = font.getlength(txt)
                draw.text((x0 + (cell - tw) / 2, y0 + cell / 2 - 5), txt, fill="white" if v > 0.5 else "black", font=font)
        tw = font.getlength(names[i])
        draw.text((left - 6 - tw, top + i * cell + cell / 2 - 5), names[i], fill="black", font=font)
    for j in range(k):
        label = Image.new("RGB", (label_w, 14), "white")
        ImageDraw.Draw(label).text((2, 1), names[j], fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (left + j * cell + (cell - 14) // 2, top - label_w - 4))
    from ..io import atomic_open

    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
    return True


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    num_classes: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: Progress = NULL_PROGRESS,
) -> dict:
    """Top-1 / top-5 (percent), the confusion matrix and per-class top-1 over ``dataset``
    (sharded over ranks under torchrun, counts summed)."""
    from ..runtime import dist_env

    env = dist_env()
    n = len(dataset)
    indices = list(range(env.rank, n, env.world_size)) if is_dist() else list(range(n))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    k5 = min(5, num_classes)
    was_training = model.training
    model.eval()
    task = progress.task("validate", total=len(indices))
    for batch, skipped in loader:
        if batch is None:
            task.advance(skipped)
            continue
        x, y, _ = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        pred = logits.argmax(dim=-1)
        cm.index_put_((y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True)
        top5 += (logits.topk(k5, dim=-1).indices == y[:, None]).any(dim=-1).sum()
        task.advance(len(y) + skipped)
    task.close()
    model.train(was_training)
    if is_dist():
        torch.distributed.all_reduce(cm)
        torch.distributed.all_reduce(top5)
    cm_np = cm.cpu().numpy().round().astype(np.int64)
    total = int(cm_np.sum())
    correct = int(np.trace(cm_np))
    per_class = {}
    for i in range(num_classes):
        row = int(cm_np[i].sum())
        per_class[i] = 100.0 * cm_np[i, i] / row if row else None
    return {
        "top1": 100.0 * correct / total if total else float("nan"),
        "top5": 100.0 * float(top5.item()) / total if total else float("nan"),
        "confusion": cm_np,
        "per_class": per_class,
        "count": total,
    }


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _merge_resume_config(saved: dict, cfg: FinetuneConfig, explicit: set[str] | None) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    merged = {k: v for k, v in saved.items() if k in names}
    given = cfg.to_dict()
    for k in names:
        if k in RUN_CONTROL:
            if explicit is None or k in explicit or k in ("resume", "stop_after", "output"):
                merged[k] = given[k]
            continue
        if explicit is not None and k in explicit and given[k] != merged.get(k):
            opt = "--" + k.replace("_", "-")
            raise DinokitError(
                f"{opt} {given[k]} differs from the resumed run's {merged.get(k)}; a resumed run keeps its "
                "recipe (leave the option out, or start a new run)."
            )
    for k in ("train", "val", "output"):
        if merged.get(k) is not None:
            merged[k] = Path(merged[k])
    return FinetuneConfig(**merged)


def _epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int, batch_size: int) -> list[int]:
    """This rank's sample order for an epoch: a seeded permutation cut to whole global batches."""
    g = torch.Generator().manual_seed(derive_seed(seed, 29, epoch))
    perm = torch.randperm(n, generator=g)
    used = (n // (world * batch_size)) * world * batch_size
    return perm[:used][rank::world].tolist()


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise DinokitError(
            f"The loss became non-finite at epoch {epoch} step {step}; the last good checkpoint is kept "
            "(try a lower --lr, --clip-grad 1.0 or --precision fp32)."
        )


def finetune(cfg: FinetuneConfig, progress: Progress = NULL_PROGRESS, explicit: set[str] | None = None) -> FinetuneResult:
    """Fine-tune a backbone with a new linear head; writes the run folder (see docs/finetune.md).

    ``explicit`` names the options the user gave (the CLI passes them) so that a resumed run can
    refuse a changed recipe; ``None`` keeps the saved recipe and takes the run-control options
    (epochs, stop_after, num_workers, device) from ``cfg``.
    """
    out = Path(cfg.output)
    ckpt_path = out / "checkpoint.pth"
    resume_state = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise DinokitError(f"--resume: {out} holds no checkpoint.pth to resume from.")
        resume_state = read_checkpoint(ckpt_path)
        if not (isinstance(resume_state, dict) and resume_state.get("format") == CHECKPOINT_FORMAT):
            raise CheckpointError(f"{ckpt_path} is not a dinokit fine-tuning checkpoint.")
        cfg = _merge_resume_config(resume_state["config"], cfg, explicit)
        if cfg.epochs != resume_state["config"]["epochs"]:
            log.warning(
                "resuming a %d-epoch run for %d epochs: the lr schedule is recomputed for the new length.",
                resume_state["config"]["epochs"],
                cfg.epochs,
            )
    _validate(cfg)

    device = resolve_device(cfg.device)
    env = init_distributed(device)
    dtype = resolve_precision(cfg.precision, device, training=True)
    if env.is_main:
        prepare_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume)
        if not cfg.resume:  # --overwrite: nothing of an earlier run may pass for this one's
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    barrier()

    splits = load_splits(cfg)
    if resume_state is not None and list(resume_state["classes"]) != splits.classes:
        raise DataError(f"The classes in {cfg.train} are not those of the run being resumed.")
    classes, num_classes = splits.classes, len(splits.classes)

    # fewer images than one global batch: shrink the batch instead of training on nothing
    batch_size = cfg.batch_size
    world = env.world_size
    if len(splits.train) < batch_size * world:
        batch_size = len(splits.train) // world
        if batch_size < 1:
            raise DataError(f"{len(splits.train)} training images cannot be shared among {world} processes.")
        log.warning(
            "--batch-size %d is more than the %d training images; using batches of %d images.",
            cfg.batch_size,
            len(splits.train),
            batch_size * world,
        )
    global_batch = batch_size * world
    num_workers = loader_workers(cfg.num_workers, device, world)
    if num_workers < cfg.num_workers:
        log.info("%d data-loader worker(s) instead of %d: the compute threads take the other cores", num_workers,
                 cfg.num_workers)  # fmt: skip
    niter = len(splits.train) // global_batch
    peak_lr = cfg.lr * global_batch / 1024.0

    # -- model ------------------------------------------------------------------------------
    if resume_state is not None:
        spec = resume_state["backbone_spec"]
        backbone = build_backbone(spec["arch"], spec["patch_size"] or 16, **spec["kwargs"])
    else:
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("drop_path_rate", cfg.drop_path)
        if cfg.weights == "random":
            kwargs.setdefault("img_size", cfg.image_size)
        torch.manual_seed(derive_seed(cfg.seed, 3))  # the random init (and the head's) is seeded
        backbone = load_backbone(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, **kwargs)
        spec = backbone_spec(backbone, cfg.drop_path)
        if not is_vit(backbone) and cfg.drop_path:
            log.info("drop path applies to ViT backbones only; the ResNet-50 trains without it.")
    model = FinetuneModel(backbone, num_classes).to(device)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=peak_lr, betas=(0.9, 0.999)
    )
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    schedule = build_schedule(cfg, niter, peak_lr)
    mixer = BatchMixer(num_classes, cfg.mixup, cfg.cutmix, cfg.label_smoothing)

    start_epoch, start_step = 0, 0
    best = {"top1": None, "top5": None, "epoch": None}
    carry = {"loss_sum": 0.0, "loss_count": 0, "seconds": 0.0, "images": 0}
    history: list[dict] = []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, start_step = int(resume_state["epoch"]), int(resume_state["step"])
        best = dict(resume_state["best"])
        carry = dict(resume_state["carry"])
        history = [h for h in _read_log(out / "log.jsonl") if h.get("epoch", 0) <= start_epoch]
        if env.is_main:
            atomic_write_text(out / "log.jsonl", "".join(to_json(h, indent=None) + "\n" for h in history))
        if int(resume_state.get("niter", niter)) != niter:
            raise DataError(
                f"The training set gives {niter} steps per epoch, the resumed run had {resume_state['niter']}; "
                "resume with the same images, batch size and number of processes."
            )

    train_ds = SeededImages(
        ImageDataset(
            [p for p, _ in splits.train],
            [t for _, t in splits.train],
            transform=train_transform(cfg.image_size, cfg.randaugment, cfg.min_crop_scale),
            skip_unreadable=True,
        ),
        cfg.seed,
    )
    val_ds = ImageDataset(
        [p for p, _ in splits.val],
        [t for _, t in splits.val],
        transform=eval_transform(cfg.image_size),
        skip_unreadable=True,
    )
    if env.is_main:
        write_json(out / "config.json", {**cfg.to_dict(), "classes": classes})
        if cfg.val is None:
            write_json(
                out / "split.json",
                {"val": [str(p) for p, _ in splits.val], "train_count": len(splits.train)},
            )
    log.info(
        "fine-tuning %s on %d images of %d classes (%d val); batch %d, peak lr %.3g, %s",
        spec["arch"] if spec["patch_size"] is None else f"{spec['arch']}/{spec['patch_size']}",
        len(splits.train),
        num_classes,
        len(splits.val),
        global_batch,
        peak_lr,
        precision_name(dtype),
    )

    result = FinetuneResult(
        output=out,
        classes=classes,
        epochs_done=start_epoch,
        epochs=cfg.epochs,
        finished=False,
        batch_size=global_batch,
        peak_lr=peak_lr,
        num_train=len(splits.train),
        num_val=len(splits.val),
        best_top1=best["top1"],
        best_top5=best["top5"],
        best_epoch=best["epoch"],
        history=history,
    )

    ddp_model: nn.Module | None = None
    last_eval: dict | None = None
    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)

    def save_state(epoch: int, step: int) -> None:
        if env.is_main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch,
                    "step": step,
                    "niter": niter,
                    "best": best,
                    "carry": carry,
                    "config": cfg.to_dict(),
                    "classes": classes,
                    "backbone_spec": spec,
                },
                ckpt_path,
            )
        barrier()

    with GracefulStop() as stop:
        for epoch in range(start_epoch, end_epoch):
            head_only = epoch < cfg.head_warmup_epochs
            for p in model.backbone.parameters():
                p.requires_grad_(not head_only)  # before DDP is built: it syncs only trainable parameters
            if not head_only and is_dist() and ddp_model is None:
                ddp_model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            runner = model if head_only or ddp_model is None else ddp_model
            model.train()
            if head_only:
                model.backbone.eval()  # frozen: no drop path while only the head learns

            train_ds.epoch = epoch
            first = start_step if epoch == start_epoch else 0
            if first == 0:
                carry = {"loss_sum": 0.0, "loss_count": 0, "seconds": 0.0, "images": 0}
            order = _epoch_indices(len(train_ds), cfg.seed, epoch, env.rank, world, batch_size)
            loader = torch.utils.data.DataLoader(
                train_ds,
                batch_size=batch_size,
                sampler=order[first * batch_size :],
                num_workers=num_workers,
                collate_fn=collate_skip_none,
                pin_memory=device.type == "cuda",
                drop_last=True,
            )
            task = progress.task(
                f"epoch {epoch + 1}/{cfg.epochs}" + (" (head only)" if head_only else ""), total=niter
            )
            task.advance(first)
            t0 = time.monotonic()
            step = first
            stopped_mid_epoch = False
            for batch, _skipped in loader:
                it = epoch * niter + step
                lr = float(schedule[it])
                apply_lr(optimizer, lr)
                torch.manual_seed(derive_seed(cfg.seed, 31, env.rank, it))  # drop path, mixup, cutmix
                if batch is not None:
                    x, y, _ = batch
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    x, targets = mixer(x, y)
                    with autocast(device, dtype):
                        if head_only:
                            with torch.no_grad():
                                feats = model.backbone(x)
                            logits = model.head(feats)
                        else:
                            logits = runner(x)
                    loss = soft_cross_entropy(logits, targets)
                    n_img = len(y)
                else:  # every image of the batch was unreadable: keep ranks in step with a zero loss
                    blank = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)
                    with autocast(device, dtype):
                        loss = (model.head(model.backbone(blank).detach()) if head_only else runner(blank)).sum() * 0.0
                    n_img = 0
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                if head_only and is_dist():
                    for p in model.head.parameters():
                        if p.grad is not None:
                            all_reduce_mean(p.grad)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                loss_value = float(all_reduce_mean(loss.detach().float().clone()).item())
                _check_finite(loss_value, epoch, step)
                carry["loss_sum"] += loss_value
                carry["loss_count"] += 1
                carry["images"] += n_img * world
                step += 1
                task.advance(1, loss=loss_value, lr=lr)
                signum = _stop_signal(stop)
                if signum and step < niter:
                    stopped_mid_epoch = True
                    break
            task.close()
            carry["seconds"] += time.monotonic() - t0

            if stopped_mid_epoch:
                save_state(epoch, step)
                result.signal = signum
                result.stopped_at = (epoch + 1, step)
                break

            # -- end of epoch: validate, log, checkpoint ------------------------------------
            ev = evaluate(model, val_ds, num_classes, batch_size, num_workers, device, dtype, progress)
            last_eval = ev
            improved = best["top1"] is None or ev["top1"] > best["top1"]
            if improved:
                best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch + 1}
            entry = {
                "epoch": epoch + 1,
                "phase": "head" if head_only else "full",
                "train_loss": carry["loss_sum"] / max(carry["loss_count"], 1),
                "val_top1": ev["top1"],
                "val_top5": ev["top5"],
                "lr": float(schedule[epoch * niter + niter - 1]),
                "images_per_second": carry["images"] / max(carry["seconds"], 1e-9),
                "seconds": carry["seconds"],
            }
            history.append(entry)
            if env.is_main:
                append_jsonl(out / "log.jsonl", entry)
                extra = {"epoch": epoch + 1, "val_top1": ev["top1"], "val_top5": ev["top5"]}
                if improved:
                    save_checkpoint(export_model(model, classes, spec, cfg.image_size, extra), out / "best.pth")
            progress.log(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f}  val top-1 {ev['top1']:.2f}  "
                f"top-5 {ev['top5']:.2f}  ({entry['seconds']:.1f} s)"
            )
            carry = {"loss_sum": 0.0, "loss_count": 0, "seconds": 0.0, "images": 0}
            save_state(epoch + 1, 0)
            result.epochs_done = epoch + 1
            _fill_result(result, ev, best, classes)
            if env.is_main:
                _write_outputs(out, cfg, result, ev, classes, final=False)
            signum = _stop_signal(stop)
            if signum:
                result.signal = signum
                break

    result.history = history
    result.finished = result.epochs_done >= cfg.epochs and result.signal is None
    if result.finished and env.is_main:
        extra = {"epoch": result.epochs_done}
        if last_eval is not None:
            extra.update(val_top1=last_eval["top1"], val_top5=last_eval["top5"])
        save_checkpoint(export_model(model, classes, spec, cfg.image_size, extra), out / "model.pth")
        if last_eval is not None:
            _write_outputs(out, cfg, result, last_eval, classes, final=True)
        elif (out / "metrics.json").is_file():
            # resumed after the last epoch had already been validated: mark the metrics final
            import json

            m = json.loads((out / "metrics.json").read_text())
            m["finished"] = True
            write_json(out / "metrics.json", m)
    barrier()
    return result


def _stop_signal(stop: GracefulStop) -> int:
    """The signal any rank got (0 for none), the same on every rank."""
    if not is_dist():
        return int(stop.signum or 0)
    flag = torch.tensor([float(stop.signum or 0)])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _validate(cfg: FinetuneConfig) -> None:
    if cfg.epochs < 1:
        raise DinokitError("--epochs must be at least 1.")
    if not 0 <= cfg.head_warmup_epochs <= cfg.epochs:
        raise DinokitError("--head-warmup-epochs must be between 0 and --epochs.")
    if not 0 < cfg.layer_decay <= 1:
        raise DinokitError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}.")
    if not 0 <= cfg.label_smoothing < 1:
        raise DinokitError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}.")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise DinokitError("--mixup and --cutmix are Beta-distribution alphas: 0 (off) or positive.")
    if not 0 <= cfg.drop_path < 1:
        raise DinokitError(f"--drop-path must be in [0, 1), got {cfg.drop_path}.")
    if cfg.image_size < 8:
        raise DinokitError(f"--image-size must be at least 8 pixels, got {cfg.image_size}.")
    if not 0 < cfg.min_crop_scale <= 1:
        raise DinokitError(f"--min-crop-scale must be in (0, 1], got {cfg.min_crop_scale}.")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise DinokitError("--stop-after must be at least 1.")
    if cfg.lr <= 0:
        raise DinokitError("--lr must be positive.")


def _read_log(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line
    return out


def _fill_result(result: FinetuneResult, ev: dict, best: dict, classes: list[str]) -> None:
    result.final_top1, result.final_top5 = ev["top1"], ev["top5"]
    result.best_top1, result.best_top5, result.best_epoch = best["top1"], best["top5"], best["epoch"]
    result.per_class_top1 = {classes[i]: v for i, v in ev["per_class"].items()}


def _write_outputs(out: Path, cfg: FinetuneConfig, result: FinetuneResult, ev: dict, classes, final: bool) -> None:
    drawn = draw_confusion(
        ev["confusion"],
        classes,
        out / "confusion.png",
        title=f"Confusion matrix, epoch {result.epochs_done}: val top-1 {ev['top1']:.1f}%",
    )
    metrics: dict[str, Any] = {
        "finished": final,
        "epochs_done": result.epochs_done,
        "epochs": result.epochs,
        "top1": result.final_top1,
        "top5": result.final_top5,
        "best_top1": result.best_top1,
        "best_top5": result.best_top5,
        "best_epoch": result.best_epoch,
        "per_class_top1": result.per_class_top1,
        "num_classes": len(classes),
        "num_train": result.num_train,
        "num_val": result.num_val,
        "global_batch_size": result.batch_size,
        "peak_lr": result.peak_lr,
        "confusion_png": drawn,
    }
    write_metrics(out, metrics, config=cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
@dataclass
class PredictResult:
    paths: list[Path]
    top_classes: list[list[str]]
    top_probs: list[list[float]]
    skipped: list[Path]
    classes: list[str]


@torch.no_grad()
def predict_images(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    top: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    progress: Progress = NULL_PROGRESS,
) -> PredictResult:
    """Class probabilities (softmax of the head) of images, folders or globs, the ``top`` best each."""
    from ..data.images import expand_image_inputs

    if top < 1:
        raise DinokitError("--top must be at least 1.")
    model, meta = load_finetuned(model_path)
    paths = expand_image_inputs(inputs)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev, training=False)
    classes = list(meta["classes"])
    k = min(top, len(classes))
    ds = ImageDataset(paths, transform=eval_transform(int(meta.get("image_size", 224))), skip_unreadable=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none
    )
    model = model.to(dev)
    kept: list[Path] = []
    top_classes: list[list[str]] = []
    top_probs: list[list[float]] = []
    task = progress.task("predict", total=len(paths))
    for batch, skipped in loader:
        if batch is None:
            task.advance(skipped)
            continue
        x, _, idx = batch
        with autocast(dev, dtype):
            logits = model(x.to(dev))
        probs = F.softmax(logits.float(), dim=-1).cpu()
        p, c = probs.topk(k, dim=-1)
        for row in range(len(idx)):
            kept.append(paths[int(idx[row])])
            top_classes.append([classes[int(j)] for j in c[row]])
            top_probs.append([float(v) for v in p[row]])
        task.advance(len(idx) + skipped)
    task.close()
    kept_set = set(kept)
    skipped_paths = [p for p in paths if p not in kept_set]
    return PredictResult(kept, top_classes, top_probs, skipped_paths, classes)


__all__ = [
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "PredictResult",
    "apply_lr",
    "build_schedule",
    "draw_confusion",
    "evaluate",
    "export_model",
    "finetune",
    "layer_id",
    "layer_lr_scale",
    "load_finetuned",
    "param_groups",
    "predict_images",
]

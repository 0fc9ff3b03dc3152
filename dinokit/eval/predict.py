"""A fine-tuned classifier at work: its top-1 / top-5 accuracy and confusion matrix on labelled
images (the validation of fine-tuning transfer, paper Sec. 4.2.3), and class probabilities for
any images (``dinokit predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_finetuned
from ..checkpoints.backbone import given_normalization, weights_normalization
from ..data.images import ImageDataset, expand_image_inputs, readable_batches
from ..data.loader import image_loader
from ..data.normalization import IMAGENET, Normalization, check_normalization
from ..data.transforms import eval_transform, resize_for
from ..errors import DinokitError
from ..progress import NULL_PROGRESS, Progress
from ..runtime import autocast, is_dist, resolve_device, resolve_precision
from .features import rank_shard_loader
from .metrics import percent, topk_correct


@torch.no_grad()
def evaluate_classifier(
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
    (sharded over ranks under torchrun, counts summed).

    Top-1 and the per-class scores are read off the confusion matrix (argmax predictions), so the
    picture and the numbers agree; top-5 counts with :func:`dinokit.eval.metrics.topk_correct`.
    """
    loader, indices = rank_shard_loader(dataset, batch_size, num_workers, device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    task = progress.task("validate", total=len(indices))
    for x, y, _ in readable_batches(loader, task):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        pred = logits.argmax(dim=-1)
        cm.index_put_((y, pred), torch.ones_like(y, dtype=torch.float64), accumulate=True)
        top5 += topk_correct(logits, y)[1]
    task.close()
    model.train(was_training)
    if is_dist():
        torch.distributed.all_reduce(cm)
        torch.distributed.all_reduce(top5)
    cm_np = cm.cpu().numpy().round().astype(np.int64)
    total = int(cm_np.sum())
    per_class = {}
    for i in range(num_classes):
        row = int(cm_np[i].sum())
        per_class[i] = percent(int(cm_np[i, i]), row) if row else None
    return {
        "top1": percent(int(np.trace(cm_np)), total),
        "top5": percent(float(top5.item()), total),
        "confusion": cm_np,
        "per_class": per_class,
        "count": total,
    }


@dataclass
class PredictResult:
    paths: list[Path]
    top_classes: list[list[str]]
    top_probs: list[list[float]]
    skipped: list[Path]
    classes: list[str]
    normalization: Normalization = IMAGENET  #: the input normalisation used


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
    strict: bool = False,
    exact_decode: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> PredictResult:
    """Class probabilities (softmax of the head) of images, folders or globs, the ``top`` best each
    (a large JPEG decoded at the reduced scale that covers the resize, unless ``exact_decode``),
    normalised with the model file's own mean/std (``mean``/``std`` override them)."""
    if top < 1:
        raise DinokitError("--k must be at least 1.")
    check_normalization(mean, std)
    model, meta = load_finetuned(model_path)
    norm = given_normalization(weights_normalization(str(model_path), meta, Path(model_path)), mean, std)
    paths = expand_image_inputs(inputs)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev, training=False)
    classes = list(meta["classes"])
    k = min(top, len(classes))
    crop = int(meta.get("image_size", 224))
    ds = ImageDataset(
        paths,
        transform=eval_transform(resize_for(crop), crop, norm),
        strict=strict,
        exact_decode=exact_decode,
    )
    loader = image_loader(ds, batch_size, num_workers, device=dev)
    model = model.to(dev)
    kept: list[Path] = []
    top_classes: list[list[str]] = []
    top_probs: list[list[float]] = []
    task = progress.task("predict", total=len(paths))
    for x, _, idx in readable_batches(loader, task):
        with autocast(dev, dtype):
            logits = model(x.to(dev))
        probs = F.softmax(logits.float(), dim=-1).cpu()
        p, c = probs.topk(k, dim=-1)
        for row in range(len(idx)):
            kept.append(paths[int(idx[row])])
            top_classes.append([classes[int(j)] for j in c[row]])
            top_probs.append([float(v) for v in p[row]])
    task.close()
    kept_set = set(kept)
    skipped_paths = [p for p in paths if p not in kept_set]
    return PredictResult(kept, top_classes, top_probs, skipped_paths, classes, norm)


__all__ = ["PredictResult", "evaluate_classifier", "predict_images"]

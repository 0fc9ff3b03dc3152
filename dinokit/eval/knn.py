"""Weighted k-nearest-neighbour classification on frozen features (paper, Sec. 4.1 and Appendix).

Features are L2-normalised; each test feature takes its k most cosine-similar training features,
each neighbour votes for its class with weight ``exp(sim / T)`` (T = 0.07), and the class with the
largest summed vote is the prediction. The votes are computed as ``exp((sim - max sim) / T)`` in
float64, which ranks the classes exactly as ``exp(sim / T)`` would without overflowing for small T. Top-1 and top-5 are reported for k in {10, 20, 100, 200}
(the paper quotes 20-NN).

The neighbours are found once, for the largest k, and every smaller k reuses a prefix of that
sorted list, its votes accumulated from the previous k's. The test set is processed in chunks sized
by a memory budget, so any number of test images (one included) and any number of classes work.

Ties: equal votes go to the lower class index; neighbours with exactly equal similarity at the
k-th place are taken in the order ``torch.topk`` returns them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoints import BackboneOptions, weights_needed
from ..errors import DataError
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions
from .features import (
    MODEL_KEYS,
    Embedder,
    FeatureSpec,
    align_labels,
    check_fingerprint,
    check_same_model,
    load_features,
    scan_images,
)
from .metrics import percent, ranked_hits, require_finite

log = logging.getLogger("dinokit")

DEFAULT_KS = (10, 20, 100, 200)
#: the scale of each score in metrics.json: accuracies in percent, as the paper reports them
UNITS = {"top1": "percent", "top5": "percent", "per_class_top1": "percent"}
DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of working memory for one chunk of queries


def _check_inputs(train_features, train_labels, test_features, test_labels) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise DataError(
            f"Features must be (images, dim) tables; got {tuple(train_features.shape)} and {tuple(test_features.shape)}."
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise DataError(
            f"The training features are {train_features.shape[1]}-d but the test features are "
            f"{test_features.shape[1]}-d; compute both with the same weights and feature options."
        )
    if train_features.shape[0] == 0:
        raise DataError("The training set is empty; k-NN needs at least one training image.")
    if train_labels.shape[0] != train_features.shape[0]:
        raise DataError(
            f"There are {train_features.shape[0]} training features but {train_labels.shape[0]} labels."
        )
    if test_labels is not None and test_labels.shape[0] != test_features.shape[0]:
        raise DataError(
            f"There are {test_features.shape[0]} test features but {test_labels.shape[0]} labels."
        )


def clamp_ks(ks: Sequence[int], n_train: int) -> list[int]:
    """Sorted distinct k values, each at most the training-set size (with a warning when clamped)."""
    out = []
    for k in ks:
        k = int(k)
        if k < 1:
            raise DataError(f"k must be a positive integer, got {k}.")
        if k > n_train:
            log.warning("k = %d is larger than the training set; using k = %d", k, n_train)
            k = n_train
        out.append(k)
    return sorted(set(out))


def chunk_size_for(
    n_train: int, kmax: int, num_classes: int, memory_budget: int, element_size: int = 4
) -> int:
    """How many queries fit the budget: their similarity rows, the top-k and the vote tables."""
    per_query = element_size * (n_train + 4 * kmax + 3 * num_classes) + 8 * (kmax + num_classes)
    return max(1, int(memory_budget // per_query))


@dataclass
class KnnPredictions:
    """For each k: the 5 (or fewer) best classes of every test image, best first, (M, min(5, C))."""

    ranked: dict[int, torch.Tensor]
    ks: list[int]
    num_classes: int
    requested: dict[int, int] = field(default_factory=dict)  # asked-for k -> k used


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str | None = None,
    progress: Progress = NULL_PROGRESS,
) -> KnnPredictions:
    """The weighted k-NN's ranked classes for every test feature and every k."""
    train_labels = torch.as_tensor(train_labels).long()
    _check_inputs(train_features, train_labels, test_features, None)
    require_finite(train_features, "The training features")
    require_finite(test_features, "The test features")
    if temperature <= 0:
        raise DataError(f"The temperature must be positive, got {temperature}.")
    device = torch.device(device) if device is not None else train_features.device
    n_train = train_features.shape[0]
    requested = [int(k) for k in ks]
    used = clamp_ks(requested, n_train)
    kmax = used[-1]
    label_max = int(train_labels.max()) + 1 if n_train else 0
    C = int(num_classes) if num_classes is not None else label_max
    if label_max > C or int(train_labels.min()) < 0:
        raise DataError(
            f"Training labels run from {int(train_labels.min())} to {label_max - 1}, outside {C} classes."
        )
    n_rank = min(5, C)

    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    labels = train_labels.to(device)
    M = test_features.shape[0]
    chunk = chunk_size_for(n_train, kmax, C, memory_budget)
    ranked = {k: torch.empty(M, n_rank, dtype=torch.long) for k in used}
    task = progress.task("k-NN", total=M)
    for start in range(0, M, chunk):
        q = F.normalize(test_features[start : start + chunk].to(device, torch.float32), dim=1)
        sim = q @ train.T
        top_sim, top_idx = sim.topk(kmax, dim=1, largest=True, sorted=True)
        del sim
        # exp(sim / T) overflows float32 below T ~ 0.011; shifting by each query's best similarity
        # scales all of its votes by one factor exp(-max / T), which keeps their ranking, and float64
        # keeps the shifted votes exact enough to rank like the unshifted float64 formulation
        if device.type == "mps":  # no float64 there; the votes are small, count them on the CPU
            top_sim, top_idx = top_sim.cpu(), top_idx.cpu()
        top_sim = top_sim.double()
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp_()
        nb_labels = labels.to(top_idx.device)[top_idx]
        votes = torch.zeros(q.shape[0], C, device=top_sim.device, dtype=torch.float64)
        voted = 0  # neighbours whose votes are already in ``votes``
        for k in used:
            votes.scatter_add_(1, nb_labels[:, voted:k], weights[:, voted:k])
            voted = k
            # a stable descending sort: equal votes rank the lower class index first
            order = votes.sort(dim=1, descending=True, stable=True).indices[:, :n_rank]
            ranked[k][start : start + q.shape[0]] = order.cpu()
        task.advance(q.shape[0])
    task.close()
    return KnnPredictions(ranked, used, C, {k: min(k, n_train) for k in requested})


def accuracy_from_ranked(ranked: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent from ranked class lists; top-5 with fewer than 5 classes is top-C."""
    if len(targets) == 0:
        return float("nan"), float("nan")
    top1, top5 = ranked_hits(ranked, targets)
    return percent(top1, len(targets)), percent(top5, len(targets))


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str | None = None,
    progress: Progress = NULL_PROGRESS,
) -> dict[int, tuple[float, float]]:
    """The paper's weighted k-NN: ``{k: (top1, top5)}`` in percent, for each requested k.

    ``train_features`` (N, D) and ``test_features`` (M, D) are L2-normalised here; labels are class
    indices. ``num_classes`` defaults to the largest label + 1 (of train and test). A k larger than
    the training set is clamped to its size (with a warning) and reported under the k asked for.
    Test images are processed in chunks that fit ``memory_budget`` bytes; the top-k is found once
    for the largest k.
    """
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    _check_inputs(train_features, train_labels, test_features, test_labels)
    if num_classes is None and len(test_labels):
        num_classes = max(int(train_labels.max()) + 1, int(test_labels.max()) + 1)
    preds = knn_predict(
        train_features,
        train_labels,
        test_features,
        ks,
        temperature,
        num_classes,
        memory_budget,
        device,
        progress,
    )
    return {k: accuracy_from_ranked(preds.ranked[used], test_labels) for k, used in preds.requested.items()}


def per_class_top1(ranked: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Top-1 accuracy (percent) of each class that has test images."""
    out = {}
    correct = ranked[:, 0] == targets
    for i, name in enumerate(classes):
        mask = targets == i
        if bool(mask.any()):
            out[name] = int(correct[mask].sum()) * 100.0 / int(mask.sum())
    return out


# ---------------------------------------------------------------------------------------------
# The run behind `dinokit knn`
# ---------------------------------------------------------------------------------------------
@dataclass
class KnnConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit knn`` needs: images (with weights) or precomputed features, and the protocol."""

    output: Path
    train: Path | None = None
    val: Path | None = None
    train_features: Path | None = None
    val_features: Path | None = None
    n_last_blocks: int = 1
    avgpool_patch_tokens: bool = False
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = 0.07
    resize: int = 256
    crop: int = 224
    memory_budget: int = DEFAULT_MEMORY_BUDGET


@dataclass
class KnnResult:
    accuracies: dict[int, tuple[float, float]]
    per_class: dict[str, float]
    per_class_k: int
    n_train: int
    n_val: int
    num_classes: int
    classes: list[str]
    fingerprint: dict[str, Any]
    k_used: dict[int, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        return {
            "knn": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in self.accuracies.items()},
            "per_class_top1": self.per_class,
        }


def load_feature_pair(cfg: KnnConfig, progress: Progress = NULL_PROGRESS):
    """Train and val feature sets for a k-NN/linear run: from files, or embedded (cached in the output)."""
    given = (cfg.train_features is not None, cfg.val_features is not None)
    if any(given) and not all(given):
        raise DataError("Give both --train-features and --val-features, or neither.")
    spec = FeatureSpec(
        weights=cfg.weights,
        arch=cfg.arch,
        patch_size=cfg.patch_size,
        checkpoint_key=cfg.checkpoint_key,
        model_kwargs=dict(cfg.model_kwargs),
        mean=cfg.mean,
        std=cfg.std,
        n_last_blocks=cfg.n_last_blocks,
        avgpool_patch_tokens=cfg.avgpool_patch_tokens,
        resize=cfg.resize,
        crop=cfg.crop,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=cfg.device,
        precision=cfg.precision,
        seed=cfg.seed,
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )
    if cfg.train_features is not None and cfg.val_features is not None:
        train = load_features(cfg.train_features)
        val = load_features(cfg.val_features)
        check_same_model(train, val, str(cfg.train_features), str(cfg.val_features))
        if cfg.weights is not None:
            # the files are checked against the weights; their options were checked against each other
            expected = Embedder(spec).fingerprint
            check_fingerprint(train, expected, str(cfg.train_features), MODEL_KEYS)
            check_fingerprint(val, expected, str(cfg.val_features), MODEL_KEYS)
        return train, val
    if cfg.train is None or cfg.val is None:
        raise DataError("Give --train and --val image folders (or --train-features and --val-features).")
    if cfg.weights is None:
        raise DataError(weights_needed("to embed the images"))
    train_images = scan_images(cfg.train, labelled=True)
    val_images = scan_images(cfg.val, classes=train_images.classes, labelled=True)
    embedder = Embedder(spec)
    out = Path(cfg.output)
    train = embedder.embed(
        train_images, cache=out / "train_features.pt", progress=progress, description="train features"
    )
    val = embedder.embed(
        val_images, cache=out / "val_features.pt", progress=progress, description="val features"
    )
    return train, val


def knn_eval(cfg: KnnConfig, progress: Progress = NULL_PROGRESS) -> KnnResult:
    """``dinokit knn``: embed (or load) train and val, run the weighted k-NN, per-k and per-class scores."""
    train, val = load_feature_pair(cfg, progress)
    val_labels = align_labels(train, val, "training", "validation")
    C = max(len(train.classes), int(train.labels.max()) + 1)
    preds = knn_predict(
        train.features,
        train.labels,
        val.features,
        cfg.ks,
        cfg.temperature,
        C,
        cfg.memory_budget,
        progress=progress,
    )
    acc = {k: accuracy_from_ranked(preds.ranked[used], val_labels) for k, used in preds.requested.items()}
    main_k = 20 if 20 in preds.requested else min(preds.requested)
    names = train.classes or [str(i) for i in range(C)]
    per_class = per_class_top1(preds.ranked[preds.requested[main_k]], val_labels, names)
    return KnnResult(
        acc,
        per_class,
        main_k,
        len(train),
        len(val),
        C,
        list(names),
        dict(train.fingerprint),
        dict(preds.requested),
    )

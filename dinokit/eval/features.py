"""Batched (and, under torchrun, sharded) feature extraction: the piece every evaluation shares.

:func:`extract_features` runs a ``feature_fn(model, images) -> (B, D)`` over a dataset that yields
``(image, label, index)``; under torchrun each rank embeds a strided shard and the features are
gathered so every rank ends with all of them, in dataset order.

On top of it, :func:`compute_features` embeds a folder (an ImageFolder root or any folder of images)
into a :class:`FeatureSet` (features, labels, class names, paths and a fingerprint of the weights,
architecture, transform and feature options); :func:`save_features` / :func:`load_features` write
and read it (``.pt``, or ``features.npy`` + ``paths.txt``); :class:`Embedder` loads a backbone once
and reuses cached feature files whose fingerprint matches.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoints import (
    BackboneOptions,
    PreparedBackbone,
    file_fingerprint,
    prepare_backbone,
    state_dict_fingerprint,
)
from ..data.images import (
    ImageDataset,
    collate_skip_none,
    data_fingerprint,
    decode_name,
    find_images,
    looks_labelled,
    readable_batches,
    scan_labelled_folder,
)
from ..data.loader import dataset_length, image_loader
from ..data.normalization import IMAGENET
from ..data.transforms import describe_transform, eval_transform
from ..errors import DataError, DinokitError
from ..io import (
    atomic_open,
    atomic_write_text,
    cell_text,
    check_output_file,
    inert_cell,
    torch_save_atomic,
    write_json,
)
from ..models.inference import inference_model
from ..models.registry import backbone_arch, is_vit
from ..models.vit import variant_generation
from ..progress import NULL_PROGRESS, Progress
from ..runtime import (
    RuntimeOptions,
    autocast,
    cpu_threads,
    dist_env,
    is_dist,
    plan_cpu,
    precision_name,
    resolve_device,
    resolve_precision,
)
from .cache import CachedTensors
from .feature_files import features_output
from .metrics import require_finite

log = logging.getLogger("dinokit")

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def cls_feature_fn(n_last_blocks: int = 1, avgpool_patch_tokens: bool = False) -> FeatureFn:
    """The frozen-evaluation feature (spec frozen-eval): the CLS token after the final norm, or the CLS
    tokens of the last ``n`` blocks concatenated, optionally with the average of the last block's patch
    tokens (register and storage tokens are never among them). With both and n=1 the DINO reference's
    element order is kept for DINO's ViTs: [CLS_0, avg_0, CLS_1, avg_1, ...]; DINOv2/DINOv3 backbones
    take DINOv2's linear protocol order, the average appended after the CLS tokens, which its released
    heads need. ResNet backbones give their 2048-d average pool.
    """

    def fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        get_intermediate_layers = getattr(model, "get_intermediate_layers", None)
        if get_intermediate_layers is None:
            return model(images)
        if n_last_blocks == 1 and not avgpool_patch_tokens:
            return model(images)
        layers = get_intermediate_layers(images, n_last_blocks)
        out = torch.cat([x[:, 0] for x in layers], dim=-1)
        if avgpool_patch_tokens:
            avg = layers[-1][:, 1:].mean(dim=1)
            v1 = variant_generation(getattr(model, "arch", None) or "") == 1
            if (
                n_last_blocks == 1 and v1
            ):  # the reference's element-interleaved order, which its linear heads need
                out = torch.cat((out.unsqueeze(-1), avg.unsqueeze(-1)), dim=-1).reshape(out.shape[0], -1)
            else:  # the reference cannot combine the two; dinokit appends the average
                out = torch.cat((out, avg), dim=-1)
        return out

    return fn


def rank_shard_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    persistent_workers: bool = False,
    decode_threads: int | None = None,
) -> tuple[Iterable, list[int]]:
    """This rank's share of ``dataset`` for an evaluation: every world-size-th item from the rank's
    own under torchrun (all of them in one process), in order, in batches without the unreadable
    images (:func:`~dinokit.data.images.collate_skip_none`). Returns the loader and its indices.
    Without ``num_workers`` the items are made ahead of the model in ``decode_threads`` threads
    (:func:`dinokit.data.loader.image_loader`; None: as many as the thread plan leaves, 0: none)."""
    env = dist_env()
    n = dataset_length(dataset)
    indices = list(range(env.rank, n, env.world_size)) if is_dist() else list(range(n))
    shard = torch.utils.data.Subset(dataset, indices)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            shard,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_skip_none,
            pin_memory=device.type == "cuda",
            persistent_workers=persistent_workers,
        )
        return loader, indices
    return image_loader(shard, batch_size, 0, decode_threads, device=device), indices


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    feature_fn: FeatureFn | None = None,
    progress: Progress = NULL_PROGRESS,
    description: str = "features",
    decode_threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``dataset``; returns (features (N, D) float32 on the CPU, kept (N,) bool).

    Items the dataset returns as ``None`` (unreadable images, unless ``strict``) get a zero row
    and ``kept = False``. Without ``num_workers`` the items are made ahead of the model in
    ``decode_threads`` threads (:func:`dinokit.data.loader.image_loader`; None: as many as the
    thread plan leaves, 0: none, in this thread).
    """
    device = torch.device(device)
    feature_fn = feature_fn or (lambda m, x: m(x))
    n = dataset_length(dataset)
    loader, indices = rank_shard_loader(
        dataset, batch_size, num_workers, device, decode_threads=decode_threads
    )
    model = model.to(device).eval()
    model, dtype = inference_model(model, dtype)
    feats: torch.Tensor | None = None
    kept = torch.zeros(n, dtype=torch.bool)
    task = progress.task(description, total=len(indices))
    for images, _, idx in readable_batches(loader, task):
        with autocast(device, dtype):
            out = feature_fn(model, images.to(device, non_blocking=True))
        out = out.float().cpu()
        if feats is None:
            feats = torch.zeros(n, out.shape[1])
        feats[idx] = out
        kept[idx] = True
    task.close()
    if feats is None:
        feats = torch.zeros(n, 0)
    if is_dist():
        # every rank contributes its rows; the sum over ranks fills the full table
        dim = torch.tensor([feats.shape[1]], dtype=torch.long)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if feats.shape[1] != dim.item():
            feats = torch.zeros(n, int(dim.item()))
        backend_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        f = feats.to(backend_device)
        k = kept.to(backend_device, torch.uint8)
        torch.distributed.all_reduce(f)
        torch.distributed.all_reduce(k)
        feats, kept = f.cpu(), k.cpu().bool()
    return feats, kept


# ---------------------------------------------------------------------------------------------
# Feature sets: features with their labels, class names, file paths and fingerprint
# ---------------------------------------------------------------------------------------------
FEATURES_FORMAT_VERSION = 1

#: fingerprint entries that describe the model and the feature, not the data: two feature sets may be
#: compared (train against val) only when these agree
MODEL_KEYS = ("weights", "arch", "patch_size", "embed_dim", "depth")
OPTION_KEYS = ("transform", "n_last_blocks", "avgpool_patch_tokens", "precision")


@dataclass
class FeatureSet:
    """Embeddings of a folder of images, with what is needed to use and to trust them later.

    ``labels`` are class indices into ``classes`` (None for an unlabelled folder); ``paths`` are the
    image files, one per row; ``fingerprint`` names the weights, architecture, transform and feature
    options the rows were made with (and a hash of the file list, under ``data``).
    """

    features: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str]
    paths: list[str]
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FEATURES_FORMAT_VERSION,
            "features": self.features.contiguous(),
            "labels": self.labels,
            "classes": list(self.classes),
            "paths": list(self.paths),
            "fingerprint": dict(self.fingerprint),
        }


def weights_id(weights: str | None, model: nn.Module | None = None, seed: int | None = None) -> str:
    """What identifies the weights in a fingerprint: ``random(seed=S)``, or the hash of the loaded
    backbone's state dict (so a training checkpoint's teacher and the backbone file exported from it
    agree, and a renamed or moved file still matches); without a model, the file's SHA-256."""

    weights = str(weights)
    if weights == "random":
        return f"random(seed={seed})"
    if model is not None:
        return "state:" + state_dict_fingerprint(model.state_dict())
    path = Path(weights).expanduser()
    if path.is_file():
        return "sha256:" + file_fingerprint(path)
    return weights


def feature_fingerprint(
    model: nn.Module,
    weights: str | None,
    transform: Any,
    n_last_blocks: int = 1,
    avgpool_patch_tokens: bool = False,
    checkpoint_key: str = "teacher",
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The fingerprint of features made by ``model`` (loaded from ``weights``) through ``transform``."""

    vit = is_vit(model)
    norm = getattr(model, "normalization", None) or IMAGENET
    return {
        "weights": weights_id(weights, model, seed),
        "weights_source": str(weights),
        "checkpoint_key": checkpoint_key if str(weights) != "random" else None,
        "arch": backbone_arch(model),
        "patch_size": getattr(model, "patch_size", None),
        "embed_dim": getattr(model, "embed_dim", None),
        "depth": getattr(model, "depth", None),
        "transform": describe_transform(transform),
        "n_last_blocks": int(n_last_blocks) if vit else 1,
        "avgpool_patch_tokens": bool(avgpool_patch_tokens) if vit else False,
        "tokens": describe_tokens(model, n_last_blocks, avgpool_patch_tokens),
        "normalization": norm.record(),
        "precision": precision_name(dtype),
    }


def describe_tokens(model: nn.Module, n_last_blocks: int = 1, avgpool_patch_tokens: bool = False) -> str:
    """Which tokens a feature is made of, in words (what metrics.json records), as
    :func:`cls_feature_fn` makes it."""
    if not is_vit(model):
        return "the global average pool"
    cls = (
        "the CLS token of the last block"
        if n_last_blocks == 1
        else f"the CLS tokens of the last {n_last_blocks} blocks"
    )
    if not avgpool_patch_tokens:
        return cls + " (after the final norm)"
    v1 = variant_generation(getattr(model, "arch", None) or "") == 1
    order = "interleaved with" if n_last_blocks == 1 and v1 else "followed by"
    return f"{cls} {order} the mean of the last block's patch tokens (after the final norm)"


@dataclass
class ImageList:
    """The images of a folder: a labelled ImageFolder root or any folder of images (recursive)."""

    root: Path
    paths: list[Path]
    labels: list[int] | None
    classes: list[str]


def scan_images(
    data: str | os.PathLike, classes: Sequence[str] | None = None, labelled: bool | None = None
) -> ImageList:
    """List the images of ``data``. A folder of class sub-folders (and no loose images) is read as an
    ImageFolder; anything else as plain images, searched recursively. With ``classes`` (the training
    set's), class indices follow that list and a class it lacks is an error."""

    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"The folder {root} does not exist.")
    if root.is_dir() and not any(e for e in root.iterdir() if not e.name.startswith(".")):
        raise DataError(f"The folder {root} is empty; it should hold images (or ROOT/<class>/<image>).")
    if labelled is None:
        labelled = looks_labelled(root)
    if labelled:
        found = scan_labelled_folder(root, classes=classes)
        return ImageList(root, found.paths, found.targets, found.classes)
    if classes is not None:
        raise DataError(
            f"{root} has no class sub-folders (expected ROOT/<class>/<image>), so it has no labels."
        )
    paths = find_images(root)
    if not paths:
        raise DataError(f"{root} holds no images.")
    return ImageList(root if root.is_dir() else root.parent, paths, None, [])


def compute_features(
    model: nn.Module,
    data: str | os.PathLike | ImageList,
    transform: Any = None,
    n_last_blocks: int = 1,
    avgpool_patch_tokens: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    classes: Sequence[str] | None = None,
    weights: str | None = None,
    checkpoint_key: str = "teacher",
    seed: int | None = None,
    progress: Progress = NULL_PROGRESS,
    description: str = "features",
    fingerprint: dict[str, Any] | None = None,
    strict: bool = False,
    exact_decode: bool = False,
) -> FeatureSet:
    """Embed a folder of images (labelled or not) with ``model``; the library form of ``dinokit features``.

    ``transform`` defaults to the evaluation transform (Resize 256 bicubic, CenterCrop 224,
    normalise). Unreadable images are skipped with a warning. Under torchrun each rank embeds a
    shard and every rank gets all rows. ``weights`` (what ``model`` was loaded from) goes into the
    fingerprint; without it the fingerprint hashes the model's state dict. ``fingerprint``: one the
    caller made already (as :class:`Embedder` does), used as it is. A large JPEG is decoded at the
    reduced scale that still covers the transform's resize, unless ``exact_decode``.
    """

    if transform is None:
        transform = eval_transform(norm=getattr(model, "normalization", None) or IMAGENET)
    images = data if isinstance(data, ImageList) else scan_images(data, classes=classes)
    dataset = ImageDataset(
        images.paths, images.labels, transform=transform, strict=strict, exact_decode=exact_decode
    )
    fn = cls_feature_fn(n_last_blocks, avgpool_patch_tokens)
    feats, kept = extract_features(
        model, dataset, batch_size, num_workers, device, dtype, fn, progress, description=description
    )
    if not bool(kept.any()):
        raise DataError(f"None of the {len(images.paths)} images in {images.root} could be read.")
    if not bool(kept.all()):
        n_bad = int((~kept).sum())
        log.warning("%d unreadable %s left out", n_bad, "image was" if n_bad == 1 else "images were")
    paths = [str(p) for p, k in zip(images.paths, kept.tolist()) if k]
    labels = None
    if images.labels is not None:
        labels = torch.tensor(images.labels, dtype=torch.long)[kept]
    if fingerprint is not None:
        return FeatureSet(feats[kept].contiguous(), labels, list(images.classes), paths, dict(fingerprint))
    fp = feature_fingerprint(
        model,
        weights if weights is not None else getattr(model, "weights_source", "model"),
        transform,
        n_last_blocks,
        avgpool_patch_tokens,
        checkpoint_key,
        seed,
        dtype,
    )
    if weights is None and getattr(model, "weights_source", None) in (None, "random"):
        fp["weights"] = "state:" + state_dict_fingerprint(model.state_dict())
    fp["data"] = data_fingerprint(images.paths, images.root)
    fp["decode"] = decode_name(exact_decode)
    return FeatureSet(feats[kept].contiguous(), labels, list(images.classes), paths, fp)


#: the features formats by the file name's ending
def save_features(
    fs: FeatureSet, path: str | os.PathLike, format: str | None = None, overwrite: bool = False
) -> list[Path]:
    """Write a feature set atomically; returns the files written.

    The format follows ``path`` and ``format`` (:func:`features_output`): ``pt``: one file holding
    features, labels, class names, paths and fingerprint (read back with :func:`load_features`).
    ``npy``: ``features.npy`` and ``paths.txt`` (plus ``labels.npy``, ``classes.txt`` and
    ``fingerprint.json``), for use in other tools. ``csv``: one row per image (``path``, ``label``
    when the folder is labelled, then ``f0`` ... ``f<D-1>``, each float32 written with the digits that
    read back to the same value), for spreadsheets and pandas; a path or label that a spreadsheet
    would run as a formula is written inert (:func:`dinokit.io.inert_cell`). Non-finite features
    are refused before anything is written.
    """

    # a file of NaN features (fp16 overflow, broken weights) would give any later tool a wrong number
    require_finite(fs.features, "The computed features")
    format, target = features_output(path, format)
    if format == "pt":
        check_output_file(target, overwrite)
        torch_save_atomic(fs.to_dict(), target)
        return [target]
    if format == "csv":
        check_output_file(target, overwrite)
        write_features_csv(fs, target)
        return [target]

    folder, feat_path = target.parent, target
    if folder.exists() and not folder.is_dir():
        raise DinokitError(f"{folder} is a file; --format npy writes into a folder.")
    check_output_file(feat_path, overwrite)
    written = [feat_path, folder / "paths.txt"]
    with atomic_open(feat_path, "wb") as f:
        np.save(f, fs.features.numpy())
    atomic_write_text(folder / "paths.txt", "".join(p + "\n" for p in fs.paths))
    if fs.labels is not None:
        with atomic_open(folder / "labels.npy", "wb") as f:
            np.save(f, fs.labels.numpy())
        atomic_write_text(folder / "classes.txt", "".join(c + "\n" for c in fs.classes))
        written += [folder / "labels.npy", folder / "classes.txt"]
    write_json(folder / "fingerprint.json", fs.fingerprint)
    written.append(folder / "fingerprint.json")
    return written


def write_features_csv(fs: FeatureSet, path: str | os.PathLike) -> Path:
    """The features as CSV, one row per image (see :func:`save_features`), written atomically."""
    path = Path(path)
    feats = fs.features.detach().to(torch.float32).cpu().numpy()
    labels = fs.labels
    labelled = labels is not None
    header = ["path", *(["label"] if labelled else []), *(f"f{i}" for i in range(feats.shape[1]))]
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i, row in enumerate(feats):
            label = [inert_cell(fs.classes[int(labels[i])])] if labels is not None else []
            # numpy prints a float32 with the fewest digits that read back to the same float32
            w.writerow([inert_cell(fs.paths[i]), *label, *(str(v) for v in row)])
    return path


def read_features_csv(path: str | os.PathLike) -> tuple[list[str], list[str] | None, torch.Tensor]:
    """The paths, labels (None without a label column) and features of a CSV written by
    :func:`write_features_csv`, with the cells made inert read back as the names they were."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    labelled = len(header) > 1 and header[1] == "label"
    first = 2 if labelled else 1
    paths = [cell_text(r[0]) for r in body]
    labels = [cell_text(r[1]) for r in body] if labelled else None
    feats = torch.tensor([[float(v) for v in r[first:]] for r in body], dtype=torch.float32)
    return paths, labels, feats


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read a feature set written by :func:`save_features` (``.pt``, or an npy folder / ``features.npy``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"The features file {path} does not exist.")
    if path.suffix.lower() == ".csv":
        raise DataError(
            f"{path} is a CSV file, which dinokit writes for spreadsheets and pandas but does not read back (it "
            "keeps no fingerprint of the model); give the .pt file of dinokit features --output FILE.pt."
        )
    if path.is_dir() or path.suffix == ".npy":
        return _load_npy(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is not a readable features file ({str(e).splitlines()[0]}).") from e
    return feature_set_from_dict(obj, path)


def feature_set_from_dict(obj: Any, path: str | os.PathLike) -> FeatureSet:
    """The feature set in a dict read from a ``.pt`` features file (``path`` names it in errors)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("features"), torch.Tensor):
        raise DataError(f"{path} is not a dinokit features file (made with dinokit features).")
    feats = obj["features"].float()
    if feats.ndim != 2:
        raise DataError(f"{path} holds features of shape {tuple(feats.shape)}, not (images, dim).")
    labels = obj.get("labels")
    paths = [str(p) for p in obj.get("paths") or [""] * len(feats)]
    return FeatureSet(
        feats, labels, list(obj.get("classes") or []), paths, dict(obj.get("fingerprint") or {})
    )


def _load_npy(path: Path) -> FeatureSet:

    folder, feat_path = (path.parent, path) if path.suffix == ".npy" else (path, path / "features.npy")
    if not feat_path.is_file():
        raise DataError(f"{folder} holds no features.npy.")
    feats = torch.from_numpy(np.load(feat_path, allow_pickle=False)).float()
    paths = (folder / "paths.txt").read_text().splitlines() if (folder / "paths.txt").is_file() else []
    labels = None
    classes: list[str] = []
    if (folder / "labels.npy").is_file():
        labels = torch.from_numpy(np.load(folder / "labels.npy", allow_pickle=False)).long()
        classes = (folder / "classes.txt").read_text().splitlines()
    fp = (
        json.loads((folder / "fingerprint.json").read_text())
        if (folder / "fingerprint.json").is_file()
        else {}
    )
    return FeatureSet(feats, labels, classes, paths or [""] * len(feats), fp)


def _short(key: str, value: Any) -> str:
    if key == "transform" and isinstance(value, str):
        resize = re.search(r"Resize\(size=(\d+)", value)
        crop = re.search(r"CenterCrop\(size=\((\d+)", value)
        if resize and crop:
            return f"resize {resize.group(1)}/crop {crop.group(1)}"
    return str(value)


def describe_difference(a: dict, b: dict, keys: Sequence[str]) -> str | None:
    """The first fingerprint entry among ``keys`` where ``a`` and ``b`` differ, as text."""
    for k in keys:
        if a.get(k) != b.get(k):
            return f"{k} {_short(k, a.get(k))} vs {_short(k, b.get(k))}"
    return None


def same_fingerprint(a: dict, b: dict) -> bool:
    """Whether two fingerprints describe the same features of the same images (the names the
    weights were given, ``weights_source`` and ``checkpoint_key``, do not matter)."""
    return all(a.get(k) == b.get(k) for k in (*MODEL_KEYS, *OPTION_KEYS, "data", "decode"))


def check_same_model(a: FeatureSet, b: FeatureSet, name_a: str, name_b: str) -> None:
    """Refuse two feature sets that cannot be compared: other weights, other sizes, other options."""
    fa, fb = a.fingerprint, b.fingerprint
    if fa and fb and describe_difference(fa, fb, ("weights",)):
        raise DataError(
            f"{name_a} and {name_b} were made with other weights ({fa.get('weights')} vs {fb.get('weights')}); "
            "compute both with the same weights."
        )
    if a.dim != b.dim:
        why = describe_difference(fa, fb, MODEL_KEYS + OPTION_KEYS) if fa and fb else None
        raise DataError(
            f"The features of {name_a} are {a.dim}-d but those of {name_b} are {b.dim}-d"
            + (f" ({why})" if why else "")
            + "; compute both with the same weights and feature options."
        )
    if fa and fb:
        why = describe_difference(fa, fb, MODEL_KEYS + OPTION_KEYS)
        if why:
            raise DataError(
                f"{name_a} and {name_b} were made with different settings ({why}); compute both the same way."
            )


def check_fingerprint(
    fs: FeatureSet, expected: dict, name: str, keys: Sequence[str] = MODEL_KEYS + OPTION_KEYS
) -> None:
    """Refuse a feature set whose fingerprint does not match the model (and options, among ``keys``)
    asked for now."""
    fp = fs.fingerprint
    if not fp:
        raise DataError(
            f"{name} has no fingerprint, so dinokit cannot tell which weights made it; recompute it."
        )
    if describe_difference(fp, expected, ("weights",)):
        raise DataError(
            f"{name} was made with other weights ({fp.get('weights')}, not {expected.get('weights')}); "
            "recompute it with these weights or pass the matching --weights."
        )
    why = describe_difference(fp, expected, keys)
    if why:
        raise DataError(
            f"{name} was made with different settings ({why}); recompute it or match the options."
        )


def align_labels(
    train: FeatureSet, val: FeatureSet, name_train: str = "train", name_val: str = "val"
) -> torch.Tensor:
    """Val labels as indices into the training classes; a val class the training set lacks is an error."""
    if train.labels is None:
        raise DataError(
            f"The {name_train} features have no labels; embed a labelled folder (ROOT/<class>/<image>)."
        )
    if val.labels is None:
        raise DataError(
            f"The {name_val} features have no labels; embed a labelled folder (ROOT/<class>/<image>)."
        )
    if list(val.classes) == list(train.classes):
        return val.labels
    index = {c: i for i, c in enumerate(train.classes)}
    present = set(val.labels.unique().tolist())
    missing = [c for i, c in enumerate(val.classes) if c not in index and i in present]
    if missing:
        raise DataError(
            f"The {name_val} set has classes the training set lacks: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
            + "."
        )
    remap = torch.tensor([index.get(c, -1) for c in val.classes], dtype=torch.long)
    return remap[val.labels]


@dataclass(kw_only=True)
class FeatureSpec(BackboneOptions, RuntimeOptions):
    """How to embed a folder: weights and model, feature options, transform sizes, runtime."""

    n_last_blocks: int = 1
    avgpool_patch_tokens: bool = False
    resize: int = 256
    crop: int = 224
    threads: int | None = None  #: CPU compute threads (None: the cores other programs leave free)


class Embedder:
    """Loads the backbone once and embeds folders with a cache: a feature file whose fingerprint
    (weights, arch, transform, options, file list) matches is reused, any other is recomputed."""

    def __init__(self, spec: FeatureSpec, model: nn.Module | None = None, **model_kwargs):

        self.spec = spec
        if model is None:
            spec_kwargs = {**spec.model_kwargs, **model_kwargs}
            backbone = prepare_backbone(replace(spec, model_kwargs=spec_kwargs) if model_kwargs else spec)
        else:  # a model the caller loaded (and seeded) already
            device = resolve_device(spec.device)
            dtype = resolve_precision(spec.precision, device, training=False)
            backbone = PreparedBackbone(model.to(device).eval(), device, dtype)
        self.device, self.dtype = backbone.device, backbone.dtype
        model = backbone.model
        depth = getattr(model, "depth", None)
        if depth is not None and spec.n_last_blocks > depth:
            raise DataError(
                f"--n-last-blocks {spec.n_last_blocks} asks for more blocks than the model's {depth}."
            )
        #: the weights' normalisation (with --mean/--std on top, applied where the backbone was prepared)
        self.normalization = getattr(model, "normalization", None) or IMAGENET
        self.transform = eval_transform(spec.resize, spec.crop, self.normalization)
        self.fingerprint = feature_fingerprint(
            model,
            spec.weights,
            self.transform,
            spec.n_last_blocks,
            spec.avgpool_patch_tokens,
            spec.checkpoint_key,
            spec.seed,
            self.dtype,
        )
        self.fingerprint["decode"] = decode_name(spec.exact_decode)
        # bf16: cast one copy here (after the fingerprint, which hashes the fp32 weights), not per call
        self.model, _ = backbone.for_inference()

    def embed(
        self,
        data: str | os.PathLike | ImageList,
        classes: Sequence[str] | None = None,
        cache: str | os.PathLike | None = None,
        progress: Progress = NULL_PROGRESS,
        description: str = "features",
        transform: Any = None,
    ) -> FeatureSet:
        images = data if isinstance(data, ImageList) else scan_images(data, classes=classes)
        expected = dict(self.fingerprint)
        if transform is not None:
            expected["transform"] = describe_transform(transform)
        expected["data"] = data_fingerprint(images.paths, images.root)
        cached_file = CachedTensors(cache, same_fingerprint) if cache is not None else None
        if cache is not None and cached_file is not None and cached_file.exists():
            try:
                stored = cached_file.load(expected)
                cached = feature_set_from_dict(stored, cache) if stored is not None else None
            except DinokitError:
                cached = None
            if cached is not None:
                progress.log(f"reusing cached features {cache}")
                return cached
            progress.log(f"recomputing {cache}: its fingerprint does not match")
        plan = plan_cpu(self.spec.threads, self.spec.num_workers, self.device)
        if plan.chosen_by != "default":
            log.info("%s: %s", self.device, plan.describe())
        with cpu_threads(plan.threads):
            fs = self._compute(images, transform, progress, description, expected, plan.workers)
        if cached_file is not None:
            cached_file.save(fs.to_dict())
        return fs

    def _compute(
        self,
        images: ImageList,
        transform: Any,
        progress: Progress,
        description: str,
        expected: dict,
        workers: int,
    ) -> FeatureSet:
        return compute_features(
            self.model,
            images,
            transform=transform or self.transform,
            n_last_blocks=self.spec.n_last_blocks,
            avgpool_patch_tokens=self.spec.avgpool_patch_tokens,
            batch_size=self.spec.batch_size,
            num_workers=workers,
            device=self.device,
            dtype=self.dtype,
            weights=self.spec.weights,
            checkpoint_key=self.spec.checkpoint_key,
            strict=self.spec.strict,
            exact_decode=self.spec.exact_decode,
            seed=self.spec.seed,
            progress=progress,
            description=description,
            fingerprint=expected,
        )

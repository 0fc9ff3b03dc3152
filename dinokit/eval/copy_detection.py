"""Copy detection with DINO descriptors (Caron et al. 2021, Sec. 4.2.2 and App. C): the Copydays
protocol, and the everyday form of it, finding near-duplicate pairs in a folder.

The descriptor is the last block's output after the final LayerNorm: the CLS token concatenated with
GeM pooling (p = 4) of the patch tokens (1536 dims for ViT-B). Descriptors can be whitened with a
transform learned on a separate image set, then are L2-normalised and compared by cosine
similarity. Copydays scores are the mean of the Holidays trapezoid AP over each query block.

Everything here is a function on tensors or paths; nothing prints (progress and logging only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError, DinokitError
from ..progress import NULL_PROGRESS, Progress

log = logging.getLogger("dinokit")

GEM_P = 4.0
GEM_EPS = 1e-6
WHITENING_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Descriptor
# ---------------------------------------------------------------------------------------------
def gem(tokens: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling over the token axis: (mean_n clamp(x_n, eps)^p)^(1/p).

    ``tokens`` is (B, N, D); returns (B, D). Computed in float32 (x^4 of bf16 activations loses
    too much).
    """
    x = tokens.float().clamp(min=eps)
    return x.pow(p).mean(dim=1).pow(1.0 / p)


def _resnet_feature_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return x.flatten(2).transpose(1, 2)  # (B, h*w, 2048)


def copy_descriptor(model: nn.Module, images: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """The copy-detection descriptor of a batch: CLS ++ GeM_p(patch tokens) of the last block after
    the final norm, (B, 2 * D). A ResNet gives its average pool ++ GeM_p of the last feature map."""
    from ..models.registry import is_vit

    if is_vit(model):
        tokens = model.forward_features(images)
        cls = tokens[:, 0].float()
        return torch.cat((cls, gem(tokens[:, 1:], p)), dim=1)
    fmap = _resnet_feature_map(model, images)
    return torch.cat((fmap.float().mean(dim=1), gem(fmap, p)), dim=1)


def copy_feature_fn(p: float = GEM_P) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A ``feature_fn`` for :func:`dinokit.eval.features.extract_features`."""

    def fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return copy_descriptor(model, images, p)

    return fn


def copy_transform(image_size: int = 320):
    """Resize to a square (aspect ignored; torchvision Resize on the PIL image, bicubic), ImageNet
    normalisation: the reference's Copydays transform."""
    from torchvision import transforms as T

    from ..data.transforms import normalize

    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            normalize(),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------
@dataclass
class Whitening:
    """A learned whitening: ``x -> normalise(P (x - mean))`` with ``P = diag(eig^-1/2) V^T``.

    ``eigenvalues`` are sorted in decreasing order (after clamping) and ``projection`` rows follow
    that order.
    """

    mean: torch.Tensor
    projection: torch.Tensor
    eigenvalues: torch.Tensor
    n_clamped: int = 0

    def apply(self, x: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        y = (x.double() - self.mean.double()) @ self.projection.double().T
        y = y.float()
        return nn.functional.normalize(y, dim=1, p=2) if normalise else y

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "projection": self.projection,
            "eigenvalues": self.eigenvalues,
            "n_clamped": self.n_clamped,
        }


def learn_whitening(features: torch.Tensor, eps: float = WHITENING_EPS, power: float = 0.5) -> Whitening:
    """Learn the reference's whitening from ``features`` (n, D) (paper App. C, "whitening").

    The mean of the whitening set is what gets subtracted later, but — as in the reference — the
    eigen-decomposition is of the UNcentred second-moment matrix F^T F / n. Eigenvalues below
    ``max * eps`` are raised to that floor; the projection is ``diag(eig^-power) V^T`` with the
    eigenvectors in decreasing order of eigenvalue.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise DataError("The whitening set gave no descriptors to learn from.")
    f = features.double()
    n, d = f.shape
    if n < d:
        log.warning(
            "the whitening set has %d images, fewer than the %d descriptor dimensions; "
            "small eigenvalues are clamped",
            n,
            d,
        )
    mean = f.mean(dim=0)
    second_moment = f.T @ f / n
    eig, vecs = torch.linalg.eigh(second_moment)
    floor = eig.max() * eps
    n_clamped = int((eig < floor).sum())
    eig = torch.where(eig < floor, floor, eig)
    order = torch.argsort(eig, descending=True)
    eig, vecs = eig[order], vecs[:, order]
    projection = torch.diag(eig.pow(-power)) @ vecs.T
    return Whitening(mean.float(), projection.float(), eig.float(), n_clamped)


def normalise_descriptors(x: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Whiten (when given) and L2-normalise rows."""
    if whitening is not None:
        return whitening.apply(x)
    return nn.functional.normalize(x.float(), dim=1, p=2)


# ---------------------------------------------------------------------------------------------
# Ranking and average precision
# ---------------------------------------------------------------------------------------------
def holidays_ap(positive_ranks: Sequence[int], n_positives: int) -> float:
    """Average precision as the Holidays / Copydays evaluation computes it: the area under the
    precision-recall curve summed as trapezoids, one per retrieved positive.

    ``positive_ranks`` are the 0-based ranks (in increasing order) at which positives were retrieved
    (only those inside the evaluated list); ``n_positives`` is the number of positives that exist.
    The i-th positive (0-based) found at rank r adds a trapezoid of width 1 / n_positives between
    the precisions i / r (1 when r = 0) and (i + 1) / (r + 1).
    """
    if n_positives <= 0:
        raise ValueError("a query needs at least one positive")
    ap = 0.0
    step = 1.0 / n_positives
    for i, r in enumerate(sorted(int(x) for x in positive_ranks)):
        left = 1.0 if r == 0 else i / r
        right = (i + 1) / (r + 1)
        ap += (left + right) * step / 2.0
    return ap


def rank_database(
    queries: torch.Tensor, database: torch.Tensor, top: int | None = 20, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine ranking (rows are already normalised): for each query the ``top`` database indices by
    decreasing similarity (all of them when ``top`` is None or 0), with their similarities."""
    n_db = database.shape[0]
    k = n_db if not top else min(int(top), n_db)
    ids, sims = [], []
    db = database.float()
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk].float() @ db.T
        v, i = sim.topk(k, dim=1, largest=True, sorted=True)
        ids.append(i)
        sims.append(v)
    if not ids:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    return torch.cat(ids), torch.cat(sims)


def mean_average_precision(ranked: torch.Tensor, positives: Sequence[Sequence[int]]) -> tuple[float, list[float]]:
    """mAP of ranked database ids (Q, k) given each query's positive ids (Holidays trapezoid AP)."""
    aps = []
    for row, pos in zip(ranked.tolist(), positives):
        pos_set = set(pos)
        ranks = [r for r, idx in enumerate(row) if idx in pos_set]
        aps.append(holidays_ap(ranks, len(pos_set)))
    return (float(np.mean(aps)) if aps else float("nan")), aps


# ---------------------------------------------------------------------------------------------
# Copydays layout
# ---------------------------------------------------------------------------------------------
LAYOUT_HINT = "expected original/, strong/, jpegqual/<q>/ and crops/<c>/"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _block_images(folder: Path) -> list[Path]:
    from ..data.images import is_image_file

    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


@dataclass
class CopydaysLayout:
    """The blocks of a Copydays root: ``original`` (the database) and the query blocks, in order
    strong, jpegqual/<q> (increasing q), crops/<c> (increasing c)."""

    root: Path
    originals: list[Path]
    blocks: dict[str, list[Path]]


def scan_copydays(root: str | os.PathLike) -> CopydaysLayout:
    """Read the blocks of a Copydays root from its folders (sizes are not assumed)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"The Copydays folder {root} does not exist.")
    for name in ("original", "strong"):
        if not (root / name).is_dir():
            raise DataError(f"The Copydays folder {root} has no {name}/ block ({LAYOUT_HINT}).")
    originals = _block_images(root / "original")
    if not originals:
        raise DataError(f"The block {root / 'original'} holds no images, so there is nothing to search.")
    blocks: dict[str, list[Path]] = {"original": originals, "strong": _block_images(root / "strong")}
    for group in ("jpegqual", "crops"):
        if not (root / group).is_dir():
            continue
        subs = sorted((d for d in (root / group).iterdir() if d.is_dir() and not d.name.startswith(".")),
                      key=lambda d: _natural_key(d.name))
        for d in subs:
            blocks[f"{group}/{d.name}"] = _block_images(d)
    for name, paths in blocks.items():
        if not paths:
            raise DataError(f"The query block {root / name} holds no images; remove the folder or fill it.")
    return CopydaysLayout(root, originals, blocks)


def copydays_positives(block: str, queries: Sequence[Path], originals: Sequence[Path]) -> list[list[int]]:
    """Each query's positives among ``originals`` (indices): for ``strong`` the originals that share
    the first 4 characters of the file name; for other blocks the original of the same name (the
    same index in the reference, whose blocks are complete)."""
    if block == "strong":
        by_prefix: dict[str, list[int]] = {}
        for j, o in enumerate(originals):
            by_prefix.setdefault(o.name[:4], []).append(j)
        return [by_prefix.get(q.name[:4], []) for q in queries]
    by_name = {o.name: j for j, o in enumerate(originals)}
    by_stem = {o.stem: j for j, o in enumerate(originals)}
    out = []
    for i, q in enumerate(queries):
        if q.name in by_name:
            out.append([by_name[q.name]])
        elif q.stem in by_stem:
            out.append([by_stem[q.stem]])
        elif len(queries) == len(originals):
            out.append([i])
        else:
            raise DataError(
                f"{q} has no original of the same name, and the block {block} is not the size of original/."
            )
    return out


# ---------------------------------------------------------------------------------------------
# Embedding with a cache in the run folder
# ---------------------------------------------------------------------------------------------
@dataclass
class Embedded:
    features: torch.Tensor  # (N, D); zero rows where unreadable
    kept: torch.Tensor  # (N,) bool
    reused: bool = False

    @property
    def n_unreadable(self) -> int:
        return int((~self.kept).sum())


class DescriptorEmbedder:
    """Embeds image lists with one model and transform; caches each list in ``cache_dir`` keyed by a
    fingerprint of the weights, architecture, transform, descriptor, precision and file list."""

    def __init__(
        self,
        model: nn.Module,
        weights: str,
        transform: Any,
        feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        descriptor: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: Path | None = None,
        checkpoint_key: str = "teacher",
        seed: int | None = None,
        progress: Progress = NULL_PROGRESS,
    ):
        from ..data.transforms import describe_transform
        from .features import feature_fingerprint

        self.model = model
        self.transform = transform
        self.feature_fn = feature_fn
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.progress = progress
        fp = feature_fingerprint(model, weights, transform, checkpoint_key=checkpoint_key, seed=seed, dtype=dtype)
        fp.pop("n_last_blocks", None)
        fp.pop("avgpool_patch_tokens", None)
        fp["descriptor"] = descriptor
        fp["transform"] = describe_transform(transform)
        self.fingerprint = fp

    def _key(self, paths: Sequence[Path]) -> str:
        h = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode())
        for p in paths:
            try:
                st = os.stat(p)
                h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{os.path.abspath(p)}\0missing\n".encode())
        return h.hexdigest()[:20]

    def embed(self, paths: Sequence[Path], name: str, description: str | None = None) -> Embedded:
        from ..data.images import ImageDataset
        from ..io import torch_save_atomic
        from ..runtime import dist_env
        from .features import extract_features

        key = self._key(paths)
        cache = None
        if self.cache_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            cache = self.cache_dir / f"{safe}.pt"
            if cache.is_file():
                try:
                    obj = torch.load(cache, map_location="cpu", weights_only=True)
                except Exception:  # a damaged cache is recomputed
                    obj = None
                if isinstance(obj, dict) and obj.get("key") == key:
                    self.progress.log(f"reusing cached descriptors of {name} ({len(paths)} images)")
                    return Embedded(obj["features"].float(), obj["kept"].bool(), reused=True)
        dataset = ImageDataset(list(paths), transform=self.transform, skip_unreadable=True)
        feats, kept = extract_features(
            self.model,
            dataset,
            self.batch_size,
            self.num_workers,
            self.device,
            self.dtype,
            self.feature_fn,
            self.progress,
            description=description or f"embedding {name}",
        )
        if cache is not None and dist_env().is_main:
            torch_save_atomic({"key": key, "features": feats.contiguous(), "kept": kept}, cache)
        return Embedded(feats, kept)


def _runtime(device: str, precision: str):
    from ..runtime import init_distributed, resolve_device, resolve_precision

    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev, training=False)
    init_distributed(dev)
    return dev, dtype


def _load_model(weights: str, arch: str | None, patch_size: int | None, checkpoint_key: str, seed: int):
    from ..checkpoints import load_backbone
    from ..runtime import seed_everything

    seed_everything(seed)
    return load_backbone(weights, arch, patch_size, checkpoint_key)


def _whitening_paths(folder: str | os.PathLike) -> list[Path]:
    from ..data.images import find_images

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"The whitening folder {folder} does not exist.")
    paths = find_images(folder)
    if not paths:
        raise DataError(f"The whitening folder {folder} holds no images.")
    return paths


def _learn_from(emb: Embedded, folder: str | os.PathLike) -> Whitening:
    if not bool(emb.kept.any()):
        raise DataError(f"None of the images in the whitening folder {folder} could be read.")
    return learn_whitening(emb.features[emb.kept])


# ---------------------------------------------------------------------------------------------
# The Copydays protocol
# ---------------------------------------------------------------------------------------------
@dataclass
class CopyDetectionConfig:
    data: Path
    output: Path
    weights: str = "random"
    arch: str | None = None
    patch_size: int | None = None
    checkpoint_key: str = "teacher"
    image_size: int = 320
    distractors: Path | None = None
    whitening: Path | None = None
    top: int = 20
    gem_p: float = GEM_P
    batch_size: int = 32
    num_workers: int = 0
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0


@dataclass
class CopyDetectionResult:
    mAP: dict[str, float]
    queries: dict[str, int]
    database_size: int
    n_distractors: int
    unreadable: dict[str, int]
    whitening: dict[str, Any] | None
    descriptor_dim: int
    skipped_queries: dict[str, int] = field(default_factory=dict)

    @property
    def headline(self) -> float:
        return self.mAP.get("strong", float("nan"))

    def to_metrics(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def copy_detection(cfg: CopyDetectionConfig, progress: Progress = NULL_PROGRESS) -> CopyDetectionResult:
    """Run the Copydays protocol (spec copy-detection; paper Sec. 4.2.2): embed the originals (plus
    distractors) as the database and every block as queries, rank by cosine similarity and report
    the mAP of each block, a fraction in [0, 1]."""
    from ..data.images import find_images

    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    if cfg.top < 0:
        raise DinokitError(f"--top must be 0 (rank everything) or positive, got {cfg.top}.")
    layout = scan_copydays(cfg.data)
    distractors: list[Path] = []
    if cfg.distractors is not None:
        dpath = Path(cfg.distractors).expanduser()
        if not dpath.is_dir():
            raise DataError(f"The distractor folder {dpath} does not exist.")
        distractors = find_images(dpath)
        if not distractors:
            raise DataError(f"The distractor folder {dpath} holds no images.")
    white_paths = _whitening_paths(cfg.whitening) if cfg.whitening is not None else []

    device, dtype = _runtime(cfg.device, cfg.precision)
    model = _load_model(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, cfg.seed)
    transform = copy_transform(cfg.image_size)
    embedder = DescriptorEmbedder(
        model,
        cfg.weights,
        transform,
        copy_feature_fn(cfg.gem_p),
        f"cls+gem(p={cfg.gem_p:g})",
        device,
        dtype,
        cfg.batch_size,
        cfg.num_workers,
        Path(cfg.output) / "cache",
        cfg.checkpoint_key,
        cfg.seed,
        progress,
    )

    unreadable: dict[str, int] = {}
    originals = embedder.embed(layout.originals, "original")
    unreadable["original"] = originals.n_unreadable
    if not bool(originals.kept.any()):
        raise DataError(f"None of the images in {layout.root / 'original'} could be read.")
    distr = embedder.embed(distractors, "distractors") if distractors else None
    if distr is not None:
        unreadable["distractors"] = distr.n_unreadable

    whitening = None
    white_info = None
    if white_paths:
        wemb = embedder.embed(white_paths, "whitening")
        unreadable["whitening"] = wemb.n_unreadable
        whitening = _learn_from(wemb, cfg.whitening)
        white_info = {"images": int(wemb.kept.sum()), "clamped_eigenvalues": whitening.n_clamped}

    # database: the readable originals first (their positions are what positives refer to), then
    # the readable distractors
    orig_ids = torch.nonzero(originals.kept).flatten()
    db_parts = [originals.features[orig_ids]]
    if distr is not None:
        db_parts.append(distr.features[distr.kept])
    database = normalise_descriptors(torch.cat(db_parts), whitening)
    position = {int(o): i for i, o in enumerate(orig_ids.tolist())}

    maps: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    top = cfg.top or None
    for block, paths in layout.blocks.items():
        emb = originals if block == "original" else embedder.embed(paths, block)
        if block != "original":
            unreadable[block] = emb.n_unreadable
        if not bool(emb.kept.any()):
            raise DataError(f"None of the images in the query block {layout.root / block} could be read.")
        positives_all = copydays_positives(block, paths, layout.originals)
        rows, positives = [], []
        n_skip = 0
        for i, pos in enumerate(positives_all):
            if not bool(emb.kept[i]):
                continue
            pos = [position[j] for j in pos if j in position]
            if not pos:
                n_skip += 1
                continue
            rows.append(i)
            positives.append(pos)
        if n_skip:
            log.warning("%s: %d queries have no readable original and are left out", block, n_skip)
            skipped[block] = n_skip
        if not rows:
            raise DataError(f"No query of the block {layout.root / block} has a matching original, so it cannot be scored.")
        q = normalise_descriptors(emb.features[torch.tensor(rows)], whitening)
        ranked, _ = rank_database(q, database, top)
        maps[block], _ = mean_average_precision(ranked, positives)
        counts[block] = len(rows)
    total_unreadable = sum(unreadable.values())
    if total_unreadable:
        log.warning("%d unreadable images were skipped", total_unreadable)
    return CopyDetectionResult(
        mAP=maps,
        queries=counts,
        database_size=int(database.shape[0]),
        n_distractors=int(distr.kept.sum()) if distr is not None else 0,
        unreadable=unreadable,
        whitening=white_info,
        descriptor_dim=int(database.shape[1]),
        skipped_queries=skipped,
    )

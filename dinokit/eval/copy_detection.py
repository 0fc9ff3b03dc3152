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
from .metrics import require_finite

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

    def __post_init__(self) -> None:  # every descriptor set (copy detection, retrieval) passes here
        require_finite(self.features, "The image descriptors")

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
        from ..runtime import inference_model
        from .features import feature_fingerprint

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
        # bf16: cast one copy here (after the fingerprint, which hashes the fp32 weights), not per call
        self.model, _ = inference_model(model.to(device).eval(), dtype)

    def _key(self, paths: Sequence[Path], extra: str = "") -> str:
        h = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode())
        h.update(extra.encode())
        for p in paths:
            try:
                st = os.stat(p)
                h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{os.path.abspath(p)}\0missing\n".encode())
        return h.hexdigest()[:20]

    def embed(
        self,
        paths: Sequence[Path],
        name: str,
        description: str | None = None,
        dataset: torch.utils.data.Dataset | None = None,
        extra_key: str = "",
    ) -> Embedded:
        """Descriptors of ``paths`` (from the cache when its key matches). ``dataset`` replaces the
        default one (the images through the transform); ``extra_key`` names what else it depends on."""
        from ..data.images import ImageDataset
        from ..io import torch_save_atomic
        from ..runtime import dist_env
        from .features import extract_features

        key = self._key(paths, extra_key)
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
        if dataset is None:
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


# ---------------------------------------------------------------------------------------------
# Near-duplicate search in a folder (spec: "practical near-duplicate search")
# ---------------------------------------------------------------------------------------------
#: cosine similarity above which two images are called near-duplicates. For L2-normalised DINO
#: CLS+GeM descriptors (not whitened) resized copies, re-encodings and light crops sit well above it,
#: and distinct photographs below; with --whitening scores spread out and a lower threshold fits
#: (see WHITENED_THRESHOLD and docs/copy-detection.md).
DEFAULT_THRESHOLD = 0.9
WHITENED_THRESHOLD = 0.5
INDEX_FORMAT = 1


class EmbeddingStore:
    """Descriptors of every image a duplicates run has seen, kept on disk in ``folder``.

    ``manifest.json`` names the descriptor (weights, transform, ...) the store was made with; each
    chunk is a pair ``emb-NNNNN.npy`` (float32 rows, read memory-mapped) and ``emb-NNNNN.json`` (for
    each row: path, size and modification time; a row of -1 marks an unreadable file). Chunks are
    only ever added, each written atomically, so a stopped run loses at most the chunk in progress;
    an image whose size or time changed is embedded again and its newer row wins.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any]):
        from ..io import write_json

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.entries: dict[str, tuple[int, int, int, int]] = {}  # path -> (size, mtime_ns, chunk, row)
        self.dim: int | None = None
        self._mmaps: dict[int, np.ndarray] = {}
        manifest = self.folder / "manifest.json"
        current = None
        if manifest.is_file():
            try:
                current = json.loads(manifest.read_text())
            except (OSError, ValueError):
                current = None
        if current is not None and current.get("fingerprint") == self.fingerprint and current.get("format") == INDEX_FORMAT:
            self.dim = current.get("dim")
            self._load_chunks()
        else:
            if current is not None:
                log.warning("the embeddings in %s were made with other settings; embedding again", self.folder)
            for p in self.folder.glob("emb-*"):
                p.unlink()
            write_json(manifest, {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": None})

    def _chunk_ids(self) -> list[int]:
        ids = []
        for p in self.folder.glob("emb-*.json"):
            m = re.fullmatch(r"emb-(\d+)\.json", p.name)
            if m and (self.folder / f"emb-{m.group(1)}.npy").is_file():
                ids.append(int(m.group(1)))
        return sorted(ids)

    def _load_chunks(self) -> None:
        for cid in self._chunk_ids():
            try:
                rows = json.loads((self.folder / f"emb-{cid:05d}.json").read_text())
            except (OSError, ValueError):
                continue
            for path, size, mtime, row in rows:
                self.entries[path] = (int(size), int(mtime), cid if row >= 0 else -1, int(row))

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return os.path.abspath(path)

    @staticmethod
    def _stat(path: str | os.PathLike) -> tuple[int, int]:
        try:
            st = os.stat(path)
            return int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            return -1, -1

    def up_to_date(self, path: str | os.PathLike) -> bool:
        e = self.entries.get(self.key(path))
        return e is not None and e[:2] == self._stat(path)

    def missing(self, paths: Sequence[str | os.PathLike]) -> list[Path]:
        return [Path(p) for p in paths if not self.up_to_date(p)]

    def add(self, paths: Sequence[str | os.PathLike], features: np.ndarray, kept: np.ndarray) -> None:
        """Append one chunk: descriptors of the readable ``paths`` and marks for the unreadable ones."""
        from ..io import atomic_open, write_json

        ids = self._chunk_ids()
        cid = (ids[-1] + 1) if ids else 0
        feats = np.ascontiguousarray(features[kept], dtype=np.float32)
        if self.dim is None and feats.size:
            self.dim = int(feats.shape[1])
            write_json(self.folder / "manifest.json",
                       {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim})
        rows, r = [], 0
        for p, k in zip(paths, kept.tolist()):
            size, mtime = self._stat(p)
            rows.append([self.key(p), size, mtime, r if k else -1])
            r += int(k)
        with atomic_open(self.folder / f"emb-{cid:05d}.npy", "wb") as f:
            np.save(f, feats.reshape(-1, self.dim or 0))
        # the row list is written last: a chunk counts only once both files are there
        write_json(self.folder / f"emb-{cid:05d}.json", rows)
        for path, size, mtime, row in rows:
            self.entries[path] = (size, mtime, cid if row >= 0 else -1, row)

    def _chunk(self, cid: int) -> np.ndarray:
        if cid not in self._mmaps:
            self._mmaps[cid] = np.load(self.folder / f"emb-{cid:05d}.npy", mmap_mode="r")
        return self._mmaps[cid]

    def readable(self, paths: Sequence[str | os.PathLike]) -> list[bool]:
        return [self.entries.get(self.key(p), (0, 0, -1, -1))[2] >= 0 for p in paths]

    def read(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Descriptors of ``paths`` (all readable and up to date), in order, (n, dim) float32."""
        out = np.empty((len(paths), self.dim or 0), dtype=np.float32)
        locs = [self.entries[self.key(p)] for p in paths]
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for i, (_, _, cid, row) in enumerate(locs):
            by_chunk.setdefault(cid, []).append((i, row))
        for cid, items in by_chunk.items():
            dst = np.fromiter((i for i, _ in items), dtype=np.int64, count=len(items))
            src = np.fromiter((r for _, r in items), dtype=np.int64, count=len(items))
            out[dst] = self._chunk(cid)[src]
        return out


class _SharedTaskProgress:
    """Hands one task to every extract_features call, so chunked embedding shows one bar."""

    def __init__(self, progress: Progress, task):
        self._progress = progress
        self._task = task

    def task(self, description: str, total: int | None = None):
        task = self._task

        class _Borrowed:
            def advance(self, n: int = 1, **fields: Any) -> None:
                task.advance(n, **fields)

            def update(self, **fields: Any) -> None:
                task.update(**fields)

            def close(self) -> None:
                pass

        return _Borrowed()

    def log(self, message: str) -> None:
        self._progress.log(message)


@dataclass
class DuplicatesConfig:
    folder: Path
    output: Path
    against: Path | None = None
    threshold: float | None = None
    whitening: Path | None = None
    weights: str = "random"
    arch: str | None = None
    patch_size: int | None = None
    checkpoint_key: str = "teacher"
    image_size: int = 320
    backend: str = "exact"
    neighbours: int = 10
    max_pairs: int = 100_000
    chunk_size: int = 4096
    search_block: int = 4096
    batch_size: int = 32
    num_workers: int = 0
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0


@dataclass
class DuplicatePair:
    image_a: str
    image_b: str
    score: float


@dataclass
class DuplicatesResult:
    pairs: list[DuplicatePair]
    threshold: float
    n_images: int
    n_against: int
    embedded: int
    reused: int
    unreadable: int
    backend: str
    truncated: bool = False
    nearest_neighbour_quantiles: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pairs")
        d["n_pairs"] = len(self.pairs)
        return d


def _list_folder(folder: str | os.PathLike, what: str) -> list[Path]:
    from ..data.images import find_images

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"The {what} {folder} does not exist.")
    paths = find_images(folder)
    if not paths:
        raise DataError(f"The {what} {folder} holds no images.")
    return paths


def embed_into_store(
    store: EmbeddingStore,
    paths: Sequence[Path],
    embedder: DescriptorEmbedder,
    chunk_size: int,
    progress: Progress = NULL_PROGRESS,
) -> int:
    """Embed the ``paths`` the store lacks, ``chunk_size`` images per chunk file; returns how many."""
    from ..data.images import ImageDataset
    from ..runtime import dist_env
    from .features import extract_features

    todo = store.missing(paths)
    if not todo:
        return 0
    task = progress.task("embedding", total=len(todo))
    shared = _SharedTaskProgress(progress, task)
    for s in range(0, len(todo), chunk_size):
        part = todo[s : s + chunk_size]
        dataset = ImageDataset(part, transform=embedder.transform, skip_unreadable=True)
        feats, kept = extract_features(
            embedder.model, dataset, embedder.batch_size, embedder.num_workers, embedder.device,
            embedder.dtype, embedder.feature_fn, shared,
        )
        require_finite(feats, "The image descriptors")
        if dist_env().is_main:  # the main rank owns the files
            store.add(part, feats.numpy(), kept.numpy())
    task.close()
    return len(todo)


def _write_search_matrix(
    store: EmbeddingStore, paths: Sequence[Path], target: Path, whitening: Whitening | None, block: int
) -> np.ndarray:
    """Normalised (whitened) descriptors of ``paths`` in a memory-mapped .npy, written block by block."""
    dim = whitening.projection.shape[0] if whitening is not None else store.dim
    mm = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(len(paths), int(dim or 0)))
    for s in range(0, len(paths), block):
        x = torch.from_numpy(store.read(paths[s : s + block]))
        mm[s : s + block] = normalise_descriptors(x, whitening).numpy()
    mm.flush()
    return np.load(target, mmap_mode="r")


class _PairCollector:
    """Pairs above the threshold, pruned to the ``max_pairs`` best when there are too many."""

    def __init__(self, max_pairs: int):
        self.max_pairs = max_pairs
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.s: list[np.ndarray] = []
        self.count = 0
        self.truncated = False

    def add(self, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> None:
        if len(s) == 0:
            return
        self.a.append(a.astype(np.int64))
        self.b.append(b.astype(np.int64))
        self.s.append(s.astype(np.float32))
        self.count += len(s)
        if self.count > 2 * self.max_pairs:
            self._prune()

    def _prune(self) -> None:
        a, b, s = (np.concatenate(x) for x in (self.a, self.b, self.s))
        if len(s) > self.max_pairs:
            keep = np.argpartition(-s, self.max_pairs - 1)[: self.max_pairs]
            a, b, s = a[keep], b[keep], s[keep]
            self.truncated = True
        self.a, self.b, self.s, self.count = [a], [b], [s], len(s)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.s:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        self._prune()
        a, b, s = self.a[0], self.b[0], self.s[0]
        order = np.lexsort((b, a, -s))
        return a[order], b[order], s[order]


def search_pairs_exact(
    queries: np.ndarray,
    database: np.ndarray | None,
    threshold: float,
    max_pairs: int = 100_000,
    block: int = 4096,
    same: np.ndarray | None = None,
    progress: Progress = NULL_PROGRESS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, np.ndarray]:
    """Every pair with cosine similarity >= ``threshold``, computed block by block (rows normalised).

    With ``database`` None the queries are searched against themselves and each unordered pair is
    reported once (a < b). ``same`` optionally marks, for query i, the database index that is the
    same file (-1 for none), which is never paired. Returns (a, b, scores, truncated, best) where
    ``best`` is each query's highest similarity to another image.
    """
    self_search = database is None
    db = queries if self_search else database
    nq, nd = queries.shape[0], db.shape[0]
    collector = _PairCollector(max_pairs)
    best = np.full(nq, -np.inf, dtype=np.float32)
    best_db = np.full(nd, -np.inf, dtype=np.float32) if self_search else None
    blocks_q = range(0, nq, block)
    task = progress.task("searching", total=len(blocks_q))
    for qs in blocks_q:
        q = torch.from_numpy(np.array(queries[qs : qs + block], dtype=np.float32))
        for ds in range(qs if self_search else 0, nd, block):
            d = torch.from_numpy(np.array(db[ds : ds + block], dtype=np.float32))
            sim = q @ d.T
            if self_search:
                # keep only pairs a < b; a == b is the image itself
                qi = torch.arange(qs, qs + q.shape[0]).unsqueeze(1)
                di = torch.arange(ds, ds + d.shape[0]).unsqueeze(0)
                sim = sim.masked_fill(di <= qi, -float("inf"))
            elif same is not None:
                s = torch.from_numpy(same[qs : qs + q.shape[0]]) - ds
                rows = torch.nonzero((s >= 0) & (s < d.shape[0])).flatten()
                sim[rows, s[rows]] = -float("inf")
            if sim.numel():
                best[qs : qs + q.shape[0]] = np.maximum(best[qs : qs + q.shape[0]], sim.max(dim=1).values.numpy())
                if best_db is not None:
                    best_db[ds : ds + d.shape[0]] = np.maximum(best_db[ds : ds + d.shape[0]], sim.max(dim=0).values.numpy())
            hit = torch.nonzero(sim >= threshold)
            if len(hit):
                collector.add(hit[:, 0].numpy() + qs, hit[:, 1].numpy() + ds, sim[hit[:, 0], hit[:, 1]].numpy())
        task.advance(1)
    task.close()
    if best_db is not None:
        best = np.maximum(best, best_db)
    a, b, s = collector.result()
    return a, b, s, collector.truncated, best


def search_pairs_faiss(
    queries: np.ndarray,
    database: np.ndarray | None,
    threshold: float,
    neighbours: int = 10,
    max_pairs: int = 100_000,
    block: int = 4096,
    same: np.ndarray | None = None,
    progress: Progress = NULL_PROGRESS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, np.ndarray]:
    """Approximate search with a faiss HNSW index (inner product on normalised rows): each query's
    ``neighbours`` nearest database images, kept when their similarity is >= ``threshold``.
    Scales to millions of images; pairs beyond the ``neighbours`` nearest are not seen."""
    try:
        import faiss
    except ImportError as e:
        raise DinokitError("The faiss backend needs the faiss package (pip install faiss-cpu, the faiss extra of dinokit).") from e
    self_search = database is None
    db = queries if self_search else database
    nq, nd = queries.shape[0], db.shape[0]
    dim = db.shape[1]
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    task = progress.task("indexing", total=nd)
    for s in range(0, nd, block):
        part = np.ascontiguousarray(db[s : s + block], dtype=np.float32)
        index.add(part)
        task.advance(len(part))
    task.close()
    k = min(nd, neighbours + (1 if self_search or same is not None else 0))
    index.hnsw.efSearch = max(64, 2 * k)
    collector = _PairCollector(max_pairs)
    best = np.full(nq, -np.inf, dtype=np.float32)
    seen: set[tuple[int, int]] = set()
    task = progress.task("searching", total=nq)
    for qs in range(0, nq, block):
        q = np.ascontiguousarray(queries[qs : qs + block], dtype=np.float32)
        sims, ids = index.search(q, k)
        qi = np.arange(qs, qs + len(q))[:, None].repeat(k, axis=1)
        valid = ids >= 0
        if self_search:
            valid &= ids != qi
        elif same is not None:
            valid &= ids != same[qs : qs + len(q)][:, None]
        masked = np.where(valid, sims, -np.inf)
        best[qs : qs + len(q)] = np.maximum(best[qs : qs + len(q)], masked.max(axis=1))
        hit = valid & (sims >= threshold)
        a, b, s = qi[hit], ids[hit], sims[hit]
        if self_search:
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            keep = []
            for i, pair in enumerate(zip(lo.tolist(), hi.tolist())):
                if pair not in seen:
                    seen.add(pair)
                    keep.append(i)
            a, b, s = lo[keep], hi[keep], s[keep]
        collector.add(a, b, s)
        task.advance(len(q))
    task.close()
    a, b, s = collector.result()
    return a, b, s, collector.truncated, best


def find_duplicates(cfg: DuplicatesConfig, progress: Progress = NULL_PROGRESS) -> DuplicatesResult:
    """Every near-duplicate pair in ``cfg.folder`` (or between it and ``cfg.against``), scored by the
    cosine similarity of the copy-detection descriptor (optionally whitened). Descriptors are kept in
    ``OUT/index`` and reused by later runs; only new or changed images are embedded."""
    if cfg.backend not in ("exact", "faiss"):
        raise DinokitError(f"Unknown backend {cfg.backend!r}; use exact or faiss.")
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    paths_a = _list_folder(cfg.folder, "folder")
    paths_b = _list_folder(cfg.against, "folder given with --against") if cfg.against is not None else None
    white_paths = _whitening_paths(cfg.whitening) if cfg.whitening is not None else []
    threshold = cfg.threshold
    if threshold is None:
        threshold = WHITENED_THRESHOLD if cfg.whitening is not None else DEFAULT_THRESHOLD
    if not -1.0 <= threshold <= 1.0:
        raise DinokitError(f"--threshold is a cosine similarity between -1 and 1, got {threshold}.")

    device, dtype = _runtime(cfg.device, cfg.precision)
    model = _load_model(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, cfg.seed)
    out = Path(cfg.output)
    embedder = DescriptorEmbedder(
        model, cfg.weights, copy_transform(cfg.image_size), copy_feature_fn(), f"cls+gem(p={GEM_P:g})",
        device, dtype, cfg.batch_size, cfg.num_workers, out / "cache", cfg.checkpoint_key, cfg.seed, progress,
    )
    store = EmbeddingStore(out / "index", embedder.fingerprint)
    everything = list(dict.fromkeys([*paths_a, *(paths_b or [])]))
    n_new = embed_into_store(store, everything, embedder, cfg.chunk_size, progress)
    reused = len(everything) - n_new
    from ..runtime import barrier, dist_env

    barrier()
    if not dist_env().is_main:
        # under torchrun every rank embedded a shard; the search itself runs on the main rank
        return DuplicatesResult([], float(threshold), 0, 0, n_new, reused, 0, cfg.backend)
    if reused:
        progress.log(f"reused the stored descriptors of {reused} images")

    whitening = None
    if white_paths:
        whitening = _learn_from(embedder.embed(white_paths, "whitening"), cfg.whitening)

    ok_a = [p for p, r in zip(paths_a, store.readable(paths_a)) if r]
    ok_b = [p for p, r in zip(paths_b, store.readable(paths_b)) if r] if paths_b is not None else None
    unreadable = len(everything) - len({*ok_a, *(ok_b or [])})
    if unreadable:
        log.warning("%d unreadable images were skipped", unreadable)
    if not ok_a:
        raise DataError(f"None of the images in {cfg.folder} could be read.")
    if ok_b is not None and not ok_b:
        raise DataError(f"None of the images in {cfg.against} could be read.")

    qa = _write_search_matrix(store, ok_a, out / "index" / "search-a.npy", whitening, cfg.search_block)
    qb = None
    same = None
    if ok_b is not None:
        qb = _write_search_matrix(store, ok_b, out / "index" / "search-b.npy", whitening, cfg.search_block)
        pos_b = {p: j for j, p in enumerate(ok_b)}
        same = np.array([pos_b.get(p, -1) for p in ok_a], dtype=np.int64)
    if cfg.backend == "exact":
        a, b, s, truncated, best = search_pairs_exact(qa, qb, threshold, cfg.max_pairs, cfg.search_block, same, progress)
    else:
        a, b, s, truncated, best = search_pairs_faiss(
            qa, qb, threshold, cfg.neighbours, cfg.max_pairs, cfg.search_block, same, progress
        )
    if truncated:
        log.warning("more than %d pairs pass the threshold; only the %d best are kept", cfg.max_pairs, cfg.max_pairs)
    names_b = ok_b if ok_b is not None else ok_a
    pairs = [DuplicatePair(str(ok_a[i]), str(names_b[j]), float(v)) for i, j, v in zip(a.tolist(), b.tolist(), s.tolist())]
    finite = best[np.isfinite(best)]
    quantiles = {}
    if len(finite):
        quantiles = {f"p{q}": float(np.percentile(finite, q)) for q in (1, 10, 50, 90, 99)}
    return DuplicatesResult(
        pairs=pairs,
        threshold=float(threshold),
        n_images=len(ok_a),
        n_against=len(ok_b) if ok_b is not None else 0,
        embedded=n_new,
        reused=reused,
        unreadable=unreadable,
        backend=cfg.backend,
        truncated=truncated,
        nearest_neighbour_quantiles=quantiles,
    )


def write_pairs(result: DuplicatesResult, output: str | os.PathLike) -> list[Path]:
    """``pairs.csv`` (score, image_a, image_b) and ``pairs.json``, atomically."""
    import csv
    import io

    from ..io import atomic_write_text, write_json

    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["score", "image_a", "image_b"])
    for p in result.pairs:
        w.writerow([f"{p.score:.6f}", p.image_a, p.image_b])
    atomic_write_text(output / "pairs.csv", buf.getvalue())
    write_json(output / "pairs.json", {**result.summary(), "pairs": [asdict(p) for p in result.pairs]})
    return [output / "pairs.csv", output / "pairs.json"]


def contact_sheet(pairs: Sequence[DuplicatePair], path: str | os.PathLike, max_pairs: int = 24,
                  thumb: int = 160) -> Path | None:
    """A PNG of the best ``max_pairs`` pairs, one row each: the two images side by side and the score."""
    from PIL import Image, ImageDraw

    from ..data.images import open_rgb
    from ..io import atomic_open

    pairs = list(pairs)[:max_pairs]
    if not pairs:
        return None
    pad, text_w = 8, 300
    row_h = thumb + pad
    sheet = Image.new("RGB", (2 * thumb + text_w + 4 * pad, pad + row_h * len(pairs)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def tile(p: str) -> Image.Image:
        try:
            im = open_rgb(p)
        except DinokitError:
            return Image.new("RGB", (thumb, thumb), (200, 200, 200))
        im.thumbnail((thumb, thumb))
        return im

    for r, pair in enumerate(pairs):
        y = pad + r * row_h
        for c, name in enumerate((pair.image_a, pair.image_b)):
            im = tile(name)
            x = pad + c * (thumb + pad)
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        tx = 2 * (thumb + pad) + 2 * pad
        draw.text((tx, y + 4), f"{r + 1}.  similarity {pair.score:.3f}", fill=(0, 0, 0))
        for k, name in enumerate((pair.image_a, pair.image_b)):
            parts = Path(name).parts
            label = "/".join(parts[-2:])  # the folder tells apart copies that share a file name
            label = label if len(label) <= 44 else "..." + label[-41:]
            draw.text((tx, y + 24 + 16 * k), label, fill=(60, 60, 60))
    path = Path(path)
    with atomic_open(path, "wb") as f:
        sheet.save(f, format="PNG")
    return path

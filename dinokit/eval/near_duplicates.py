"""Near-duplicate search in a folder (spec copy-detection, "practical near-duplicate search"): the
everyday form of copy detection (Caron et al. 2021, Sec. 4.2.1). Every pair of images whose
copy-detection descriptors (CLS + GeM, optionally whitened; :mod:`dinokit.eval.descriptors`) have a
cosine similarity above a threshold, found exactly block by block or approximately with faiss.
Descriptors are kept in an :class:`EmbeddingStore` in the run folder and reused by later runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import BackboneOptions, prepare_backbone
from ..data.images import ImageDataset, expand_image_inputs
from ..errors import DataError, DinokitError
from ..io import atomic_open, atomic_write_text, inert_cell, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, barrier, dist_env, init_distributed
from .cache import as_json, file_stamp
from .descriptors import (
    GEM_P,
    DescriptorEmbedder,
    Whitening,
    copy_feature_fn,
    copy_transform,
    find_folder_images,
    normalise_descriptors,
    whitening_from,
)
from .features import extract_features
from .metrics import require_finite

log = logging.getLogger("dinokit")

#: cosine similarity above which two images are called near-duplicates. For L2-normalised DINO
#: CLS+GeM descriptors (not whitened) resized copies, re-encodings and light crops sit well above it,
#: and distinct photographs below; with --whitening scores spread out and a lower threshold fits
#: (see WHITENED_THRESHOLD and docs/copy-detection.md).
DEFAULT_THRESHOLD = 0.9
#: the scale of each score in metrics.json: cosine similarities (-1 to 1)
UNITS = {"threshold": "cosine similarity", "nearest_neighbour_quantiles": "cosine similarity"}
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
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = as_json(fingerprint)
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

    def up_to_date(self, path: str | os.PathLike) -> bool:
        e = self.entries.get(self.key(path))
        return e is not None and e[:2] == file_stamp(path)

    def missing(self, paths: Sequence[str | os.PathLike]) -> list[Path]:
        return [Path(p) for p in paths if not self.up_to_date(p)]

    def add(self, paths: Sequence[str | os.PathLike], features: np.ndarray, kept: np.ndarray) -> None:
        """Append one chunk: descriptors of the readable ``paths`` and marks for the unreadable ones."""
        ids = self._chunk_ids()
        cid = (ids[-1] + 1) if ids else 0
        feats = np.ascontiguousarray(features[kept], dtype=np.float32)
        if self.dim is None and feats.size:
            self.dim = int(feats.shape[1])
            write_json(self.folder / "manifest.json",
                       {"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim})
        rows, r = [], 0
        for p, k in zip(paths, kept.tolist()):
            size, mtime = file_stamp(p)
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
class DuplicatesConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit duplicates`` needs: the folder(s), the threshold and the search backend."""

    folder: Path
    output: Path
    against: Path | None = None
    threshold: float | None = None
    whitening: Path | None = None
    image_size: int = 320
    backend: str = "exact"
    neighbours: int = 10
    max_pairs: int = 100_000
    chunk_size: int = 4096
    search_block: int = 4096
    _: KW_ONLY  # the option defaults this command changes
    batch_size: int = 32


@dataclass
class DuplicatePair:
    image_a: str
    image_b: str
    score: float


@dataclass
class DuplicateCluster:
    """Images joined by near-duplicate pairs (a connected component of the pairs' graph): an image and
    its three copies are one cluster of four, whichever of the six pairs pass the threshold."""

    images: list[str]  #: sorted by name
    pairs: int  #: pairs inside the cluster that passed the threshold
    max_score: float  #: the most similar pair
    min_score: float  #: the weakest pair that joins it (a chain of pairs may join dissimilar ends)


def duplicate_clusters(pairs: Sequence[DuplicatePair]) -> list[DuplicateCluster]:
    """The connected components of the graph whose edges are ``pairs`` (union-find), largest first
    (ties by best score, then by first image name); images without a pair are in no cluster."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = root(p.image_a), root(p.image_b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for x in parent:
        members.setdefault(root(x), []).append(x)
    scores: dict[str, list[float]] = {}
    for p in pairs:
        scores.setdefault(root(p.image_a), []).append(p.score)
    clusters = [
        DuplicateCluster(sorted(m), len(scores[r]), float(max(scores[r])), float(min(scores[r])))
        for r, m in members.items()
    ]
    clusters.sort(key=lambda c: (-len(c.images), -c.max_score, c.images[0]))
    return clusters


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
    clusters: list[DuplicateCluster] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pairs")
        d.pop("clusters")
        d["n_pairs"] = len(self.pairs)
        d["n_clusters"] = len(self.clusters)
        d["images_in_clusters"] = sum(len(c.images) for c in self.clusters)
        return d


def embed_into_store(
    store: EmbeddingStore,
    paths: Sequence[Path],
    embedder: DescriptorEmbedder,
    chunk_size: int,
    progress: Progress = NULL_PROGRESS,
) -> int:
    """Embed the ``paths`` the store lacks, ``chunk_size`` images per chunk file; returns how many."""
    todo = store.missing(paths)
    if not todo:
        return 0
    task = progress.task("embedding", total=len(todo))
    shared = _SharedTaskProgress(progress, task)
    for s in range(0, len(todo), chunk_size):
        part = todo[s : s + chunk_size]
        dataset = ImageDataset(part, transform=embedder.transform, skip_unreadable=not embedder.strict,
                               exact_decode=embedder.exact_decode)
        feats, kept = extract_features(
            embedder.model, dataset, embedder.batch_size, embedder.num_workers, embedder.device,
            embedder.dtype, embedder.feature_fn, shared,
        )
        if dist_env().is_main:  # the main rank owns the files
            require_finite(feats, "The image descriptors")
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
    paths_a = find_folder_images(cfg.folder, "folder", allow_file=True)
    paths_b = find_folder_images(cfg.against, "folder given with --against", allow_file=True) if cfg.against is not None else None
    white_paths = find_folder_images(cfg.whitening, "whitening folder") if cfg.whitening is not None else []
    threshold = cfg.threshold
    if threshold is None:
        threshold = WHITENED_THRESHOLD if cfg.whitening is not None else DEFAULT_THRESHOLD
    if not -1.0 <= threshold <= 1.0:
        raise DinokitError(f"--min-similarity is a cosine similarity between -1 and 1, got {threshold}.")

    backbone = prepare_backbone(cfg)
    init_distributed(backbone.device)
    out = Path(cfg.output)
    embedder = DescriptorEmbedder(
        backbone.model, cfg.weights, copy_transform(cfg.image_size), copy_feature_fn(), f"cls+gem(p={GEM_P:g})",
        backbone.device, backbone.dtype, cfg.batch_size, cfg.num_workers, out / "cache", cfg.checkpoint_key, cfg.seed, progress,
        strict=cfg.strict, exact_decode=cfg.exact_decode,
    )
    store = EmbeddingStore(out / "index", embedder.fingerprint)
    everything = list(dict.fromkeys([*paths_a, *(paths_b or [])]))
    n_new = embed_into_store(store, everything, embedder, cfg.chunk_size, progress)
    reused = len(everything) - n_new
    barrier()
    if not dist_env().is_main:
        # under torchrun every rank embedded a shard; the search itself runs on the main rank
        return DuplicatesResult([], float(threshold), 0, 0, n_new, reused, 0, cfg.backend)
    if reused:
        progress.log(f"reused the stored descriptors of {reused} images")

    whitening = None
    if white_paths:
        whitening = whitening_from(embedder.embed(white_paths, "whitening"), cfg.whitening)

    ok_a = [p for p, r in zip(paths_a, store.readable(paths_a)) if r]
    ok_b = [p for p, r in zip(paths_b, store.readable(paths_b)) if r] if paths_b is not None else None
    unreadable = len(everything) - len({*ok_a, *(ok_b or [])})
    if unreadable:
        log.warning("%d unreadable %s skipped", unreadable, "image was" if unreadable == 1 else "images were")
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
        clusters=duplicate_clusters(pairs),
    )


def write_pairs(result: DuplicatesResult, output: str | os.PathLike) -> list[Path]:
    """``pairs.csv`` (score, image_a, image_b) and ``pairs.json``, atomically."""
    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["score", "image_a", "image_b"])
    for p in result.pairs:
        w.writerow([f"{p.score:.6f}", inert_cell(p.image_a), inert_cell(p.image_b)])
    atomic_write_text(output / "pairs.csv", buf.getvalue())
    write_json(output / "pairs.json", {**result.summary(), "pairs": [asdict(p) for p in result.pairs]})
    return [output / "pairs.csv", output / "pairs.json"]


def write_clusters(result: DuplicatesResult, output: str | os.PathLike) -> list[Path]:
    """``clusters.csv`` (one row per image: cluster, size, image) and ``clusters.json``, atomically."""
    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["cluster", "size", "image"])
    for i, c in enumerate(result.clusters, 1):
        for image in c.images:
            w.writerow([i, len(c.images), inert_cell(image)])
    atomic_write_text(output / "clusters.csv", buf.getvalue())
    clusters = [{"cluster": i, "size": len(c.images), **asdict(c)} for i, c in enumerate(result.clusters, 1)]
    write_json(output / "clusters.json", {"threshold": result.threshold, "n_clusters": len(clusters),
                                          "truncated": result.truncated, "clusters": clusters})
    return [output / "clusters.csv", output / "clusters.json"]


# ---------------------------------------------------------------------------------------------
# Similar images: a folder ranked by similarity to query images
# ---------------------------------------------------------------------------------------------
@dataclass
class SimilarConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit similar`` needs: the query images, the folder to rank and how many to keep."""

    queries: list[str]
    against: Path
    output: Path
    k: int = 5
    whitening: Path | None = None
    image_size: int = 320
    chunk_size: int = 4096
    search_block: int = 4096
    _: KW_ONLY  # the option defaults this command changes
    batch_size: int = 32


@dataclass
class SimilarMatch:
    rank: int
    image: str
    score: float


@dataclass
class SimilarQuery:
    query: str
    matches: list[SimilarMatch]


@dataclass
class SimilarResult:
    queries: list[SimilarQuery]
    k: int
    n_queries: int
    n_against: int
    embedded: int
    reused: int
    unreadable: int

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("queries")
        return d


def top_k_similar(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    block: int = 4096,
    same: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` most similar database rows by inner product (cosine on normalised rows),
    most similar first, ties by database order; ``same`` marks per query a database row that is the
    query's own file (-1 for none), never returned. Returns (scores, indices), (nq, k'), with
    k' = min(k, database size) and -inf / -1 where fewer rows are left."""
    nq, nd = queries.shape[0], database.shape[0]
    k = min(k, nd)
    best_s = torch.full((nq, k), -float("inf"))
    best_i = torch.full((nq, k), -1, dtype=torch.int64)
    for qs in range(0, nq, block):
        q = torch.from_numpy(np.array(queries[qs : qs + block], dtype=np.float32))
        run_s, run_i = best_s[qs : qs + len(q)], best_i[qs : qs + len(q)]
        for ds in range(0, nd, block):
            d = torch.from_numpy(np.array(database[ds : ds + block], dtype=np.float32))
            sim = (q @ d.T).double()
            if same is not None:
                s = torch.from_numpy(same[qs : qs + len(q)]) - ds
                rows = torch.nonzero((s >= 0) & (s < d.shape[0])).flatten()
                sim[rows, s[rows]] = -float("inf")
            idx = torch.arange(ds, ds + d.shape[0]).expand(len(q), -1)
            cand_s = torch.cat([run_s.double(), sim], dim=1)
            cand_i = torch.cat([run_i, idx], dim=1)
            # stable sort on the score: equal scores keep database order (earlier blocks come first)
            order = torch.sort(-cand_s, dim=1, stable=True).indices[:, :k]
            run_s = torch.gather(cand_s, 1, order).float()
            run_i = torch.gather(cand_i, 1, order)
        best_s[qs : qs + len(q)], best_i[qs : qs + len(q)] = run_s, run_i
    best_i[~torch.isfinite(best_s)] = -1
    return best_s.numpy(), best_i.numpy()


def find_similar(cfg: SimilarConfig, progress: Progress = NULL_PROGRESS) -> SimilarResult:
    """The ``cfg.k`` images of ``cfg.against`` most similar to each query image (the copy-detection
    descriptor ``duplicates`` uses, cosine similarity, optionally whitened); a query's own file is
    never its own match. Descriptors are kept in ``OUT/index`` and reused by later runs."""
    if cfg.k < 1:
        raise DinokitError(f"--k must be at least 1, got {cfg.k}.")
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    if not cfg.queries:
        raise DinokitError("Give at least one query image (a file, folder or glob pattern).")
    paths_q = expand_image_inputs(cfg.queries)
    paths_d = find_folder_images(cfg.against, "folder given with --against", allow_file=True)
    white_paths = find_folder_images(cfg.whitening, "whitening folder") if cfg.whitening is not None else []

    backbone = prepare_backbone(cfg)
    init_distributed(backbone.device)
    out = Path(cfg.output)
    embedder = DescriptorEmbedder(
        backbone.model, cfg.weights, copy_transform(cfg.image_size), copy_feature_fn(), f"cls+gem(p={GEM_P:g})",
        backbone.device, backbone.dtype, cfg.batch_size, cfg.num_workers, out / "cache", cfg.checkpoint_key,
        cfg.seed, progress, strict=cfg.strict, exact_decode=cfg.exact_decode,
    )
    store = EmbeddingStore(out / "index", embedder.fingerprint)
    everything = list(dict.fromkeys([*paths_q, *paths_d]))
    n_new = embed_into_store(store, everything, embedder, cfg.chunk_size, progress)
    reused = len(everything) - n_new
    barrier()
    if not dist_env().is_main:
        return SimilarResult([], cfg.k, 0, 0, n_new, reused, 0)
    whitening = None
    if white_paths:
        whitening = whitening_from(embedder.embed(white_paths, "whitening"), cfg.whitening)

    ok_q = [p for p, r in zip(paths_q, store.readable(paths_q)) if r]
    ok_d = [p for p, r in zip(paths_d, store.readable(paths_d)) if r]
    unreadable = len(everything) - len({*ok_q, *ok_d})
    if unreadable:
        log.warning("%d unreadable images were skipped", unreadable)
    if not ok_q:
        raise DataError("None of the query images could be read.")
    if not ok_d:
        raise DataError(f"None of the images in {cfg.against} could be read.")
    qm = _write_search_matrix(store, ok_q, out / "index" / "search-queries.npy", whitening, cfg.search_block)
    dm = _write_search_matrix(store, ok_d, out / "index" / "search-against.npy", whitening, cfg.search_block)
    key_d = {EmbeddingStore.key(p): j for j, p in enumerate(ok_d)}
    same = np.array([key_d.get(EmbeddingStore.key(p), -1) for p in ok_q], dtype=np.int64)
    scores, indices = top_k_similar(qm, dm, cfg.k, cfg.search_block, same)
    queries = []
    for qi, p in enumerate(ok_q):
        matches = [
            SimilarMatch(r + 1, str(ok_d[j]), float(v))
            for r, (j, v) in enumerate(zip(indices[qi].tolist(), scores[qi].tolist()))
            if j >= 0
        ]
        queries.append(SimilarQuery(str(p), matches))
    return SimilarResult(queries, cfg.k, len(ok_q), len(ok_d), n_new, reused, unreadable)


def write_similar(result: SimilarResult, output: str | os.PathLike) -> list[Path]:
    """``similar.csv`` (query, rank, image, score; one row per match) and ``similar.json``, atomically."""
    output = Path(output)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "rank", "image", "score"])
    for q in result.queries:
        for m in q.matches:
            w.writerow([inert_cell(q.query), m.rank, inert_cell(m.image), f"{m.score:.6f}"])
    atomic_write_text(output / "similar.csv", buf.getvalue())
    write_json(output / "similar.json", {**result.summary(), "queries": [asdict(q) for q in result.queries]})
    return [output / "similar.csv", output / "similar.json"]

"""Near-duplicate search in a folder (spec copy-detection, "practical near-duplicate search"): the
everyday form of copy detection (Caron et al. 2021, Sec. 4.2.1). Every pair of images whose
copy-detection descriptors (CLS + GeM, optionally whitened; :mod:`dinokit.eval.descriptors`) have a
cosine similarity above a threshold, found exactly block by block or approximately with faiss, and
the clusters those pairs join. Descriptors are kept in an :class:`~dinokit.eval.store.EmbeddingStore`
in the run folder and reused by later runs.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import BackboneOptions
from ..errors import DataError, DinokitError
from ..io import atomic_write_text, inert_cell, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, dist_env
from .descriptors import find_folder_images, whitening_from
from .store import embed_for_search, meaning_warnings, pair_fraction_above, write_search_matrix

log = logging.getLogger("dinokit")

#: cosine similarity above which two images are called near-duplicates. For L2-normalised DINO
#: CLS+GeM descriptors (not whitened) resized copies, re-encodings and light crops sit well above it,
#: and distinct photographs below; with --whitening scores spread out and a lower threshold fits
#: (see WHITENED_THRESHOLD and docs/copy-detection.md).
DEFAULT_THRESHOLD = 0.9
#: the scale of each score in metrics.json: cosine similarities (-1 to 1)
UNITS = {"threshold": "cosine similarity", "nearest_neighbour_quantiles": "cosine similarity"}
WHITENED_THRESHOLD = 0.5


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
    cache_dir: Path | None = None  #: where descriptor stores live (None: store.default_store_root())
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
    #: the share of all image pairs at or above the threshold (measured on a sample of at most 2000 images)
    pairs_above_threshold_fraction: float = 0.0
    random_weights: bool = False
    #: why the pairs and clusters cannot mean much (untrained weights, nearly every pair above the threshold)
    warnings: list[str] = field(default_factory=list)
    #: the input normalisation the descriptors were made with (metrics.json keeps it in its config)
    normalization: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pairs")
        d.pop("clusters")
        d.pop("normalization")
        d["n_pairs"] = len(self.pairs)
        d["n_clusters"] = len(self.clusters)
        d["images_in_clusters"] = sum(len(c.images) for c in self.clusters)
        return d


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
    db = database if database is not None else queries
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
                best[qs : qs + q.shape[0]] = np.maximum(
                    best[qs : qs + q.shape[0]], sim.max(dim=1).values.numpy()
                )
                if best_db is not None:
                    best_db[ds : ds + d.shape[0]] = np.maximum(
                        best_db[ds : ds + d.shape[0]], sim.max(dim=0).values.numpy()
                    )
            hit = torch.nonzero(sim >= threshold)
            if len(hit):
                collector.add(
                    hit[:, 0].numpy() + qs, hit[:, 1].numpy() + ds, sim[hit[:, 0], hit[:, 1]].numpy()
                )
        task.advance(1)
    task.close()
    if best_db is not None:
        best = np.maximum(best, best_db)
    a, b, scores = collector.result()
    return a, b, scores, collector.truncated, best


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
        raise DinokitError(
            "The faiss backend needs the faiss package (pip install faiss-cpu, the faiss extra of dinokit)."
        ) from e
    self_search = database is None
    db = database if database is not None else queries
    nq, nd = queries.shape[0], db.shape[0]
    dim = db.shape[1]
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    task = progress.task("indexing", total=nd)
    for start in range(0, nd, block):
        part = np.ascontiguousarray(db[start : start + block], dtype=np.float32)
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
    the store of their settings under ``cfg.cache_dir`` (:func:`~dinokit.eval.store.store_for`), which
    ``similar`` shares: only images that no run has embedded with these settings, or that changed,
    are embedded. ``warnings`` says when the result cannot mean much."""
    if cfg.backend not in ("exact", "faiss"):
        raise DinokitError(f"Unknown backend {cfg.backend!r}; use exact or faiss.")
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    paths_a = find_folder_images(cfg.folder, "folder", allow_file=True)
    paths_b = (
        find_folder_images(cfg.against, "folder given with --against", allow_file=True)
        if cfg.against is not None
        else None
    )
    white_paths = find_folder_images(cfg.whitening, "whitening folder") if cfg.whitening is not None else []
    threshold = cfg.threshold
    if threshold is None:
        threshold = WHITENED_THRESHOLD if cfg.whitening is not None else DEFAULT_THRESHOLD
    if not -1.0 <= threshold <= 1.0:
        raise DinokitError(f"--min-similarity is a cosine similarity between -1 and 1, got {threshold}.")

    out = Path(cfg.output)
    stored = embed_for_search(cfg, [*paths_a, *(paths_b or [])], progress)
    store, embedder, n_new, reused = stored.store, stored.embedder, stored.embedded, stored.reused
    everything = list(dict.fromkeys([*paths_a, *(paths_b or [])]))
    if not dist_env().is_main:
        # under torchrun every rank embedded a shard; the search itself runs on the main rank
        return DuplicatesResult([], float(threshold), 0, 0, n_new, reused, 0, cfg.backend)

    whitening = None
    if white_paths and cfg.whitening is not None:  # the images of the folder
        whitening = whitening_from(embedder.embed(white_paths, "whitening"), cfg.whitening)
    (out / "index").mkdir(parents=True, exist_ok=True)  # this run's search matrices

    ok_a = [p for p, r in zip(paths_a, store.readable(paths_a)) if r]
    ok_b = [p for p, r in zip(paths_b, store.readable(paths_b)) if r] if paths_b is not None else None
    unreadable = len(everything) - len({*ok_a, *(ok_b or [])})
    if unreadable:
        log.warning("%d unreadable %s skipped", unreadable, "image was" if unreadable == 1 else "images were")
    if not ok_a:
        raise DataError(f"None of the images in {cfg.folder} could be read.")
    if ok_b is not None and not ok_b:
        raise DataError(f"None of the images in {cfg.against} could be read.")

    qa = write_search_matrix(store, ok_a, out / "index" / "search-a.npy", whitening, cfg.search_block)
    qb = None
    same = None
    if ok_b is not None:
        qb = write_search_matrix(store, ok_b, out / "index" / "search-b.npy", whitening, cfg.search_block)
        pos_b = {p: j for j, p in enumerate(ok_b)}
        same = np.array([pos_b.get(p, -1) for p in ok_a], dtype=np.int64)
    if cfg.backend == "exact":
        a, b, s, truncated, best = search_pairs_exact(
            qa, qb, threshold, cfg.max_pairs, cfg.search_block, same, progress
        )
    else:
        a, b, s, truncated, best = search_pairs_faiss(
            qa, qb, threshold, cfg.neighbours, cfg.max_pairs, cfg.search_block, same, progress
        )
    if truncated:
        log.warning(
            "more than %d pairs pass the threshold; only the %d best are kept", cfg.max_pairs, cfg.max_pairs
        )
    names_b = ok_b if ok_b is not None else ok_a
    pairs = [
        DuplicatePair(str(ok_a[i]), str(names_b[j]), float(v))
        for i, j, v in zip(a.tolist(), b.tolist(), s.tolist())
    ]
    finite = best[np.isfinite(best)]
    quantiles = {}
    if len(finite):
        quantiles = {f"p{q}": float(np.percentile(finite, q)) for q in (1, 10, 50, 90, 99)}
    fraction = pair_fraction_above(qa, qb, threshold, same, seed=cfg.seed)
    warnings = meaning_warnings(cfg.weights, fraction, threshold, "these pairs and clusters")
    for w in warnings:
        log.warning(w)
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
        pairs_above_threshold_fraction=fraction,
        random_weights=str(cfg.weights) == "random",
        warnings=warnings,
        normalization=embedder.fingerprint["normalization"],
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
    write_json(
        output / "clusters.json",
        {
            "threshold": result.threshold,
            "n_clusters": len(clusters),
            "truncated": result.truncated,
            "clusters": clusters,
        },
    )
    return [output / "clusters.csv", output / "clusters.json"]

"""Similar images: a folder ranked by similarity to query images, with the copy-detection descriptor
``duplicates`` uses (cosine similarity, optionally whitened); descriptors kept in the
:class:`~dinokit.eval.store.EmbeddingStore` ``duplicates`` shares and reused by later runs."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import BackboneOptions
from ..data.images import expand_image_inputs
from ..errors import DataError, DinokitError
from ..io import atomic_write_text, inert_cell, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, dist_env
from .descriptors import find_folder_images, whitening_from
from .duplicates import DEFAULT_THRESHOLD, WHITENED_THRESHOLD
from .store import (
    EmbeddingStore,
    embed_for_search,
    meaning_warnings,
    pair_fraction_above,
    write_search_matrix,
)

log = logging.getLogger("dinokit")


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
    cache_dir: Path | None = None  #: where descriptor stores live (None: store.default_store_root())
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
    #: the share of (query, image) pairs at or above ``similarity_threshold`` (duplicates' default threshold)
    pairs_above_threshold_fraction: float = 0.0
    similarity_threshold: float = DEFAULT_THRESHOLD
    random_weights: bool = False
    #: why the ranking cannot mean much (untrained weights, nearly every pair above the threshold)
    warnings: list[str] = field(default_factory=list)
    #: the input normalisation the descriptors were made with (metrics.json keeps it in its config)
    normalization: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("queries")
        d.pop("normalization")
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
    never its own match. Descriptors are kept in the store ``duplicates`` shares
    (:func:`~dinokit.eval.store.embed_for_search`) and reused by later runs; ``warnings`` says when the
    ranking cannot mean much."""
    if cfg.k < 1:
        raise DinokitError(f"--k must be at least 1, got {cfg.k}.")
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    if not cfg.queries:
        raise DinokitError("Give at least one query image (a file, folder or glob pattern).")
    paths_q = expand_image_inputs(cfg.queries)
    paths_d = find_folder_images(cfg.against, "folder given with --against", allow_file=True)
    white_paths = find_folder_images(cfg.whitening, "whitening folder") if cfg.whitening is not None else []

    stored = embed_for_search(cfg, [*paths_q, *paths_d], progress)
    store, embedder, n_new, reused = stored.store, stored.embedder, stored.embedded, stored.reused
    everything = list(dict.fromkeys([*paths_q, *paths_d]))
    if not dist_env().is_main:
        return SimilarResult([], cfg.k, 0, 0, n_new, reused, 0)
    whitening = None
    if white_paths and cfg.whitening is not None:  # the images of the folder
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
    out = Path(cfg.output)
    (out / "index").mkdir(parents=True, exist_ok=True)  # this run's search matrices
    qm = write_search_matrix(store, ok_q, out / "index" / "search-queries.npy", whitening, cfg.search_block)
    dm = write_search_matrix(store, ok_d, out / "index" / "search-against.npy", whitening, cfg.search_block)
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
    threshold = WHITENED_THRESHOLD if whitening is not None else DEFAULT_THRESHOLD
    fraction = pair_fraction_above(qm, dm, threshold, same, seed=cfg.seed)
    warnings = meaning_warnings(cfg.weights, fraction, threshold, "this ranking")
    for w in warnings:
        log.warning(w)
    return SimilarResult(
        queries,
        cfg.k,
        len(ok_q),
        len(ok_d),
        n_new,
        reused,
        unreadable,
        fraction,
        threshold,
        str(cfg.weights) == "random",
        warnings,
        embedder.fingerprint["normalization"],
    )


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

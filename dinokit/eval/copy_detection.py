"""Copy detection on Copydays with DINO descriptors (Caron et al. 2021, Sec. 4.2.1 and Table 4; spec
copy-detection): the originals (plus distractors) are the database, every edited block queries it,
and each block scores the mean of the Holidays trapezoid AP over its queries.

The descriptor and its whitening are in :mod:`dinokit.eval.descriptors`, the folder layout in
:mod:`dinokit.data.copydays`, the everyday form (near-duplicate pairs in a folder) in
:mod:`dinokit.eval.duplicates`. Nothing here prints (progress and logging only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import BackboneOptions, prepare_backbone
from ..data.copydays import copydays_positives, scan_copydays
from ..errors import DataError, DinokitError
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, init_distributed
from .descriptors import (
    GEM_P,
    DescriptorEmbedder,
    Embedded,
    Whitening,
    copy_feature_fn,
    copy_transform,
    find_folder_images,
    normalize_descriptors,
    whitening_from,
)
from .metrics import trapezoid_ap

log = logging.getLogger("dinokit")

#: the scale of each score in metrics.json: mAP as a fraction (0-1), as the Copydays protocol computes it
UNITS = {"mAP": "fraction", "headline": "fraction"}


# ---------------------------------------------------------------------------------------------
# Ranking and average precision
# ---------------------------------------------------------------------------------------------
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


def mean_average_precision(
    ranked: torch.Tensor, positives: Sequence[Sequence[int]]
) -> tuple[float, list[float]]:
    """mAP of ranked database ids (Q, k) given each query's positive ids (Holidays trapezoid AP)."""
    aps = []
    for row, pos in zip(ranked.tolist(), positives):
        pos_set = set(pos)
        ranks = [r for r, idx in enumerate(row) if idx in pos_set]
        aps.append(trapezoid_ap(ranks, len(pos_set)))
    return (float(np.mean(aps)) if aps else float("nan")), aps


# ---------------------------------------------------------------------------------------------
# The Copydays protocol
# ---------------------------------------------------------------------------------------------
@dataclass
class CopyDetectionConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit copydetect`` needs: the Copydays root, optional distractors and whitening set."""

    data: Path
    output: Path
    image_size: int = 320
    distractors: Path | None = None
    whitening: Path | None = None
    top: int = 20
    gem_p: float = GEM_P
    _: KW_ONLY  # the option defaults this command changes
    batch_size: int = 32


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
    #: the input normalisation used (metrics.json keeps it in its config)
    normalization: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> float:
        return self.mAP.get("strong", float("nan"))

    def to_metrics(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("normalization")
        return d


@dataclass
class _QueryBlock:
    """One query block's queries that can be scored: their rows and positives (database positions)."""

    rows: list[int]
    positives: list[list[int]]
    skipped: int


def _scorable_queries(
    block: str, paths: Sequence[Path], emb: Embedded, originals: Sequence[Path], position: dict[int, int]
) -> _QueryBlock:
    """The readable queries of ``block`` whose original is readable, with those originals' positions
    in the database; queries without a readable original are counted, not scored."""
    rows, positives = [], []
    skipped = 0
    for i, pos in enumerate(copydays_positives(block, paths, originals)):
        if not bool(emb.kept[i]):
            continue
        pos = [position[j] for j in pos if j in position]
        if not pos:
            skipped += 1
            continue
        rows.append(i)
        positives.append(pos)
    return _QueryBlock(rows, positives, skipped)


def _learn_whitening(
    embedder: DescriptorEmbedder, paths: list[Path], folder: Path | None, unreadable: dict[str, int]
) -> tuple[Whitening | None, dict[str, Any] | None]:
    if not paths:
        return None, None
    assert folder is not None  # the images were found in it
    emb = embedder.embed(paths, "whitening")
    unreadable["whitening"] = emb.n_unreadable
    whitening = whitening_from(emb, folder)
    return whitening, {"images": int(emb.kept.sum()), "clamped_eigenvalues": whitening.n_clamped}


def copy_detection(cfg: CopyDetectionConfig, progress: Progress = NULL_PROGRESS) -> CopyDetectionResult:
    """Run the Copydays protocol (spec copy-detection; paper Sec. 4.2.1): embed the originals (plus
    distractors) as the database and every block as queries, rank by cosine similarity and report
    the mAP of each block, a fraction in [0, 1]."""
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    if cfg.top < 0:
        raise DinokitError(f"--k must be 0 (rank everything) or positive, got {cfg.top}.")
    layout = scan_copydays(cfg.data)
    distractors = (
        find_folder_images(cfg.distractors, "distractor folder") if cfg.distractors is not None else []
    )
    white_paths = find_folder_images(cfg.whitening, "whitening folder") if cfg.whitening is not None else []

    backbone = prepare_backbone(cfg)
    init_distributed(backbone.device)
    embedder = DescriptorEmbedder(
        backbone.model,
        cfg.weights,
        copy_transform(cfg.image_size, backbone.normalization),
        copy_feature_fn(cfg.gem_p),
        f"cls+gem(p={cfg.gem_p:g})",
        backbone.device,
        backbone.dtype,
        cfg.batch_size,
        cfg.num_workers,
        Path(cfg.output) / "cache",
        cfg.checkpoint_key,
        cfg.seed,
        progress,
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )

    unreadable: dict[str, int] = {}
    originals = embedder.embed(layout.originals, "original")
    unreadable["original"] = originals.n_unreadable
    if not bool(originals.kept.any()):
        raise DataError(f"None of the images in {layout.root / 'original'} could be read.")
    distr = embedder.embed(distractors, "distractors") if distractors else None
    if distr is not None:
        unreadable["distractors"] = distr.n_unreadable
    whitening, white_info = _learn_whitening(embedder, white_paths, cfg.whitening, unreadable)

    # database: the readable originals first (their positions are what positives refer to), then
    # the readable distractors
    orig_ids = torch.nonzero(originals.kept).flatten()
    db_parts = [originals.features[orig_ids]]
    if distr is not None:
        db_parts.append(distr.features[distr.kept])
    database = normalize_descriptors(torch.cat(db_parts), whitening)
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
        queries = _scorable_queries(block, paths, emb, layout.originals, position)
        if queries.skipped:
            log.warning("%s: %d queries have no readable original and are left out", block, queries.skipped)
            skipped[block] = queries.skipped
        if not queries.rows:
            raise DataError(
                f"No query of the block {layout.root / block} has a matching original, so it cannot be scored."
            )
        q = normalize_descriptors(emb.features[torch.tensor(queries.rows)], whitening)
        ranked, _ = rank_database(q, database, top)
        maps[block], _ = mean_average_precision(ranked, queries.positives)
        counts[block] = len(queries.rows)
    total_unreadable = sum(unreadable.values())
    if total_unreadable:
        log.warning(
            "%d unreadable %s skipped",
            total_unreadable,
            "image was" if total_unreadable == 1 else "images were",
        )
    return CopyDetectionResult(
        mAP=maps,
        queries=counts,
        database_size=int(database.shape[0]),
        n_distractors=int(distr.kept.sum()) if distr is not None else 0,
        unreadable=unreadable,
        whitening=white_info,
        descriptor_dim=int(database.shape[1]),
        skipped_queries=skipped,
        normalization=backbone.normalization.record(),
    )

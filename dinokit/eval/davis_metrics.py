"""The DAVIS 2017 semi-supervised metrics: region similarity J and boundary accuracy F.

Pont-Tuset et al., "The 2017 DAVIS Challenge on Video Object Segmentation" (arXiv:1704.00675), and
Perazzi et al. 2016 for the definitions. dinokit computes them with numpy/scipy and reproduces the
official ``davis2017-evaluation`` toolkit's numbers (checked at 1e-6 on test vectors made with it):

- objects are the labels 1..N of the first ground-truth frame (N = its largest label; 255 is void
  and counts as background); the first and the last frame are not scored;
- J = |gt & pred| / |gt | pred|, 1 when both are empty;
- F: boundary maps compared with a tolerance of ceil(0.008 * image diagonal) pixels (a filled disk);
- per object: Mean, Recall (fraction of frames above 0.5) and Decay (first quarter minus last
  quarter, with the toolkit's overlapping quarter bins);
- global numbers are plain means over all objects of all sequences.

One deliberate difference: the toolkit stores the quarter edges as uint8, so for more than 256
scored frames its Decay is garbage (NaN or wrong bins); dinokit computes it with wide integers.
On every DAVIS sequence (at most 104 frames) both agree.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data.davis import split_sequences
from ..data.palette import VOID_LABEL, read_label_png
from ..errors import DataError
from ..io import atomic_write_text, inert_cell
from ..progress import NULL_PROGRESS

MEASURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
#: the scale of each score in metrics.json: fractions (0-1), as the official DAVIS 2017 scorer writes them
UNITS = {**{m: "fraction" for m in MEASURES}, "per_object": "fraction", "per_sequence": "fraction"}


# -- per frame --------------------------------------------------------------------------------
def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Region similarity J of boolean masks (..., H, W) -> (...): IoU, 1 when both are empty."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    inter = np.logical_and(gt, pred).sum(axis=(-2, -1))
    union = np.logical_or(gt, pred).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    return np.where(union == 0, 1.0, j)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels that differ from their east, south or south-east neighbour (zero padding).

    On the last row only the east neighbour counts, on the last column only the south one, and the
    bottom-right pixel is 0 -- exactly the toolkit's ``seg2bmap`` at the mask's own size.
    """
    seg = np.asarray(mask, dtype=bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_tolerance(height: int, width: int, bound_th: float = 0.008) -> int:
    """The boundary tolerance in pixels: ceil(0.008 * sqrt(H^2 + W^2)) (8 at 480x854)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(height, width)))


def _dilate_disk(b: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by the filled disk {x^2 + y^2 <= r^2}, pixels outside the image counting as 0.

    Done as a Euclidean distance transform (a pixel is in the dilation iff a boundary pixel lies
    within distance r), which equals the disk dilation exactly and costs O(HW) whatever r is.
    """
    if not b.any():
        return np.zeros_like(b)
    if radius <= 0:
        return b.copy()
    # only the boundary's bounding box grown by r can be reached: transform that crop alone
    rows = np.flatnonzero(b.any(axis=1))
    cols = np.flatnonzero(b.any(axis=0))
    y0, y1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, b.shape[0])
    x0, x1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, b.shape[1])
    out = np.zeros_like(b)
    dist = ndimage.distance_transform_edt(~b[y0:y1, x0:x1])
    # squared distances are integers; sqrt of a perfect square is exact, so <= r is safe
    out[y0:y1, x0:x1] = dist <= radius
    return out


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary accuracy F of one frame's boolean masks (Perazzi et al. 2016)."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    height, width = pred.shape[:2]
    radius = boundary_tolerance(height, width, bound_th=bound_th)
    pred_b = boundary_map(pred)
    gt_b = boundary_map(gt)
    n_pred = int(pred_b.sum())
    n_gt = int(gt_b.sum())
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(np.logical_and(pred_b, _dilate_disk(gt_b, radius)).sum()) / n_pred
        recall = float(np.logical_and(gt_b, _dilate_disk(pred_b, radius)).sum()) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# -- per object over frames -------------------------------------------------------------------
def decay_bins(n: int, n_bins: int = 4) -> list[tuple[int, int]]:
    """The toolkit's quarter bins over n values: ids = round(linspace(1, n, 5) + 1e-10) - 1 and
    bin i = [ids[i], ids[i+1]] inclusive (neighbouring bins share their edge)."""
    ids = (np.round(np.linspace(1, n, n_bins + 1) + 1e-10) - 1).astype(np.int64)
    return [(int(ids[i]), int(ids[i + 1]) + 1) for i in range(n_bins)]


def statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame scores, as the toolkit's ``db_statistics``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    with np.errstate(invalid="ignore"), _ignore_nan_warnings():
        mean = float(np.nanmean(v))
        recall = float(np.nanmean(v > 0.5))
        bins = [v[a:b] for a, b in decay_bins(len(v))]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


class _ignore_nan_warnings:
    def __enter__(self):
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


# -- sequences ---------------------------------------------------------------------------------
@dataclass
class ObjectScores:
    """One object's per-frame J and F and their statistics."""

    J: list[float]
    F: list[float]

    def summary(self) -> dict[str, float]:
        jm, jr, jd = statistics(self.J)
        fm, fr, fd = statistics(self.F)
        return {
            "J&F-Mean": (jm + fm) / 2,
            "J-Mean": jm,
            "J-Recall": jr,
            "J-Decay": jd,
            "F-Mean": fm,
            "F-Recall": fr,
            "F-Decay": fd,
        }


def score_label_maps(
    gt: np.ndarray, pred: np.ndarray, n_objects: int, bound_th: float = 0.008
) -> list[ObjectScores]:
    """Per-object J and F of (T, H, W) label maps over the frames given (all of them are scored).

    Objects 1..n_objects; pixels of ``gt`` equal to 255 (void) count as background. A prediction
    without an object scores 0 wherever the object is present.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"label map shapes differ: {gt.shape} vs {pred.shape}")
    gt = np.where(gt == VOID_LABEL, 0, gt)
    out = []
    for k in range(1, n_objects + 1):
        g = gt == k
        p = pred == k
        j = jaccard(g, p).tolist()
        f = [f_measure(g[t], p[t], bound_th) for t in range(len(g))]
        out.append(ObjectScores(J=[float(x) for x in j], F=f))
    return out


# -- folders -----------------------------------------------------------------------------------
def list_frames(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))


def resolve_gt_root(
    gt: str | os.PathLike, split: str = "val", sequences: Iterable[str] | None = None
) -> tuple[Path, list[str]]:
    """``--gt``: a folder of ``<seq>/`` folders of PNGs, or a DAVIS root (Annotations/480p inside,
    and ImageSets/2017/<split>.txt naming the sequences unless ``sequences`` does; a missing list is
    refused). Returns (folder of sequences, names)."""
    root = Path(gt)
    if not root.is_dir():
        raise DataError(f"The ground-truth folder {root} does not exist.")
    ann = root / "Annotations" / "480p"
    if ann.is_dir():
        return ann, list(sequences) if sequences is not None else split_sequences(root, split)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(
            f"The ground-truth folder {root} holds no <sequence>/ folders and no Annotations/480p; "
            "give a folder of sequence folders of indexed PNGs or a DAVIS root."
        )
    return root, names


@dataclass
class DavisScores:
    """The DAVIS 2017 semi-supervised results of a set of sequences."""

    per_object: dict[str, dict[str, float]] = field(default_factory=dict)
    per_frame: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sequences: list[str] = field(default_factory=list)

    def overall(self) -> dict[str, float]:
        """Means over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2."""
        if not self.per_object:
            return {k: float("nan") for k in MEASURES}
        rows = list(self.per_object.values())
        out = {k: float(np.mean([r[k] for r in rows])) for k in MEASURES if k != "J&F-Mean"}
        out = {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
        return out

    def per_sequence(self) -> dict[str, dict[str, float]]:
        """Mean over each sequence's objects (not an official number, handy for reading)."""
        out = {}
        for seq in self.sequences:
            rows = [v for k, v in self.per_object.items() if k.rsplit("_", 1)[0] == seq]
            if rows:
                out[seq] = {k: float(np.mean([r[k] for r in rows])) for k in MEASURES}
        return out

    def metrics(self) -> dict:
        """What ``metrics.json`` holds: the seven global numbers and ``per_object``."""
        return {**self.overall(), "per_object": self.per_object, "per_sequence": self.per_sequence()}

    def write_csvs(self, folder: str | os.PathLike, split: str = "val") -> tuple[Path, Path]:
        """``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` as the official
        scorer writes them (three decimals; one row per object in the second)."""
        folder = Path(folder)
        g = self.overall()
        glob = ",".join(MEASURES) + "\n" + ",".join(f"{g[k]:.3f}" for k in MEASURES) + "\n"
        lines = ["Sequence,J-Mean,F-Mean"]
        for name, r in self.per_object.items():
            lines.append(f"{inert_cell(name)},{r['J-Mean']:.3f},{r['F-Mean']:.3f}")
        p1 = folder / f"global_results-{split}.csv"
        p2 = folder / f"per-sequence_results-{split}.csv"
        atomic_write_text(p1, glob)
        atomic_write_text(p2, "\n".join(lines) + "\n")
        return p1, p2


def score_sequence_folders(
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    name: str,
    bound_th: float = 0.008,
) -> dict[str, ObjectScores]:
    """Score one sequence: ``gt_dir`` and ``pred_dir`` hold ``<frame>.png`` label maps.

    Every ground-truth frame but the first and the last is scored; the prediction must hold a PNG
    of the same name and size for each, with no label above the ground truth's objects.
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"The prediction folder {pred_dir} does not exist (sequence {name}).")
    frames = list_frames(gt_dir)
    if not frames:
        raise DataError(f"The ground-truth folder {gt_dir} holds no PNG masks.")
    if len(frames) < 3:
        raise DataError(
            f"The ground-truth folder {gt_dir} holds {len(frames)} frame(s); DAVIS scoring skips the "
            "first and the last, so a sequence needs at least 3."
        )
    first = read_label_png(frames[0], "ground-truth mask")
    first = np.where(first == VOID_LABEL, 0, first)
    n_objects = int(first.max())
    scored = frames[1:-1]
    gts, preds = [], []
    for f in scored:
        g = read_label_png(f, "ground-truth mask")
        pf = pred_dir / f.name
        if not pf.is_file():
            raise DataError(
                f"The prediction {pf} is missing: every ground-truth frame of {name} needs a predicted "
                "PNG of the same name."
            )
        p = read_label_png(pf, "predicted mask")
        if p.shape != g.shape:
            raise DataError(
                f"The prediction {pf} is {p.shape[1]}x{p.shape[0]} pixels but its ground truth "
                f"{f} is {g.shape[1]}x{g.shape[0]}."
            )
        if p.size and int(p.max()) > n_objects:
            raise DataError(
                f"The prediction {pf} holds object {int(p.max())}, but the first ground-truth frame "
                f"of {name} has only {n_objects} object(s)."
            )
        gts.append(g)
        preds.append(p)
    objs = score_label_maps(np.stack(gts), np.stack(preds), n_objects, bound_th)
    return {f"{name}_{k + 1}": o for k, o in enumerate(objs)}


def evaluate_davis(
    gt: str | os.PathLike,
    pred: str | os.PathLike,
    split: str = "val",
    sequences: Iterable[str] | None = None,
    progress=None,
) -> DavisScores:
    """Score a results folder of ``<seq>/`` folders against DAVIS ground truth.

    ``gt`` is a folder of ``<seq>/`` folders of indexed PNGs (e.g. ``Annotations/480p``) or a DAVIS
    root; ``sequences`` restricts the sequences scored (default: all of ``gt``, or the split's list
    for a DAVIS root).
    """
    progress = progress or NULL_PROGRESS
    gt_root, names = resolve_gt_root(gt, split, sequences)
    pred = Path(pred)
    if not pred.is_dir():
        raise DataError(f"The prediction folder {pred} does not exist.")
    if sequences is not None:
        wanted = list(sequences)
        unknown = [s for s in wanted if not (gt_root / s).is_dir()]
        if unknown:
            raise DataError(f"The ground truth {gt_root} has no sequence {unknown[0]}.")
        names = wanted
    for s in names:
        if not (gt_root / s).is_dir():
            raise DataError(f"The ground-truth folder {gt_root / s} does not exist.")
    scores = DavisScores(sequences=list(names))
    task = progress.task("Scoring", total=len(names))
    for s in names:
        objs = score_sequence_folders(gt_root / s, pred / s, s)
        for key, o in objs.items():
            scores.per_object[key] = o.summary()
            scores.per_frame[key] = {"J": o.J, "F": o.F}
        task.advance(1)
    task.close()
    return scores

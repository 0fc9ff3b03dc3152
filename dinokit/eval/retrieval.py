"""Landmark image retrieval on revisited Oxford and Paris (Radenović et al. 2018), as in the DINO
paper (Sec. 4.2.1, Table 3): CLS descriptors, cosine ranking, mAP and mP@k under the Medium and
Hard protocols.

The ground truth ``gnd_<dataset>.pkl`` is a pickle. It is read with an unpickler that accepts only
plain containers, numbers, strings and numpy arrays, so that a file from elsewhere cannot run code.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ..checkpoints import BackboneOptions, prepare_backbone
from ..data.images import DecodeNeed, is_image_file, open_rgb_or_skip
from ..data.normalization import IMAGENET, Normalization
from ..data.transforms import normalize
from ..errors import DataError, DinokitError
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, init_distributed
from .descriptors import DescriptorEmbedder
from .metrics import trapezoid_ap

log = logging.getLogger("dinokit")

DATASETS = ("roxford5k", "rparis6k")
SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
KAPPAS = (1, 5, 10)
#: the scale of each score in metrics.json: percent, as the revisited Oxford/Paris papers report them
UNITS = {"mAP": "percent", "mP@k": "percent"}


# ---------------------------------------------------------------------------------------------
# Ground truth: a pickle, read safely
# ---------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bytes"),
    # protocol-2 pickles of numpy arrays store their bytes through codecs.encode (a pure function)
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Plain containers, numbers, strings and numpy arrays; any other object is refused."""

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # Python 2 and protocol-2 pickles name builtins so
            module = "builtins"
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def safe_unpickle(data: bytes, source: str = "the file") -> Any:
    """Unpickle ``data`` allowing only plain data; a :class:`DataError` naming anything else."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise DataError(
            f"{source} holds Python objects beyond plain data ({e}); dinokit refuses to unpickle it "
            "because that could run code."
        ) from e
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"{source} is not a readable ground-truth pickle ({e.__class__.__name__}).") from e


def _int_list(x: Any) -> list[int] | None:
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return []
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
            return None
        return [int(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x):
            return [int(v) for v in x]
    return None


@dataclass
class RevisitedGroundTruth:
    """``imlist`` (database image names), ``qimlist`` (query names), and for each query its
    ``easy``, ``hard`` and ``junk`` database indices and its bounding box ``bbx`` (x1, y1, x2, y2)."""

    imlist: list[str]
    qimlist: list[str]
    easy: list[list[int]]
    hard: list[list[int]]
    junk: list[list[int]]
    bbx: list[tuple[float, float, float, float] | None]

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def protocol(self, name: str) -> tuple[list[list[int]], list[list[int]]]:
        """(positives, ignored) per query: Medium = easy + hard positive, junk ignored; Hard = hard
        positive, junk + easy ignored."""
        if name == "medium":
            return [e + h for e, h in zip(self.easy, self.hard)], [list(j) for j in self.junk]
        if name == "hard":
            return [list(h) for h in self.hard], [j + e for j, e in zip(self.junk, self.easy)]
        raise ValueError(name)


def parse_ground_truth(obj: Any, source: str = "the ground-truth file") -> RevisitedGroundTruth:
    """Check the shape of an unpickled ``gnd_<dataset>.pkl``; one sentence on anything unexpected."""
    shape = "a dict with imlist, qimlist and gnd (one dict of easy, hard, junk and bbx per query)"

    def bad(why: str) -> DataError:
        return DataError(f"{source} is not a revisited Oxford/Paris ground truth ({why}; expected {shape}).")

    if not isinstance(obj, dict):
        raise bad(f"it holds a {type(obj).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in obj]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    imlist, qimlist, gnd = obj["imlist"], obj["qimlist"], obj["gnd"]
    for key, value in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad(f"{key} is not a list of image names")
    if not isinstance(gnd, (list, tuple)):
        raise bad("gnd is not a list")
    if len(gnd) != len(qimlist):
        raise bad(f"gnd has {len(gnd)} entries for {len(qimlist)} queries")
    n = len(imlist)
    easy, hard, junk = [], [], []
    bbx: list[tuple[float, float, float, float] | None] = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise bad(f"gnd[{i}] is not a dict")
        lists = {}
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise bad(f"gnd[{i}] has no {key}")
            values = _int_list(g[key])
            if values is None:
                raise bad(f"gnd[{i}]['{key}'] is not a list of image indices")
            if any(v < 0 or v >= n for v in values):
                raise bad(f"gnd[{i}]['{key}'] has an index outside the {n} database images")
            lists[key] = values
        easy.append(lists["easy"])
        hard.append(lists["hard"])
        junk.append(lists["junk"])
        box = g.get("bbx")
        if box is None:
            bbx.append(None)
        else:
            try:
                b = tuple(float(v) for v in np.asarray(box).reshape(-1).tolist())
            except (TypeError, ValueError):
                b = ()
            if len(b) != 4:
                raise bad(f"gnd[{i}]['bbx'] is not four numbers")
            bbx.append((b[0], b[1], b[2], b[3]))
    return RevisitedGroundTruth(list(imlist), list(qimlist), easy, hard, junk, bbx)


def load_revisited_ground_truth(path: str | os.PathLike) -> RevisitedGroundTruth:
    """A Revisited Oxford / Paris ground-truth file (gnd_*.pkl), read without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The ground-truth file {path} does not exist.")
    return parse_ground_truth(safe_unpickle(path.read_bytes(), str(path)), str(path))


# ---------------------------------------------------------------------------------------------
# The revisited protocol's scores
# ---------------------------------------------------------------------------------------------
def query_scores(
    ranking: Sequence[int], positives: Sequence[int], ignored: Sequence[int], kappas: Sequence[int] = KAPPAS
) -> tuple[float, list[float]] | None:
    """AP and precision@k of one query's ranking of the whole database (indices, best first).

    Ignored (junk) images are taken out of the ranking before anything is counted. Precision@k is
    the revisited protocol's: the fraction of positives among the first min(k, r) results, where r
    is the 1-based rank of the last positive retrieved (so a query with fewer than k positives, all
    ranked first, scores 1). None when the query has no positives.
    """
    pos_set, ign_set = set(positives), set(ignored) - set(positives)
    if not pos_set:
        return None
    kept = [idx for idx in ranking if idx not in ign_set]
    pos_ranks = [r for r, idx in enumerate(kept) if idx in pos_set]
    ap = trapezoid_ap(pos_ranks, len(pos_set))
    precisions = []
    one_based = np.array(pos_ranks) + 1
    for k in kappas:
        if len(one_based) == 0:
            precisions.append(0.0)
            continue
        kq = min(int(one_based.max()), int(k))
        precisions.append(float((one_based <= kq).sum()) / kq)
    return ap, precisions


def revisited_map(
    rankings: np.ndarray | Sequence[Sequence[int]],
    positives: Sequence[Sequence[int]],
    ignored: Sequence[Sequence[int]],
    kappas: Sequence[int] = KAPPAS,
) -> tuple[float, list[float], list[float]]:
    """(mAP, mP@k for each k, per-query APs with NaN for queries without positives), as fractions;
    queries without positives are left out of the means."""
    aps, prs = [], []
    per_query = []
    for ranking, pos, ign in zip(rankings, positives, ignored):
        scores = query_scores(list(ranking), pos, ign, kappas)
        if scores is None:
            per_query.append(float("nan"))
            continue
        aps.append(scores[0])
        prs.append(scores[1])
        per_query.append(scores[0])
    if not aps:
        return float("nan"), [float("nan")] * len(kappas), per_query
    return float(np.mean(aps)), [float(v) for v in np.mean(prs, axis=0)], per_query


# ---------------------------------------------------------------------------------------------
# Images and descriptors
# ---------------------------------------------------------------------------------------------
def thumbnail(img, imsize: int):
    """The reference's resize: the long side becomes at most ``imsize`` (aspect kept, Lanczos; PIL's
    thumbnail never enlarges)."""
    img = img.copy()
    img.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
    return img


class RetrievalImages(torch.utils.data.Dataset):
    """Images (queries cropped to their box when boxes are given), thumbnailed to ``imsize``, ImageNet-normalised;
    yields (x, -1, index), or None for an unreadable file."""

    def __init__(
        self,
        paths: Sequence[Path],
        imsize: int,
        boxes: Sequence[Any] | None = None,
        strict: bool = False,
        exact_decode: bool = False,
        norm: Normalization = IMAGENET,
    ):
        self.strict = strict  #: an unreadable file stops the run instead of being skipped
        # a large JPEG is decoded at the reduced scale whose long side still covers the thumbnail;
        # a query cropped to its box (in full-size pixels) is decoded in full
        self.need = None if exact_decode or boxes is not None else DecodeNeed(long_side=imsize)
        self.paths = list(paths)
        self.imsize = imsize
        self.boxes = list(boxes) if boxes is not None else None
        self.to_tensor = T.Compose([T.ToTensor(), normalize(norm)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = open_rgb_or_skip(self.paths[i], self.strict, self.need)
        if img is None:
            return None
        if self.boxes is not None and self.boxes[i] is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in self.boxes[i])
            img = img.crop((x0, y0, x1, y1))
        img = thumbnail(img, self.imsize)
        return self.to_tensor(img), -1, i


def retrieval_feature_fn(multiscale: bool = False):
    """The CLS descriptor; with ``multiscale`` the mean over the input at scales 1, 1/sqrt(2) and 1/2
    (bilinear), L2-normalised, as the reference does."""

    def fn(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if not multiscale:
            return model(images)
        total = None
        for s in SCALES:
            x = (
                images
                if s == 1.0
                else nn.functional.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
            )
            out = model(x).float()
            total = out if total is None else total + out
        assert total is not None  # SCALES is not empty
        total = total / len(SCALES)
        return nn.functional.normalize(total, dim=1, p=2)

    return fn


def _image_path(folder: Path, name: str) -> Path:
    return folder / name if is_image_file(name) else folder / f"{name}.jpg"


def find_dataset(root: str | os.PathLike, dataset: str) -> tuple[Path, Path]:
    """(ground-truth file, image folder) for ``dataset`` under ``root`` (``root/<dataset>/`` or the
    dataset folder itself)."""
    root = Path(root).expanduser()
    if dataset not in DATASETS:
        raise DinokitError(f"Unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
    if not root.is_dir():
        raise DataError(f"The folder {root} does not exist.")
    name = f"gnd_{dataset}.pkl"
    for folder in (root / dataset, root):
        if (folder / name).is_file():
            return folder / name, folder / "jpg"
    raise DataError(
        f"{root} has no {name} (expected {root / dataset / name} and the images in {root / dataset / 'jpg'})."
    )


# ---------------------------------------------------------------------------------------------
# The command's function
# ---------------------------------------------------------------------------------------------
@dataclass
class RetrievalConfig(BackboneOptions, RuntimeOptions):
    """What ``dinokit retrieval`` needs: the dataset root and name, the image size and the scales."""

    data: Path
    dataset: str
    output: Path
    image_size: int = 224
    multiscale: bool = False
    #: crop each query to its ground-truth box first (the revisited toolkit's protocol); the DINO
    #: reference's evaluation, which gave the paper's table, uses the whole query image
    crop_queries: bool = False
    _: KW_ONLY  # the option defaults this command changes
    batch_size: int = 1  #: one image per batch: the images keep their own sizes


@dataclass
class RetrievalResult:
    dataset: str
    mAP: dict[str, float]  # percent
    mP: dict[str, dict[str, float]]  # protocol -> {"1": ..., "5": ..., "10": ...}, percent
    queries: int
    database: int
    unreadable: dict[str, int] = field(default_factory=dict)
    query_region: str = "whole image"  #: "whole image" (the DINO reference) or "box" (--crop-queries)
    #: the input normalisation used (metrics.json keeps it in its config)
    normalization: dict[str, Any] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, Any]:
        d = asdict(self)
        d["mP@k"] = d.pop("mP")
        d.pop("normalization")
        return d


def image_retrieval(cfg: RetrievalConfig, progress: Progress = NULL_PROGRESS) -> RetrievalResult:
    """Revisited Oxford/Paris retrieval with CLS descriptors; scores in percent, as published."""
    if cfg.image_size < 1:
        raise DinokitError(f"--image-size must be positive, got {cfg.image_size}.")
    gnd_path, jpg = find_dataset(cfg.data, cfg.dataset)
    gt = load_revisited_ground_truth(gnd_path)
    if gt.n_queries == 0:
        raise DataError(f"{gnd_path} lists no query images, so there is nothing to evaluate.")
    if not gt.imlist:
        raise DataError(f"{gnd_path} lists no database images, so there is nothing to search.")
    if not jpg.is_dir():
        raise DataError(f"The image folder {jpg} does not exist.")
    db_paths = [_image_path(jpg, n) for n in gt.imlist]
    q_paths = [_image_path(jpg, n) for n in gt.qimlist]
    absent = [p for p in (*q_paths, *db_paths) if not p.exists()]
    if absent:
        raise DataError(
            f"{len(absent)} images listed in {gnd_path.name} are missing from {jpg}, e.g. {absent[0].name}."
        )

    backbone = prepare_backbone(cfg)
    init_distributed(backbone.device)
    descriptor = "cls" + (f"+multiscale{tuple(round(s, 4) for s in SCALES)}" if cfg.multiscale else "")
    transform_name = f"thumbnail({cfg.image_size}, lanczos)+normalize"
    embedder = DescriptorEmbedder(
        backbone.model,
        cfg.weights,
        transform_name,
        retrieval_feature_fn(cfg.multiscale),
        descriptor,
        backbone.device,
        backbone.dtype,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        cache_dir=Path(cfg.output) / "cache",
        checkpoint_key=cfg.checkpoint_key,
        seed=cfg.seed,
        progress=progress,
        strict=cfg.strict,
        exact_decode=cfg.exact_decode,
    )
    db = embedder.embed(
        db_paths,
        f"{cfg.dataset}-database",
        "database",
        dataset=RetrievalImages(
            db_paths,
            cfg.image_size,
            strict=cfg.strict,
            exact_decode=cfg.exact_decode,
            norm=backbone.normalization,
        ),
    )
    boxes = gt.bbx if cfg.crop_queries else None
    qs = embedder.embed(
        q_paths,
        f"{cfg.dataset}-queries",
        "queries",
        dataset=RetrievalImages(q_paths, cfg.image_size, boxes, cfg.strict, norm=backbone.normalization),
        extra_key=repr(boxes),
    )
    unreadable = {"database": db.n_unreadable, "queries": qs.n_unreadable}
    if not bool(qs.kept.any()):
        raise DataError(f"None of the {gt.n_queries} query images in {jpg} could be read.")
    if not bool(db.kept.any()):
        raise DataError(f"None of the {len(db_paths)} database images in {jpg} could be read.")
    if sum(unreadable.values()):
        n_bad = sum(unreadable.values())
        log.warning("%d unreadable %s skipped", n_bad, "image was" if n_bad == 1 else "images were")

    db_ids = torch.nonzero(db.kept).flatten()
    q_ids = torch.nonzero(qs.kept).flatten()
    dbf = nn.functional.normalize(db.features[db_ids], dim=1, p=2)
    qf = nn.functional.normalize(qs.features[q_ids], dim=1, p=2)
    sim = qf @ dbf.T
    rankings = db_ids[torch.argsort(-sim, dim=1)].numpy()  # database indices, best first

    maps: dict[str, float] = {}
    mps: dict[str, dict[str, float]] = {}
    for proto in ("medium", "hard"):
        pos, ign = gt.protocol(proto)
        pos = [pos[i] for i in q_ids.tolist()]
        ign = [ign[i] for i in q_ids.tolist()]
        m, pr, _ = revisited_map(rankings, pos, ign, KAPPAS)
        maps[proto] = 100.0 * m
        mps[proto] = {str(k): 100.0 * v for k, v in zip(KAPPAS, pr)}
    return RetrievalResult(
        cfg.dataset,
        maps,
        mps,
        int(len(q_ids)),
        int(len(db_ids)),
        unreadable,
        "box" if cfg.crop_queries else "whole image",
        backbone.normalization.record(),
    )

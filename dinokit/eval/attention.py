"""Self-attention maps of the CLS token and the attention-mask Jaccard evaluation (DINO, Sec. 4.2.2
"Probing the self-attention map", Fig. 3 and the Jaccard table of Fig. 4; other self-supervised
ViTs in Appendix D).

* A head's map is the CLS query's post-softmax attention to the patch tokens in the last block.
* :func:`mass_threshold` keeps, per head, the smallest set of patches holding a fraction of the
  attention mass (60% in the paper); that set is the head's mask.
* :func:`jaccard_best_head` is the paper's protocol (as its first author described it): compare
  every head's mask with every ground-truth object, keep the best head per object, average over the
  image's objects; :func:`evaluate_jaccard` then averages over images.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .. import viz
from ..data.images import DecodeNeed, find_images, open_rgb, read_image, read_image_or_skip
from ..data.loader import image_loader
from ..data.masks import VOID, GroundTruth
from ..data.normalization import IMAGENET, Normalization
from ..errors import DataError, DinokitError
from ..models.vit import MAX_TOKENS, too_many_tokens
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, autocast, resolve_device, resolve_precision

log = logging.getLogger("dinokit")

#: the scale of each score in metrics.json: Jaccard indices as fractions (0-1)
UNITS = {"jaccard": "fraction", "jaccard_per_head": "fraction"}


# -- the two protocol functions ---------------------------------------------------------------------
def mass_threshold(attn, fraction: float = 0.6):
    """The paper's attention masks: per row, the smallest set of entries holding ``fraction`` of the mass.

    ``attn`` is (heads, N) (any leading shape works; the last axis is the patches), a torch tensor or
    a numpy array; the result is a bool array of the same shape and kind. The entries are sorted in
    decreasing order and taken until their sum reaches ``fraction`` of the row's total (an entry is kept
    when the mass of the larger ones before it is still below the target, so the kept set is minimal).

    Ties: equal values are taken in patch order (lower index first), so exactly the minimal number of
    patches is kept and the result does not depend on the sort's implementation; e.g. ``[.25, .25,
    .25, .25]`` at 0.5 keeps patches 0 and 1. Sums are compared in float64 with a tolerance of 1e-9
    of the row's total, so a set whose mass equals the target up to rounding counts as reaching it.
    ``fraction`` 0 keeps nothing, 1 keeps every patch with nonzero attention. Rows that are all zero
    keep nothing. The reference's ``cumsum(sorted ascending) > 1 - f`` is the same rule up to its
    tie order and rounding.
    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise DinokitError(f"The mass fraction must be between 0 and 1, not {fraction}.")
    is_numpy = isinstance(attn, np.ndarray)
    a = torch.as_tensor(attn).detach().to("cpu", torch.float64)
    if a.ndim == 0:
        raise ValueError("attn needs at least one axis of patches")
    # stable sort of the negated values: descending, ties in index order
    vals, idx = torch.sort(-a, dim=-1, stable=True)
    vals = -vals
    total = vals.sum(dim=-1, keepdim=True)
    before = torch.cumsum(vals, dim=-1) - vals  # mass of the larger entries before each one
    target = float(fraction) * total
    keep_sorted = (before < target - 1e-9 * total) & (vals > 0)
    out = torch.zeros_like(keep_sorted)
    out.scatter_(-1, idx, keep_sorted)
    if is_numpy:
        return out.numpy()
    return out.to(torch.as_tensor(attn).device) if isinstance(attn, torch.Tensor) else out


def object_ids(gt: np.ndarray, ignore: Sequence[int] = (0, VOID)) -> list[int]:
    """The object labels present in a label map (every value not in ``ignore``)."""
    vals = np.unique(np.asarray(gt))
    return [int(v) for v in vals if int(v) not in set(int(i) for i in ignore)]


def jaccard_per_object(
    head_masks, gt, ignore: Sequence[int] = (0, VOID), void: int | None = None
) -> tuple[list[int], np.ndarray]:
    """The Jaccard (IoU) of every head's mask with every ground-truth object.

    ``head_masks`` (heads, H, W) bool; ``gt`` (H, W) int label map. Returns the object labels and an
    (objects, heads) float64 array. With ``void`` set, pixels labelled ``void`` count in neither the
    intersection nor the union (VOC's "don't care" border).
    """
    masks = torch.as_tensor(
        np.asarray(head_masks) if not isinstance(head_masks, torch.Tensor) else head_masks
    )
    g = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[-2:] != g.shape:
        raise DinokitError(
            f"The head masks are {tuple(masks.shape[-2:])} but the ground truth is {tuple(g.shape)}; they must match."
        )
    masks = masks.to(torch.bool)
    ids = object_ids(g.cpu().numpy(), ignore)
    if not ids:
        return [], np.zeros((0, masks.shape[0]), dtype=np.float64)
    heads = masks.shape[0]
    m = masks.reshape(heads, -1)
    flat = g.reshape(-1).to(m.device)
    if void is not None:
        m = m & (flat != void)
    objs = torch.stack([flat == i for i in ids])  # (O, HW)
    mf, of = m.to(torch.float64), objs.to(torch.float64)
    inter = of @ mf.T  # (O, heads)
    union = of.sum(1, keepdim=True) + mf.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return ids, iou.cpu().numpy()


def jaccard_best_head(
    head_masks, gt, ignore: Sequence[int] = (0, VOID), void: int | None = None
) -> float | None:
    """The paper's per-image score: for each object the best head's Jaccard, averaged over the objects.

    ``head_masks`` (heads, H, W) bool; ``gt`` (H, W) int with objects labelled by any value outside
    ``ignore`` (0 background and 255 void by default). None when the image has no object.
    """
    ids, iou = jaccard_per_object(head_masks, gt, ignore, void)
    if not ids:
        return None
    return float(iou.max(axis=1).mean())


# -- preprocessing --------------------------------------------------------------------------------
def resize_image(img: Image.Image, image_size: int | None, keep_aspect: bool = False) -> Image.Image:
    """torchvision's default resize of a PIL image: to (S, S), or shorter side S with ``keep_aspect``;
    ``image_size`` 0/None keeps the image as it is."""
    if not image_size:
        return img
    return T.Resize(image_size if keep_aspect else (image_size, image_size))(img)


def attention_need(
    image_size: int | None, keep_aspect: bool = False, exact_decode: bool = False
) -> DecodeNeed | None:
    """What :func:`resize_image` needs of a decoded picture (None: the full picture, as without a size
    or with ``exact_decode``)."""
    if not image_size or exact_decode:
        return None
    return (
        DecodeNeed(short_side=image_size) if keep_aspect else DecodeNeed(width=image_size, height=image_size)
    )


def resized_size(
    width: int, height: int, image_size: int | None, keep_aspect: bool = False
) -> tuple[int, int]:
    """The (width, height) :func:`resize_image` gives: (S, S), or the shorter side S and the longer
    side scaled and truncated (torchvision's rule) with ``keep_aspect``; unchanged without a size."""
    if not image_size:
        return width, height
    if not keep_aspect:
        return image_size, image_size
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def crop_to_patches(arr: np.ndarray, patch_size: int) -> np.ndarray:
    """Crop the bottom and right edges of an (H, W, ...) array to multiples of the patch size."""
    h, w = arr.shape[0], arr.shape[1]
    return arr[: h - h % patch_size, : w - w % patch_size]


def largest_image_size(width: int, height: int, keep_aspect: bool, patch_size: int, limit: int) -> int | None:
    """The largest ``--image-size`` at which an image of ``width`` x ``height`` stays within ``limit``
    tokens (None when not even one patch's size does)."""

    def tokens(size: int) -> int:
        w, h = resized_size(width, height, size, keep_aspect)
        return (w // patch_size) * (h // patch_size)

    lo, hi = patch_size, patch_size * (math.isqrt(max(limit, 1)) + 1)
    if tokens(lo) > limit:
        return None
    while lo < hi:  # tokens grow with the size: the last size within the limit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tokens(mid) <= limit else (lo, mid - 1)
    return lo


def check_token_count(
    width: int, height: int, image_size: int | None, keep_aspect: bool, patch_size: int, limit: int, name
) -> None:
    """Refuse, before any work, an image that the asked size would make more than ``limit`` tokens,
    saying the size that would fit (a 16x2000 strip at --image-size 480 with --keep-aspect is 480x60000
    pixels, 112,500 tokens, and would run for minutes)."""
    w, h = resized_size(width, height, image_size, keep_aspect)
    n = (w // patch_size) * (h // patch_size)
    if n <= limit:
        return
    if image_size:
        how = f"--image-size {image_size}" + (" with --keep-aspect" if keep_aspect else "")
        what = f"The image {name} ({width}x{height} pixels) at {how} becomes {w}x{h} pixels, which"
    else:
        what = f"The image {name} at its own size of {width}x{height} pixels"
    fit = largest_image_size(width, height, keep_aspect, patch_size, limit)
    advice = f"use --image-size {fit} or less for it" if fit else "it cannot be made that small"
    raise DataError(too_many_tokens(what, n, patch_size, limit, advice, override="--max-tokens"))


def check_image_size(img: Image.Image, patch_size: int, name) -> None:
    if img.width < patch_size or img.height < patch_size:
        raise DataError(
            f"The image {name} is {img.width}x{img.height} pixels, smaller than one {patch_size}x{patch_size} patch."
        )


def preprocess(
    img: Image.Image,
    image_size: int | None,
    patch_size: int,
    name="",
    keep_aspect: bool = False,
    max_tokens: int = MAX_TOKENS,
    norm: Normalization | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """The maps' preprocessing: resize, normalise (with ``norm``, the weights' own; ImageNet's when
    None), crop to a multiple of the patch size (an image that would become more than ``max_tokens``
    tokens is refused first).

    Returns the network input (3, H, W) and the same picture as uint8 (H, W, 3) for drawing.
    """
    check_image_size(img, patch_size, name)
    check_token_count(img.width, img.height, image_size, keep_aspect, patch_size, max_tokens, name)
    resized = resize_image(img, image_size, keep_aspect)
    if resized.width < patch_size or resized.height < patch_size:
        raise DataError(f"--image-size {image_size} is smaller than one {patch_size}x{patch_size} patch.")
    rgb = crop_to_patches(np.asarray(resized.convert("RGB")), patch_size)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255)
    norm = norm or IMAGENET
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (x - mean) / std, rgb


def resize_labels(
    labels: np.ndarray, image_size: int | None, patch_size: int, keep_aspect: bool = False
) -> np.ndarray:
    """Ground truth to the network's pixels: PIL NEAREST to the image's resized size ((S, S), or
    shorter side S with ``keep_aspect``), then the same crop as the image."""
    if image_size:
        h, w = np.asarray(labels).shape[:2]
        pic = Image.fromarray(np.asarray(labels, dtype=np.int32), mode="I")
        size = resized_size(w, h, image_size, keep_aspect)
        labels = np.asarray(pic.resize(size, Image.Resampling.NEAREST), dtype=np.int32)
    return np.array(crop_to_patches(labels, patch_size), dtype=np.int32, order="C")


# -- attention ------------------------------------------------------------------------------------
def normalization_of(model) -> Normalization:
    """The input normalisation that belongs to ``model``'s weights (ImageNet's for a bare model)."""
    norm = getattr(model, "normalization", None)
    return norm if isinstance(norm, Normalization) else IMAGENET


def check_attention_model(model) -> int:
    """The patch size of a ViT backbone; a clear error for a model without attention maps."""
    if not hasattr(model, "get_cls_attention") or not hasattr(model, "patch_size"):
        raise DinokitError("Attention maps need a ViT backbone; a ResNet has no self-attention.")
    return int(model.patch_size)


@torch.no_grad()
def cls_attention_maps(model, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The last block's CLS attention over the patches as maps: (B, 3, H, W) -> (B, heads, H/p, W/p) float32."""
    p = check_attention_model(model)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    with autocast(x.device, dtype):
        attn = model.get_cls_attention(x)
    return attn.float().reshape(x.shape[0], -1, h, w)


def masks_from_maps(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mass-threshold (..., heads, h, w) maps into bool masks of the same shape."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    return mass_threshold(flat, threshold).reshape(maps.shape)


@dataclass(kw_only=True)
class AttentionConfig(RuntimeOptions):
    """The protocol's settings: the input size and the mass fraction each head's mask keeps, with
    where the maps are computed (batch size, workers, device and precision of :class:`RuntimeOptions`).

    :class:`dinokit.eval.attention_run.AttentionRunConfig` adds the backbone, inputs and output of a run.
    """

    image_size: int | None = 480  #: resize to (S, S) (video frames: shorter side S); None keeps the size
    keep_aspect: bool = False  #: resize the shorter side to S instead (the aspect ratio kept)
    threshold: float = 0.6  #: fraction of each head's attention mass its mask keeps (the paper's 60%)
    max_tokens: int = MAX_TOKENS  #: the most patch tokens an image may become (checked before the work)
    batch_size: int = 8
    device: str = "cpu"  #: the functions here run where they are told; the command passes --device


def _placed(model, cfg: AttentionConfig) -> tuple[torch.nn.Module, torch.device, torch.dtype | None]:
    """The model on the config's device in eval mode, with the autocast dtype of its precision
    (fp32 under ``auto``: evaluation numbers match the reference)."""
    device = resolve_device(str(cfg.device))
    return model.to(device).eval(), device, resolve_precision(cfg.precision, device, training=False)


@dataclass
class ImageAttention:
    """One image's maps: the picture the network saw, each head's CLS attention and its mask."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8, resized and cropped
    maps: np.ndarray  # (heads, h, w) float32, patch grid
    masks: np.ndarray  # (heads, h, w) bool
    patch_size: int
    original_size: tuple[int, int] = (0, 0)  # (width, height) before resizing

    @property
    def mean_map(self) -> np.ndarray:
        return self.maps.mean(axis=0)


def _run_group(model, group: list[tuple], cfg: AttentionConfig, device, dtype) -> list[ImageAttention]:
    x = torch.stack([g[1] for g in group]).to(device)
    maps = cls_attention_maps(model, x, dtype).cpu()
    masks = masks_from_maps(maps, cfg.threshold)
    p = int(model.patch_size)
    return [
        ImageAttention(
            path=g[0],
            image=g[2],
            maps=maps[i].numpy(),
            masks=masks[i].numpy(),
            patch_size=p,
            original_size=g[3],
        )
        for i, g in enumerate(group)
    ]


def attention_maps(
    model,
    images: Iterable,
    cfg: AttentionConfig,
    progress: Progress = NULL_PROGRESS,
    total: int | None = None,
    keep_aspect: bool = False,
) -> Iterator[ImageAttention]:
    """Maps of each image (paths, or (name, PIL image) pairs), computed in batches of equal-sized
    images and yielded in input order; only one batch is held in memory."""
    p = check_attention_model(model)
    keep_aspect = keep_aspect or cfg.keep_aspect
    norm = normalization_of(model)
    model, device, dtype = _placed(model, cfg)
    task = progress.task("attention maps", total=total)
    pending: list[tuple] = []

    def flush() -> list[ImageAttention]:
        out: list[tuple[int, ImageAttention]] = []
        groups: dict[tuple, list[tuple[int, tuple]]] = {}
        for k, item in enumerate(pending):
            groups.setdefault(tuple(item[1].shape), []).append((k, item))
        for members in groups.values():
            res = _run_group(model, [m[1] for m in members], cfg, device, dtype)
            out.extend(zip([m[0] for m in members], res))
        pending.clear()
        out.sort(key=lambda kr: kr[0])
        task.advance(len(out))
        return [r for _, r in out]

    try:
        for item in images:
            if isinstance(item, tuple):
                name, img = item
            else:
                name, img = (
                    item,
                    open_rgb(item, attention_need(cfg.image_size, keep_aspect, cfg.exact_decode)),
                )
            x, rgb = preprocess(img, cfg.image_size, p, name, keep_aspect, cfg.max_tokens, norm)
            pending.append((name, x, rgb, img.size))
            if len(pending) >= cfg.batch_size:
                yield from flush()
        if pending:
            yield from flush()
    finally:
        task.close()


# -- the Jaccard evaluation -------------------------------------------------------------------------
class _GroundTruthDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        items: Sequence[GroundTruth],
        image_size: int | None,
        patch_size: int,
        keep_aspect: bool = False,
        strict: bool = False,
        max_tokens: int = MAX_TOKENS,
        exact_decode: bool = False,
        norm: Normalization | None = None,
    ):
        self.norm = norm  #: the weights' normalisation
        self.strict = strict  #: an unreadable image stops the run; else the item is None (skipped, counted)
        self.max_tokens = max_tokens
        self.need = attention_need(image_size, keep_aspect, exact_decode)
        self.items = list(items)
        self.image_size = image_size
        self.patch_size = patch_size
        self.keep_aspect = keep_aspect

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        gt = self.items[i]
        decoded = read_image_or_skip(gt.image, self.need, self.strict)
        if decoded is None:
            return None
        img = decoded.image
        labels = gt.load(decoded.full_size)  # masks are read as stored, at the full size
        x, _ = preprocess(
            img, self.image_size, self.patch_size, gt.image, self.keep_aspect, self.max_tokens, self.norm
        )
        labels = resize_labels(labels, self.image_size, self.patch_size, self.keep_aspect)
        return x, torch.from_numpy(labels), i


@dataclass
class ImageScore:
    name: str
    jaccard: float  # best head per object, mean over objects
    objects: int
    per_head: list[float]  # each head's mean Jaccard over this image's objects


@dataclass
class JaccardResult:
    jaccard: float
    jaccard_per_head: list[float]
    best_head: int
    images: int
    objects: int
    images_without_objects: int
    unreadable_images: int = 0  #: images that could not be decoded, skipped
    per_image: list[ImageScore] = field(default_factory=list)
    # (score, index, head masks at patch resolution) of the best and worst images, for pictures
    best: list[tuple[float, int, np.ndarray]] = field(default_factory=list)
    worst: list[tuple[float, int, np.ndarray]] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "jaccard": self.jaccard,
            "jaccard_per_head": self.jaccard_per_head,
            "best_head": self.best_head,
            "images": self.images,
            "objects": self.objects,
            "images_without_objects": self.images_without_objects,
            "skipped_images": self.unreadable_images,
        }


def evaluate_jaccard(
    model,
    items: Sequence[GroundTruth],
    cfg: AttentionConfig,
    ignore_void: bool = False,
    progress: Progress = NULL_PROGRESS,
    keep_pictures: int = 4,
) -> JaccardResult:
    """The attention-mask Jaccard of a backbone on images with ground-truth objects.

    Per image and object the best head's Jaccard, averaged over the image's objects and then over
    the images (images without any object are skipped and counted); also each head's mean Jaccard
    (mean over images of its mean over objects) and the head with the highest one. Objects are the
    label values other than 0 and 255; with ``ignore_void`` the 255 pixels leave the union too.
    """
    if not items:
        raise DataError("There are no images to evaluate.")
    p = check_attention_model(model)
    norm = normalization_of(model)
    model, device, dtype = _placed(model, cfg)
    ds = _GroundTruthDataset(
        items,
        cfg.image_size,
        p,
        cfg.keep_aspect,
        strict=cfg.strict,
        max_tokens=cfg.max_tokens,
        exact_decode=cfg.exact_decode,
        norm=norm,
    )
    batch_size = cfg.batch_size if cfg.image_size and not cfg.keep_aspect else 1  # batches of one size
    loader = image_loader(ds, batch_size, cfg.num_workers, device=device)
    void = VOID if ignore_void else None
    per_image: list[ImageScore] = []
    best_heap: list = []  # min-heap of the k best (score, index, masks)
    worst_heap: list = []  # min-heap of (-score) for the k worst
    head_sums: np.ndarray | None = None
    n_objects = 0
    skipped = 0
    unreadable = 0
    running = 0.0
    task = progress.task("attention Jaccard", total=len(ds))
    try:
        for batch, n_unreadable in loader:
            unreadable += n_unreadable
            if batch is None:
                task.advance(n_unreadable)
                continue
            x, labels, index = batch
            x = x.to(device, non_blocking=True)
            maps = cls_attention_maps(model, x, dtype)
            masks = masks_from_maps(maps, cfg.threshold)  # (B, heads, h, w) bool on the CPU
            for b in range(x.shape[0]):
                i = int(index[b])
                pixel_masks = torch.repeat_interleave(torch.repeat_interleave(masks[b], p, dim=-2), p, dim=-1)
                ids, iou = jaccard_per_object(pixel_masks, labels[b], (0, VOID), void)
                if not ids:
                    skipped += 1
                    continue
                score = float(iou.max(axis=1).mean())
                head_means = iou.mean(axis=0)
                head_sums = head_means.copy() if head_sums is None else head_sums + head_means
                n_objects += len(ids)
                per_image.append(ImageScore(items[i].name, score, len(ids), [float(v) for v in head_means]))
                running += score
                grid = masks[b].numpy()
                entry = (score, -i, grid)
                if len(best_heap) < keep_pictures:
                    heapq.heappush(best_heap, entry)
                elif keep_pictures and score > best_heap[0][0]:
                    heapq.heapreplace(best_heap, entry)
                entry_w = (-score, i, grid)
                if len(worst_heap) < keep_pictures:
                    heapq.heappush(worst_heap, entry_w)
                elif keep_pictures and -score > worst_heap[0][0]:
                    heapq.heapreplace(worst_heap, entry_w)
            task.advance(x.shape[0] + n_unreadable, jaccard=running / max(1, len(per_image)))
    finally:
        task.close()
    if unreadable == len(ds):
        raise DataError(f"None of the {len(ds)} images could be read.")
    if not per_image:
        raise DataError("No image has a ground-truth object (every mask is background or void).")
    n = len(per_image)
    assert head_sums is not None  # summed with the first image that has objects
    per_head = [float(v) for v in head_sums / n]
    best = sorted(((s, -ni, g) for s, ni, g in best_heap), key=lambda e: (-e[0], e[1]))
    worst = sorted(((-s, i, g) for s, i, g in worst_heap), key=lambda e: (e[0], e[1]))
    return JaccardResult(
        jaccard=float(np.mean([s.jaccard for s in per_image])),
        jaccard_per_head=per_head,
        best_head=int(np.argmax(per_head)),
        images=n,
        objects=n_objects,
        images_without_objects=skipped,
        unreadable_images=unreadable,
        per_image=per_image,
        best=best,
        worst=worst,
    )


def evaluation_picture(
    item: GroundTruth,
    head_masks: np.ndarray,
    cfg: AttentionConfig,
    patch_size: int,
    score: float | None = None,
) -> np.ndarray:
    """A picture of one evaluated image: the ground truth, and every head's mask with the ground-truth
    contours drawn in white."""

    decoded = read_image(item.image, attention_need(cfg.image_size, cfg.keep_aspect, cfg.exact_decode))
    img = decoded.image
    labels = resize_labels(item.load(decoded.full_size), cfg.image_size, patch_size, cfg.keep_aspect)
    _, rgb = preprocess(img, cfg.image_size, patch_size, item.image, cfg.keep_aspect, cfg.max_tokens)
    ids = object_ids(labels)
    gt_masks = np.stack([labels == i for i in ids]) if ids else np.zeros((0, *labels.shape), bool)
    gt_colors = viz.distinct_colors(len(gt_masks) + 3)[
        3:
    ]  # red, purple, ... : apart from the heads' first colours
    gt_pic = viz.overlay_masks(rgb, gt_masks, gt_colors, alpha=0.45, thickness=2)
    gt_pic[labels == VOID] = (gt_pic[labels == VOID] // 2 + 112).astype(np.uint8)
    pixel_masks = viz.upsample_nearest(head_masks, patch_size)
    heads_pic = viz.overlay_masks(rgb, pixel_masks, alpha=0.5, thickness=2)
    heads_pic = viz.draw_contours(heads_pic, labels, (255, 255, 255), thickness=2, ignore=(0, VOID))
    if cfg.image_size and not cfg.keep_aspect:  # shown at the photo's proportions
        gt_pic, heads_pic = viz.to_aspect(gt_pic, img.size), viz.to_aspect(heads_pic, img.size)
    caption = f"heads' masks, J={score:.3f}" if score is not None else "heads' masks"
    pic = viz.make_grid([gt_pic, heads_pic], [f"{item.name} ground truth", caption], cols=2)
    heads = len(head_masks)
    key = viz.legend(viz.distinct_colors(heads), [f"head {h}" for h in range(heads)], pic.shape[1])
    return viz.stack_vertical([pic, key])


# -- video ----------------------------------------------------------------------------------------
def iter_video_frames(
    source: str | Path,
) -> tuple[Iterator[tuple[str, Image.Image]], int | None, float | None]:
    """Frames of a folder of images (sorted by name) or of a video file (through PyAV), one at a time.

    Returns the frame iterator, the number of frames when known and the file's frame rate when known.
    """

    src = Path(source)
    if not src.exists():
        raise DataError(f"The video {src} does not exist.")
    if src.is_dir():
        frames = find_images(src)
        if not frames:
            raise DataError(f"The folder {src} holds no frames (image files).")

        def gen_dir():
            for f in frames:
                yield str(f), open_rgb(f)

        return gen_dir(), len(frames), None
    try:
        import av
    except ImportError as e:
        raise DinokitError(
            "Reading a video file needs PyAV (pip install 'dinokit[video]'); or pass a folder of frames."
        ) from e
    try:
        container = av.open(str(src))
        stream = container.streams.video[0]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise DataError(f"{src} is not a readable video file.") from e
    fps = float(stream.average_rate) if stream.average_rate else None
    count = int(stream.frames) if stream.frames else None

    def gen_file():
        try:
            for k, frame in enumerate(container.decode(stream)):
                yield f"{src.name}:{k}", frame.to_image().convert("RGB")
        except av.error.FFmpegError as e:
            raise DataError(f"{src} could not be decoded past frame {k} ({e}).") from e
        finally:
            container.close()

    return gen_file(), count, fps


def video_attention(
    model,
    frames: Iterable[tuple[str, Image.Image]],
    cfg: AttentionConfig,
    progress: Progress = NULL_PROGRESS,
    total: int | None = None,
) -> Iterator[ImageAttention]:
    """Attention maps of video frames, streamed in batches (never all frames in memory). Frames keep
    their aspect ratio: the shorter side is resized to ``cfg.image_size`` (0 keeps the frame size)."""
    yield from attention_maps(model, frames, cfg, progress, total=total, keep_aspect=True)


def frame_pictures(res: ImageAttention) -> tuple[np.ndarray, np.ndarray]:
    """A frame's head-mean attention (inferno colours) and its heads' masks on the frame, same size."""

    mean = viz.upsample_nearest(res.mean_map, res.patch_size)
    heat = viz.apply_colormap(mean, "inferno")
    masks = viz.upsample_nearest(res.masks, res.patch_size)
    return heat, viz.overlay_masks(res.image, masks, alpha=0.45)


def summarize_maps(res: ImageAttention) -> dict:
    """Numbers about one image's maps for the run's JSON: sizes, each head's mask area and normalised attention entropy."""
    return {
        "grid": list(res.maps.shape[1:]),
        "input_size": [int(res.image.shape[1]), int(res.image.shape[0])],
        "mask_fraction_per_head": [float(m.mean()) for m in res.masks],
        "attention_entropy_per_head": [_entropy(m) for m in res.maps],
    }


def _entropy(m: np.ndarray) -> float:
    p = np.asarray(m, np.float64).ravel()
    s = p.sum()
    if s <= 0:
        return 0.0
    p = p / s
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(max(2, p.size)))

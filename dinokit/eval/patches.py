"""Pictures of dense features without labels: the PCA colours and the co-segmentation parts of a ViT's
patch tokens (DINOv2, Oquab et al. 2023, Fig. 1 and Sec. 7.3; the k-means parts of "Deep ViT
Features as Dense Visual Descriptors", Amir et al. 2021).

* :func:`patch_features` gives each image's last-block patch tokens after the final norm as an
  (h, w, D) grid; register and storage tokens never leave the network, so every generation gives
  the same grid.
* :func:`fit_pca` is a principal component analysis of rows fitted on the features of *all* the
  images at once, so that a part of an object gets the same colour in every image.
* :func:`foreground_split` thresholds the first component into a foreground mask, the first
  component oriented so that the photos' borders fall on the background side; the colours are then
  the first three components of a PCA refitted on the foreground patches alone (the figure's
  recipe), scaled jointly over the images (:func:`pca_colours`).
* :func:`cluster_parts` is k-means of the L2-normalised patch features into parts shared by the
  images (co-segmentation).

:func:`analyse_patches` runs the three on a list of grids; :func:`patches_picture` draws a few
images' pictures in one array (what ``dinokit demo`` can show).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import viz
from ..data.images import open_rgb
from ..data.normalization import IMAGENET, Normalization
from ..errors import DataError, DinokitError
from ..models.vit import MAX_TOKENS
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, autocast, resolve_device
from .attention import attention_need, preprocess

log = logging.getLogger("dinokit")

#: the colours are each component's values scaled between these percentiles of the fitted patches
COLOUR_PERCENTILES = (1.0, 99.0)


@dataclass(kw_only=True)
class PatchesConfig(RuntimeOptions):
    """The settings of the pictures: the input size, the parts and the foreground, with where the
    features are computed (:class:`RuntimeOptions`)."""

    image_size: int | None = 448  #: the shorter side S, the aspect ratio kept; None keeps the size
    max_tokens: int = MAX_TOKENS  #: the most patch tokens an image may become (checked before the work)
    parts: int = 5  #: k-means clusters shared by the images
    foreground: bool = True  #: colour the foreground only (first component thresholded)
    threshold: float | None = None  #: on the first component scaled to [0, 1]; None: Otsu's
    fit_patches: int = 200_000  #: PCA and k-means are fitted on at most this many patches (sampled)
    batch_size: int = 8
    device: str = "cpu"


# -- features ---------------------------------------------------------------------------------------
def check_patch_model(model) -> int:
    """The patch size of a ViT backbone; a clear error for a model without patch tokens."""
    if not hasattr(model, "forward_features") or not hasattr(model, "patch_size"):
        raise DinokitError("Patch pictures need a ViT backbone; a ResNet has no patch tokens.")
    return int(model.patch_size)


@dataclass
class ImagePatches:
    """One image's patch features and the picture the network saw."""

    path: object  #: the image's path or name
    image: np.ndarray  #: (H, W, 3) uint8, resized (aspect kept) and cropped to the patch grid
    features: np.ndarray  #: (h, w, D) float32, h = H / p, w = W / p
    patch_size: int
    original_size: tuple[int, int] = (0, 0)  #: (width, height) of the photo


@torch.no_grad()
def patch_tokens(model, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p, W/p, D) float32: the last block's patch tokens after the final norm,
    without the CLS token (registers and storage tokens are dropped by the backbone)."""
    p = check_patch_model(model)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    with autocast(x.device, dtype):
        tokens = model.forward_features(x)
    return tokens[:, -h * w :].float().reshape(x.shape[0], h, w, -1)


def renormalize(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """An ImageNet-normalised (3, H, W) input normalised with ``norm``'s mean and std instead."""
    if (tuple(norm.mean), tuple(norm.std)) == (IMAGENET.mean, IMAGENET.std):
        return x

    def col(v):
        return torch.tensor(v, dtype=x.dtype).view(3, 1, 1)

    return (x * col(IMAGENET.std) + col(IMAGENET.mean) - col(norm.mean)) / col(norm.std)


def patch_features(
    model,
    images: Iterable,
    cfg: PatchesConfig,
    dtype: torch.dtype | None = None,
    progress: Progress = NULL_PROGRESS,
    total: int | None = None,
    normalization: Normalization | None = None,
) -> Iterator[ImagePatches]:
    """Each image's (path, PIL image pair, or path) patch features in input order, images of one size
    batched together (``cfg.batch_size``); the photo is resized to the shorter side
    ``cfg.image_size`` with its aspect kept, cropped to a multiple of the patch size and normalised
    with ``normalization`` (default: the model's own, else ImageNet's)."""
    p = check_patch_model(model)
    norm = normalization or getattr(model, "normalization", None) or IMAGENET
    device = resolve_device(str(cfg.device))
    model = model.to(device).eval()
    task = progress.task("patch features", total=total)
    pending: list[tuple] = []

    def flush() -> list[ImagePatches]:
        done: dict[int, ImagePatches] = {}
        groups: dict[tuple, list[int]] = {}
        for k, item in enumerate(pending):
            groups.setdefault(tuple(item[1].shape), []).append(k)
        for members in groups.values():
            x = torch.stack([pending[k][1] for k in members]).to(device)
            feats = patch_tokens(model, x, dtype).cpu().numpy()
            for j, k in enumerate(members):
                name, _, rgb, size = pending[k]
                done[k] = ImagePatches(name, rgb, feats[j], p, size)
        task.advance(len(pending))
        pending.clear()
        return [done[k] for k in sorted(done)]

    try:
        for item in images:
            name, img = (
                item
                if isinstance(item, tuple)
                else (item, open_rgb(item, attention_need(cfg.image_size, True, cfg.exact_decode)))
            )
            x, rgb = preprocess(img, cfg.image_size, p, name, keep_aspect=True, max_tokens=cfg.max_tokens)
            pending.append((name, renormalize(x, norm), rgb, img.size))
            if len(pending) >= cfg.batch_size:
                yield from flush()
        if pending:
            yield from flush()
    finally:
        task.close()


# -- PCA ---------------------------------------------------------------------------------------------
@dataclass
class PCAFit:
    """Principal axes of a set of rows: ``transform(x) = (x - mean) @ components.T``."""

    mean: np.ndarray  #: (D,)
    components: np.ndarray  #: (k, D) unit rows, by decreasing variance
    explained_variance: np.ndarray  #: (k,) the variance along each axis (n - 1 in the denominator)
    explained_variance_ratio: np.ndarray  #: (k,) its share of the total variance

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, k: int) -> PCAFit:
    """The first ``k`` principal axes of the rows of ``x`` (N, D), from the eigenvectors of the
    covariance in float64. Each axis's sign is fixed so that its largest loading (in absolute value)
    is positive, as scikit-learn does, so the same rows always give the same colours."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise DataError("A principal component analysis needs at least two patches.")
    k = min(k, x.shape[1])
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (len(x) - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    comps = vectors[:, order].T
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = np.clip(values[order], 0.0, None)
    total = float(np.clip(values, 0.0, None).sum())
    return PCAFit(mean, comps, var, var / total if total > 0 else np.zeros_like(var))


def fit_rows(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """The rows to fit on: all of them up to ``limit``, else a seeded uniform sample of ``limit``."""
    if len(rows) <= limit:
        return rows
    pick = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
    return rows[np.sort(pick)]


def border_mask(h: int, w: int) -> np.ndarray:
    """The outer ring of an (h, w) patch grid."""
    m = np.zeros((h, w), bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins): the cut that maximises the between-class
    variance."""
    hist, edges = np.histogram(np.asarray(values, np.float64), bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


@dataclass
class ForegroundSplit:
    """The first component thresholded: each image's scaled first component and its mask."""

    first: list[np.ndarray]  #: (h, w) per image: the oriented first component scaled to [0, 1] jointly
    masks: list[np.ndarray]  #: (h, w) bool per image: first > threshold
    threshold: float  #: on the scaled first component
    method: str  #: otsu or given
    flipped: bool  #: the first axis was negated so that the borders lie below the threshold
    low: float  #: the raw projections' minimum and maximum that map to 0 and 1
    high: float


def foreground_split(pca: PCAFit, grids: list[np.ndarray], threshold: float | None = None) -> ForegroundSplit:
    """The foreground of each (h, w, D) grid: the first principal component scaled to [0, 1] over
    all images together, oriented so that the border patches of the photos have the lower mean
    (objects sit inside photos more than on their edges), and thresholded at ``threshold`` (None:
    Otsu's threshold of all the images' values)."""
    raw = [pca.transform(g.reshape(-1, g.shape[-1]))[:, 0].reshape(g.shape[:2]) for g in grids]
    border = np.concatenate([r[border_mask(g.shape[0], g.shape[1])] for r, g in zip(raw, grids)])
    inner = np.concatenate([r[~border_mask(g.shape[0], g.shape[1])] for r, g in zip(raw, grids)])
    flipped = bool(inner.size) and float(border.mean()) > float(inner.mean())
    if flipped:
        raw = [-r for r in raw]
    values = np.concatenate([r.ravel() for r in raw])
    low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    first = [((r - low) / span).astype(np.float32) for r in raw]
    method = "given" if threshold is not None else "otsu"
    t = (
        float(threshold)
        if threshold is not None
        else otsu_threshold(np.concatenate([f.ravel() for f in first]))
    )
    return ForegroundSplit(first, [f > t for f in first], t, method, flipped, low, high)


def pca_colours(
    pca: PCAFit,
    grids: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
    fitted: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each grid's first three components as RGB in [0, 1] (masked patches 0), every component scaled
    by the same two percentiles of the ``fitted`` rows for every image. Returns the colours and the
    per-component values that map to 0 and 1."""
    assert fitted is not None, "pca_colours needs the rows the colours are scaled by"
    ref = pca.transform(fitted)[:, :3]
    lo, hi = np.percentile(ref, COLOUR_PERCENTILES, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = []
    for i, g in enumerate(grids):
        proj = pca.transform(g.reshape(-1, g.shape[-1]))[:, :3]
        rgb = np.zeros((len(proj), 3))
        rgb[:, : proj.shape[1]] = np.clip((proj - lo) / span, 0.0, 1.0)
        if masks is not None:
            rgb[~masks[i].ravel()] = 0.0
        out.append(rgb.reshape(*g.shape[:2], 3).astype(np.float32))
    return out, lo, hi


# -- k-means -----------------------------------------------------------------------------------------
def l2_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cluster_parts(
    grids: list[np.ndarray], k: int, fit_limit: int = 200_000, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """k-means of the L2-normalised patch features of all the grids at once into ``k`` parts shared by
    the images (scikit-learn's k-means++, 3 starts, fitted on at most ``fit_limit`` patches).
    Parts are numbered by size, part 0 the largest. Returns each grid's (h, w) part numbers, the
    number of patches in each part and the inertia on the fitted patches."""
    from sklearn.cluster import KMeans

    rows = l2_rows(np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids]))
    if len(rows) < k:
        raise DataError(f"--parts {k} asks for more parts than the images have patches ({len(rows)}).")
    fit = fit_rows(rows, fit_limit, seed)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(fit)
    labels = km.predict(rows)
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")  # order[new] = old
    rename = np.empty(k, np.int64)
    rename[order] = np.arange(k)
    labels = rename[labels]
    out, start = [], 0
    for g in grids:
        n = g.shape[0] * g.shape[1]
        out.append(labels[start : start + n].reshape(g.shape[:2]).astype(np.int32))
        start += n
    return out, sizes[order], float(km.inertia_)


# -- the analysis -----------------------------------------------------------------------------------
@dataclass
class PatchAnalysis:
    """The joint PCA, foreground and parts of a set of images, per image and as a record."""

    colours: list[np.ndarray]  #: (h, w, 3) float32 in [0, 1] per image (background 0)
    first: list[np.ndarray]  #: (h, w) float32: the first component scaled to [0, 1]
    foreground: list[np.ndarray]  #: (h, w) bool (all True without the foreground step)
    parts: list[np.ndarray]  #: (h, w) int32 part numbers
    record: dict = field(default_factory=dict)  #: the threshold, components and fits, for metrics.json
    foreground_used: bool = True  #: the colours are the foreground's (False: every patch's)


def analyse_patches(
    grids: list[np.ndarray],
    parts: int = 5,
    foreground: bool = True,
    threshold: float | None = None,
    fit_patches: int = 200_000,
    seed: int = 0,
) -> PatchAnalysis:
    """PCA colours, foreground masks and k-means parts of (h, w, D) patch grids, all fitted jointly.

    With ``foreground``: a PCA of all patches, its first component thresholded into the foreground
    (:func:`foreground_split`), a second PCA refitted on the foreground patches and its components
    1-3 as RGB over the foreground. Without: components 1-3 of the PCA of all patches, everywhere.
    """
    if not grids:
        raise DataError("There are no images to analyse.")
    dim = grids[0].shape[-1]
    rows = np.concatenate([g.reshape(-1, dim) for g in grids])
    fitted = fit_rows(rows, fit_patches, seed)
    pca_all = fit_pca(fitted, 4)
    split = foreground_split(pca_all, grids, threshold)
    record: dict = {
        "patches": len(rows),
        "fit_patches": len(fitted),
        "fit": "every patch" if len(fitted) == len(rows) else f"a seeded uniform sample of {len(fitted)}",
        "first_component": {
            "threshold": split.threshold,
            "threshold_method": split.method,
            "scaled_between": [split.low, split.high],
            "negated": split.flipped,
            "explained_variance_ratio": float(pca_all.explained_variance_ratio[0]),
            "orientation": "the photos' border patches have the lower mean (background)",
        },
    }
    fg_rows = np.concatenate([g.reshape(-1, dim)[m.ravel()] for g, m in zip(grids, split.masks)])
    masks: list[np.ndarray] | None = split.masks
    record["first_component_above_threshold"] = float(len(fg_rows) / len(rows))
    if foreground and len(fg_rows) >= 4:
        fg_fitted = fit_rows(fg_rows, fit_patches, seed)
        colour_pca = fit_pca(fg_fitted, 3)
        record["colours"] = "components 1-3 of a PCA refitted on the foreground patches (DINOv2 Fig. 1)"
    else:
        if foreground:
            log.warning("the foreground holds %d patches; colouring every patch instead", len(fg_rows))
            record["foreground_too_small"] = True
        fg_fitted, colour_pca, masks = fitted, fit_pca(fitted, 3), None
        record["colours"] = "components 1-3 of the PCA of every patch"
    colours, lo, hi = pca_colours(colour_pca, grids, masks, fg_fitted)
    record["colour_components"] = [1, 2, 3]
    record["colour_explained_variance_ratio"] = [float(v) for v in colour_pca.explained_variance_ratio]
    record["colour_scale"] = {
        "percentiles": list(COLOUR_PERCENTILES),
        "low": lo.tolist(),
        "high": hi.tolist(),
    }
    labels, sizes, inertia = cluster_parts(grids, parts, fit_patches, seed)
    record["parts"] = {
        "k": parts,
        "patches_per_part": sizes.tolist(),
        "inertia": inertia,
        "features": "L2-normalised patch tokens",
        "numbering": "by size, part 0 the largest",
    }
    fg = split.masks if masks is not None else [np.ones(g.shape[:2], bool) for g in grids]
    record["foreground_fraction"] = record["first_component_above_threshold"] if masks is not None else 1.0
    return PatchAnalysis(colours, split.first, fg, labels, record, masks is not None)


# -- pictures ---------------------------------------------------------------------------------------
PANEL_CAPTIONS = ("photo", "foreground", "PCA colours", "parts")


def patch_pictures(
    image: np.ndarray,
    colours: np.ndarray,
    first: np.ndarray,
    foreground: np.ndarray,
    parts: np.ndarray,
    patch_size: int,
    k: int,
) -> dict[str, np.ndarray]:
    """One image's pictures at the size of the picture the network saw (the photo's aspect kept):
    ``pca`` the colours (nearest, one block per patch), ``foreground`` the photo with the background
    darkened and the mask outlined, ``first`` the first component as a heat map, ``parts`` the parts
    over the photo."""
    up = viz.upsample_nearest
    pca = np.clip(np.round(up(colours.transpose(2, 0, 1), patch_size).transpose(1, 2, 0) * 255), 0, 255)
    mask = up(foreground, patch_size).astype(bool)
    fg = image.astype(np.float32)
    fg[~mask] *= 0.3
    fg = np.clip(np.round(fg), 0, 255).astype(np.uint8)
    if mask.any() and not mask.all():
        fg[viz.boundaries(mask, 2)] = (255, 255, 255)
    part_masks = up(parts, patch_size)[None] == np.arange(k)[:, None, None]
    return {
        "pca": pca.astype(np.uint8),
        "foreground": fg,
        "first": viz.apply_colormap(up(first, patch_size), "viridis", 0.0, 1.0),
        "parts": viz.overlay_masks(image, part_masks, viz.distinct_colors(k), alpha=0.55),
    }


def panel(
    image: np.ndarray, pictures: dict[str, np.ndarray], title: str = "", foreground: bool = True
) -> np.ndarray:
    """The photo, foreground, PCA colours and parts of one image side by side, captioned; without
    ``foreground`` (every patch coloured) the first component's heat map takes the mask's place."""
    second = ("foreground", pictures["foreground"]) if foreground else ("first component", pictures["first"])
    tiles = [image, second[1], pictures["pca"], pictures["parts"]]
    labels = [title or "photo", second[0], *PANEL_CAPTIONS[2:]]
    return viz.make_grid(tiles, labels, cols=4)


def resize_width(picture: np.ndarray, width: int) -> np.ndarray:
    """A picture scaled (bilinear) to ``width`` pixels, its aspect kept."""
    h, w = picture.shape[:2]
    if w == width:
        return picture
    height = max(1, round(h * width / w))
    return np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.BILINEAR))


def overview(panels: list[np.ndarray], k: int, width: int = 1200) -> np.ndarray:
    """Every image's panel one under the other at one width, with the key of the parts' colours."""
    rows = [resize_width(p, width) for p in panels]
    key = viz.legend(
        viz.distinct_colors(k), [f"part {i}" for i in range(k)], width, font_size=viz.caption_size(width // 4)
    )
    return viz.stack_vertical([*rows, key])


def patches_picture(
    model,
    images: Iterable,
    parts: int = 5,
    image_size: int = 224,
    foreground: bool = True,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    width: int = 1200,
) -> np.ndarray:
    """One picture of a few images' dense features, fitted jointly: per image the photo, its
    foreground, its PCA colours and its parts (``images``: paths or (name, PIL image) pairs)."""
    cfg = PatchesConfig(image_size=image_size, parts=parts, device=device, seed=seed)
    found = list(patch_features(model, images, cfg, dtype))
    result = analyse_patches([f.features for f in found], parts, foreground, seed=seed)
    panels = []
    for i, f in enumerate(found):
        pics = patch_pictures(
            f.image,
            result.colours[i],
            result.first[i],
            result.foreground[i],
            result.parts[i],
            f.patch_size,
            parts,
        )
        panels.append(panel(f.image, pics, Path(str(f.path)).name, result.foreground_used))
    return overview(panels, parts, width)

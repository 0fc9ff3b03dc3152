"""A run of ``dinokit patches``: the PCA colours, foreground and parts of a set of images
(:mod:`dinokit.eval.patches`) written into the output folder.

Per image, in a folder named after it: ``panel.png`` (photo, foreground, PCA colours, parts side by
side), ``pca.png``, ``foreground.png``, ``first-component.png`` and ``parts.png`` at the size of the
picture the network saw, and the arrays beside them: ``pca.npy`` (h, w, 3) float32 colours in
[0, 1], ``first_component.npy`` (h, w) float32, ``foreground.npy`` (h, w) bool and ``parts.npy``
(h, w) int32. At the top: ``overview.png`` (every image's panel and the parts' key, up to
:data:`OVERVIEW_IMAGES` images) and ``metrics.json``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import viz
from ..checkpoints import BackboneOptions, prepare_backbone
from ..data.images import expand_image_inputs
from ..data.normalization import IMAGENET
from ..errors import DataError, DinokitError
from ..io import atomic_write_bytes, prepare_output_dir
from ..models.registry import backbone_arch
from ..progress import NULL_PROGRESS, Progress
from ..runtime import precision_name
from .attention import attention_need, check_token_count
from .attention_run import readable_images, unique_names
from .patches import PatchesConfig, analyse_patches, check_patch_model, panel, patch_features, patch_pictures
from .patches import overview as overview_picture

log = logging.getLogger("dinokit")

#: overview.png shows at most this many images (every image has its own folder)
OVERVIEW_IMAGES = 16


@dataclass(kw_only=True)
class PatchesRunConfig(PatchesConfig, BackboneOptions):
    """A run of ``dinokit patches``: the backbone, the images, the settings and the output folder."""

    images: list[str]
    output: Path
    overwrite: bool = False


@dataclass
class PatchesRunResult:
    output: Path
    metrics: dict
    config: dict
    images: int
    skipped: int
    foreground_fraction: float | None  #: None where every patch was coloured


def check_patches_config(cfg: PatchesRunConfig) -> None:
    """One sentence for settings that cannot work, before anything is loaded."""
    if not cfg.images:
        raise DinokitError("Give at least one image or folder to draw the patch features of.")
    if cfg.parts < 1:
        raise DinokitError(f"--parts must be at least 1, not {cfg.parts}.")
    if cfg.threshold is not None and not 0.0 <= cfg.threshold <= 1.0:
        raise DinokitError(
            f"--threshold is on the first component scaled to [0, 1]; {cfg.threshold} is outside."
        )
    if cfg.fit_patches < 10:
        raise DinokitError(f"--fit-patches must be at least 10, not {cfg.fit_patches}.")


def run_patches(cfg: PatchesRunConfig, progress: Progress = NULL_PROGRESS) -> PatchesRunResult:
    """Read the images (a bad path or a too large image is refused before anything is loaded or
    created), compute their patch features, fit the PCA, foreground and parts jointly and write the
    pictures and arrays into ``cfg.output``."""
    check_patches_config(cfg)
    paths = expand_image_inputs(cfg.images)
    prepared = prepare_backbone(cfg)
    patch = check_patch_model(prepared.model)
    for path in paths:
        _check_size(path, cfg, patch)
    model, dtype = prepared.for_inference()
    created = not cfg.output.exists()
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    try:
        return _run(paths, model, dtype, patch, prepared.model, cfg, out, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run refused on its images leaves no empty folder behind
        raise


def _run(
    paths: list[Path],
    model,
    dtype,
    patch: int,
    fp32_model,
    cfg: PatchesRunConfig,
    out: Path,
    progress: Progress,
) -> PatchesRunResult:
    unreadable: list[tuple[Path, str]] = []
    readable = readable_images(
        paths, cfg.strict, unreadable, attention_need(cfg.image_size, True, cfg.exact_decode)
    )
    norm = getattr(fp32_model, "normalization", None) or IMAGENET
    found = list(patch_features(model, readable, cfg, dtype, progress, total=len(paths), normalization=norm))
    if not found:
        first = unreadable[0][1].rstrip(".") if unreadable else "no images"
        raise DataError(
            first if len(paths) == 1 else f"None of the {len(paths)} images could be read ({first})."
        )
    task = progress.task("PCA and k-means", total=None)
    result = analyse_patches(
        [f.features for f in found], cfg.parts, cfg.foreground, cfg.threshold, cfg.fit_patches, cfg.seed
    )
    task.close()
    names = unique_names([Path(str(f.path)) for f in found])
    per_image, panels = {}, []
    for i, (f, name) in enumerate(zip(found, names)):
        pics = patch_pictures(
            f.image,
            result.colours[i],
            result.first[i],
            result.foreground[i],
            result.parts[i],
            f.patch_size,
            cfg.parts,
        )
        pic = panel(f.image, pics, name, result.foreground_used)
        if i < OVERVIEW_IMAGES:
            panels.append(pic)
        _write_image(out / name, pics, pic, result, i)
        per_image[name] = {
            "source": str(f.path),
            "input_size": [int(f.image.shape[1]), int(f.image.shape[0])],
            "grid": [int(f.features.shape[0]), int(f.features.shape[1])],
            "foreground_fraction": float(result.foreground[i].mean()),
        }
    viz.save_png(out / "overview.png", overview_picture(panels, cfg.parts))
    config = {
        "weights": str(cfg.weights),
        "arch": backbone_arch(fp32_model),
        "patch_size": patch,
        "checkpoint_key": cfg.checkpoint_key,
        "seed": cfg.seed,
        "precision": precision_name(dtype),
        "image_size": cfg.image_size,
        "resize": "shorter side to S, aspect kept (torchvision Resize(S))" if cfg.image_size else "none",
        "crop": "top-left, to a multiple of the patch size",
        "features": "last block's patch tokens after the final norm (CLS, registers and storage tokens dropped)",
        "parts": cfg.parts,
        "foreground": cfg.foreground,
        "threshold": cfg.threshold,
        "fit_patches": cfg.fit_patches,
        "max_tokens": cfg.max_tokens,
        "normalization": norm.record(),
    }
    metrics = {
        "images": len(found),
        "skipped_images": len(unreadable),
        "unreadable": [str(p) for p, _ in unreadable],
        **result.record,
        "overview_images": min(len(found), OVERVIEW_IMAGES),
        "per_image": per_image,
    }
    return PatchesRunResult(
        out,
        metrics,
        config,
        len(found),
        len(unreadable),
        result.record["foreground_fraction"] if result.foreground_used else None,
    )


def _check_size(path: Path, cfg: PatchesRunConfig, patch: int) -> None:
    """Refuse an image the asked size would make more than ``--max-tokens`` tokens, from its header
    (an unreadable one is left to the run, which skips and counts it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - unreadable images are the run's to count
        return
    check_token_count(width, height, cfg.image_size, True, patch, cfg.max_tokens, path)


def _npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _write_image(folder: Path, pics: dict[str, np.ndarray], pic: np.ndarray, result, i: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    viz.save_png(folder / "panel.png", pic)
    viz.save_png(folder / "pca.png", pics["pca"])
    viz.save_png(folder / "foreground.png", pics["foreground"])
    viz.save_png(folder / "first-component.png", pics["first"])
    viz.save_png(folder / "parts.png", pics["parts"])
    _npy(folder / "pca.npy", result.colours[i])
    _npy(folder / "first_component.npy", result.first[i])
    _npy(folder / "foreground.npy", result.foreground[i])
    _npy(folder / "parts.npy", result.parts[i])

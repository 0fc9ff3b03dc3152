"""A run of the attention protocol (DINO Sec. 4.2.2, Fig. 3 and 4; appendix D) in one of three forms,
with its files in the output folder:

* **maps**: each image's per-head CLS attention, head mean and mass-threshold masks as pictures and
  ``maps.npz`` (one folder per image);
* **evaluation**: the attention-mask Jaccard against ground-truth objects (masks or COCO), with
  ``per_image.csv`` and pictures of the best and worst images;
* **video**: the maps of every frame as pictures, ``attention.gif`` and optionally ``attention.mp4``.

:func:`run_attention` reads the inputs, loads the backbone, writes the files and returns the metrics
and the protocol record for ``metrics.json``; the maps and the Jaccard themselves are in
:mod:`dinokit.eval.attention`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import viz
from ..checkpoints import BackboneOptions, prepare_backbone
from ..data.images import DecodeNeed, expand_image_inputs, open_rgb
from ..data.loader import prefetch_map, prefetch_threads
from ..data.masks import GroundTruth, ground_truth_from_coco, ground_truth_from_masks, read_image_list
from ..errors import DataError, DinokitError
from ..io import atomic_write_bytes, atomic_write_text, inert_cell, prepare_output_dir
from ..models.registry import backbone_arch, is_vit
from ..progress import NULL_PROGRESS, Progress
from ..runtime import precision_name
from .attention import (
    AttentionConfig,
    ImageAttention,
    JaccardResult,
    attention_maps,
    attention_need,
    check_attention_model,
    check_token_count,
    evaluate_jaccard,
    evaluation_picture,
    frame_pictures,
    iter_video_frames,
    summarize_maps,
    video_attention,
)

log = logging.getLogger("dinokit")


@dataclass(kw_only=True)
class AttentionRunConfig(AttentionConfig, BackboneOptions):
    """A run of ``dinokit attn``: the backbone, the protocol settings, one form's inputs and the output.

    Exactly one form: ``images`` (maps), ``images_dir`` with ``masks`` or ``coco`` (evaluation), or
    ``video``.
    """

    output: Path
    images: list[str] | None = None  #: maps form: images, folders or glob patterns
    images_dir: Path | None = None  #: evaluation form: the folder of images
    masks: Path | None = None  #: ground-truth label PNGs named like the images
    coco: Path | None = None  #: or ground truth from a COCO annotation file
    objects: str = "instance"  #: COCO objects: instance, or class (instances of a category merged)
    binary_masks: bool = False  #: any nonzero mask pixel is one foreground object
    ignore_void: bool = False  #: void (255) pixels leave every Jaccard's union
    image_list: Path | None = None  #: evaluate only the images named in this file
    video: Path | None = None  #: video form: a folder of frames or a video file
    fps: float | None = None  #: frame rate of the GIF/MP4 (default: the file's, or 10)
    mp4: bool = False  #: also write attention.mp4
    overwrite: bool = False  #: write into an output folder that already holds results


@dataclass
class AttentionRunResult:
    """What a run wrote: its form, the numbers and the protocol record for ``metrics.json``."""

    form: str  #: maps, evaluation or video
    output: Path
    metrics: dict
    config: dict
    heads: int
    images: int = 0
    frames: int = 0
    fps: float | None = None
    skipped: int = 0  #: unreadable images skipped
    jaccard: JaccardResult | None = None  #: the evaluation form's scores


# -- inputs ----------------------------------------------------------------------------------------
def check_run_config(cfg: AttentionRunConfig) -> str:
    """The form the config asks for; one sentence naming the option for a config that is not one form."""
    forms = [bool(cfg.images), cfg.images_dir is not None, cfg.video is not None]
    if sum(forms) == 0:
        raise DinokitError(
            "Give images to draw maps of, --images with --masks or --coco to evaluate, or --video."
        )
    if sum(forms) > 1:
        raise DinokitError("Use one form at a time: positional images, --images (evaluation) or --video.")
    if cfg.images_dir is None and (cfg.masks is not None or cfg.coco is not None):
        raise DinokitError("--masks and --coco belong to the evaluation form; give the images with --images.")
    if cfg.images_dir is not None and (cfg.masks is None) == (cfg.coco is None):
        raise DinokitError("The evaluation form needs exactly one of --masks DIR or --coco ANNOTATIONS.json.")
    if not 0.0 < cfg.threshold <= 1.0:
        raise DinokitError(f"--attention-mass must be a fraction in (0, 1], not {cfg.threshold}.")
    if cfg.objects not in ("instance", "class"):
        raise DinokitError(f"--objects must be instance or class, not {cfg.objects!r}.")
    if cfg.images_dir is not None and not cfg.images_dir.is_dir():
        raise DinokitError(f"The image folder {cfg.images_dir} does not exist.")
    if cfg.masks is not None and not cfg.masks.is_dir():
        raise DinokitError(f"The mask folder {cfg.masks} does not exist.")
    if cfg.coco is not None and not cfg.coco.is_file():
        raise DinokitError(f"The annotation file {cfg.coco} does not exist.")
    if cfg.video is not None and not cfg.video.exists():
        raise DinokitError(f"The video {cfg.video} does not exist.")
    if cfg.image_list is not None and not cfg.image_list.is_file():
        raise DinokitError(f"The image list {cfg.image_list} does not exist.")
    return "video" if cfg.video is not None else "evaluation" if cfg.images_dir is not None else "maps"


def load_attention_ground_truth(cfg: AttentionRunConfig) -> list[GroundTruth]:
    """The evaluation form's images with their objects, from label PNGs or a COCO file."""
    ids = read_image_list(cfg.image_list) if cfg.image_list is not None else None
    assert cfg.images_dir is not None, "check_run_config: the evaluation form has --images"
    if cfg.coco is not None:
        return ground_truth_from_coco(cfg.images_dir, cfg.coco, objects=cfg.objects, image_list=ids)
    assert cfg.masks is not None, "check_run_config: --masks or --coco"
    return ground_truth_from_masks(cfg.images_dir, cfg.masks, binary=cfg.binary_masks, image_list=ids)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def unique_names(paths: list[Path]) -> list[str]:
    """A folder name per image: its stem, made unique with the parent folder or a number."""
    stems = [_safe_name(Path(str(p)).stem) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out, used = [], set()
    for p, s in zip(paths, stems):
        name = s if counts[s] == 1 else _safe_name(f"{Path(str(p)).parent.name}_{s}")
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def resize_record(cfg: AttentionConfig) -> str:
    """How the run resized its images, in words for ``metrics.json``."""
    if not cfg.image_size:
        return "none"
    if cfg.keep_aspect:
        return "torchvision Resize(S): shorter side S, aspect kept, bilinear"
    return "torchvision Resize((S, S)), bilinear"


@contextlib.contextmanager
def _remove_if_left_empty(out: Path, created: bool):
    """A run refused on its first image leaves no empty output folder behind."""
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


# -- the run ---------------------------------------------------------------------------------------
def run_attention(cfg: AttentionRunConfig, progress: Progress = NULL_PROGRESS) -> AttentionRunResult:
    """Check the form, read its inputs (a bad path is reported before anything is loaded or created),
    load the backbone, then compute and write the form's maps or scores into ``cfg.output``."""
    form = check_run_config(cfg)
    paths = None
    if form == "maps":
        assert cfg.images, "check_run_config: the maps form has images"
        paths = expand_image_inputs(cfg.images)
    items = load_attention_ground_truth(cfg) if form == "evaluation" else None
    prepared = prepare_backbone(cfg)  # seeds first: --weights random is the same network on every run
    model = prepared.model
    patch_size = check_attention_model(model)
    assert is_vit(model), "prepare_backbone builds dinokit's ViT, the backbone with attention maps"
    model.max_tokens = cfg.max_tokens
    if paths is not None:  # every image's size is checked before any map is computed or written
        _check_token_counts(paths, cfg, patch_size)
    record = {
        "weights": str(cfg.weights),
        "arch": backbone_arch(model),
        "patch_size": patch_size,
        "heads": int(model.num_heads),
        "checkpoint_key": cfg.checkpoint_key,
        "seed": cfg.seed,
        "precision": precision_name(prepared.dtype),
        "normalization": prepared.normalization.record(),
    }
    created = not cfg.output.exists()
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    with _remove_if_left_empty(out, created):
        if form == "video":
            return _run_video(model, cfg, out, record, progress)
        if form == "evaluation":
            assert items is not None
            return _run_evaluation(items, model, cfg, out, record, progress)
        assert paths is not None
        return _run_maps(paths, model, cfg, out, record, progress)


def _check_token_counts(paths: list[Path], cfg: AttentionRunConfig, patch_size: int) -> None:
    """Refuse an image that ``--image-size`` would make more than ``--max-tokens`` tokens, from the
    image headers alone (an unreadable one is left to the run, which skips it)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - unreadable images are the run's to count
            continue
        check_token_count(width, height, cfg.image_size, cfg.keep_aspect, patch_size, cfg.max_tokens, path)


def _run_maps(
    paths: list[Path], model, cfg: AttentionRunConfig, out: Path, record: dict, progress: Progress
) -> AttentionRunResult:
    names = dict(zip(paths, unique_names(paths)))
    per_image = {}
    unreadable: list[tuple[Path, str]] = []
    need = attention_need(cfg.image_size, cfg.keep_aspect, cfg.exact_decode)
    readable = readable_images(paths, cfg.strict, unreadable, need)
    for res in attention_maps(model, readable, cfg, progress, total=len(paths)):
        name = names[res.path]
        write_image_maps(
            out / name, res, cfg.threshold, photo_aspect=bool(cfg.image_size) and not cfg.keep_aspect
        )
        per_image[name] = {"source": str(res.path), **summarize_maps(res)}
    if not per_image:
        first = unreadable[0][1].rstrip(".")
        raise DataError(
            first if len(paths) == 1 else f"None of the {len(paths)} images could be read ({first})."
        )
    config = {
        **record,
        "form": "maps",
        "image_size": cfg.image_size,
        "threshold": cfg.threshold,
        "keep_aspect": cfg.keep_aspect,
        "resize": resize_record(cfg),
        "colormap": "viridis",
        "crop": "top-left, to a multiple of the patch size",
        "pictures": "overlays, masks and grid at the photo's aspect ratio",
    }
    metrics = {
        "images": len(per_image),
        "per_image": per_image,
        "skipped_images": len(unreadable),
        "unreadable": [str(p) for p, _ in unreadable],
    }
    return AttentionRunResult(
        "maps", out, metrics, config, heads=record["heads"], images=len(per_image), skipped=len(unreadable)
    )


def readable_images(
    paths: list[Path],
    strict: bool,
    unreadable: list[tuple[Path, str]],
    need: DecodeNeed | None = None,
    threads: int | None = None,
):
    """(path, image) of each readable image, in order, decoded a few images ahead in ``threads``
    threads (None: as many as the thread plan leaves) at the reduced scale ``need`` allows; an
    unreadable one is skipped and added to ``unreadable`` with the reader's sentence (the rule of
    every command), or with ``strict`` stops the run."""

    def read(path: Path) -> tuple[Path, Image.Image | DataError]:
        try:
            return path, open_rgb(path, need)
        except DataError as e:
            return path, e

    threads = prefetch_threads(torch.device("cpu")) if threads is None else threads
    for path, image in prefetch_map(read, paths, threads, ahead=2 * threads):
        if isinstance(image, DataError):
            if strict:
                raise image
            log.warning("skipping unreadable image %s", path)
            unreadable.append((path, str(image)))
            continue
        yield path, image


def write_image_maps(folder: Path, res: ImageAttention, threshold: float, photo_aspect: bool = True) -> None:
    """One image's pictures and its raw maps and masks as ``maps.npz``.

    ``image.png``, ``attn-head<h>.png`` and ``attn-mean.png`` are what the network saw and its maps
    (network resolution); ``overlay-head<h>.png`` and ``overlay-mean.png`` blend each map over the
    photo, ``masks.png`` draws every head's mask over it with a key of the head colours, and
    ``grid.png`` holds the input, the mean, the masks and every head in a grid fitted to the number of
    heads. With ``photo_aspect`` the overlays, masks and grid are shown at the photo's own proportions
    (a square network input is stretched back); ``masks.png`` is enlarged to at least 220 pixels wide
    so that its key stays readable.
    """
    p = res.patch_size
    folder.mkdir(parents=True, exist_ok=True)
    viz.save_png(folder / "image.png", res.image)

    def shown(pic: np.ndarray) -> np.ndarray:
        return viz.to_aspect(pic, res.original_size) if photo_aspect and all(res.original_size) else pic

    overlays = []
    for h, m in enumerate(res.maps):
        full = viz.upsample_nearest(m, p)
        viz.save_png(folder / f"attn-head{h}.png", viz.apply_colormap(full, "viridis"))
        overlay = shown(viz.blend_heatmap(res.image, full, "viridis"))
        viz.save_png(folder / f"overlay-head{h}.png", overlay)
        overlays.append(overlay)
    mean_full = viz.upsample_nearest(res.mean_map, p)
    viz.save_png(folder / "attn-mean.png", viz.apply_colormap(mean_full, "viridis"))
    mean_overlay = shown(viz.blend_heatmap(res.image, mean_full, "viridis"))
    viz.save_png(folder / "overlay-mean.png", mean_overlay)
    heads = len(res.masks)
    colors = viz.distinct_colors(heads)
    head_names = [f"head {h}" for h in range(heads)]
    masks_pic = shown(
        viz.overlay_masks(res.image, viz.upsample_nearest(res.masks, p), colors, alpha=0.5, thickness=2)
    )
    big = viz.enlarge(masks_pic, 220)
    key = viz.legend(colors, head_names, big.shape[1], font_size=max(13, viz.caption_size(big.shape[1])))
    viz.save_png(folder / "masks.png", viz.stack_vertical([big, key]))
    top = viz.make_grid(
        [shown(res.image), mean_overlay, masks_pic],
        ["input", "mean of heads", f"masks, {threshold:.0%} of the mass"],
        cols=3,
    )
    _, cols = viz.grid_shape(heads, masks_pic.shape[1] / masks_pic.shape[0], header=3)
    grid = viz.make_grid(overlays, head_names, cols=cols)
    width = max(top.shape[1], grid.shape[1])
    key = viz.legend(
        colors, head_names, width, font_size=max(13, viz.caption_size(viz.enlarge(overlays[0], 160).shape[1]))
    )
    viz.save_png(folder / "grid.png", viz.stack_vertical([top, grid, key]))
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        attention=res.maps.astype(np.float32),
        masks=res.masks,
        mean=res.mean_map.astype(np.float32),
        patch_size=np.int64(p),
        threshold=np.float64(threshold),
        input_size=np.asarray(res.image.shape[:2], dtype=np.int64),
    )
    atomic_write_bytes(folder / "maps.npz", buf.getvalue())


def _run_evaluation(
    items: list[GroundTruth], model, cfg: AttentionRunConfig, out: Path, record: dict, progress: Progress
) -> AttentionRunResult:
    result = evaluate_jaccard(model, items, cfg, ignore_void=cfg.ignore_void, progress=progress)
    coco = cfg.coco is not None
    config = {
        **record,
        "form": "evaluation",
        "images": str(cfg.images_dir),
        "ground_truth": "coco" if coco else "masks",
        "masks": str(cfg.masks) if cfg.masks is not None else None,
        "coco": str(cfg.coco) if coco else None,
        "image_list": str(cfg.image_list) if cfg.image_list is not None else None,
        "objects": cfg.objects if coco else ("binary" if cfg.binary_masks else "label values"),
        "binary_masks": cfg.binary_masks,
        "ignore_void": cfg.ignore_void,
        "image_size": cfg.image_size,
        "threshold": cfg.threshold,
        "keep_aspect": cfg.keep_aspect,
        "ground_truth_resize": (
            "none"
            if not cfg.image_size
            else "PIL nearest to the resized image's size"
            if cfg.keep_aspect
            else "PIL nearest to (S, S)"
        ),
        "image_resize": resize_record(cfg),
        "crop": "top-left, to a multiple of the patch size",
        "ties": "equal attention values are taken in patch order",
        "protocol": "per object the best head's Jaccard; mean over the image's objects; mean over images",
    }
    write_evaluation_files(out, result, items, cfg, int(model.patch_size))
    return AttentionRunResult(
        "evaluation",
        out,
        result.metrics(),
        config,
        heads=record["heads"],
        images=result.images,
        jaccard=result,
    )


def write_evaluation_files(
    out: Path, result: JaccardResult, items: list[GroundTruth], cfg: AttentionConfig, patch_size: int
) -> None:
    """``per_image.csv`` (each image's Jaccard and per-head scores) and ``pictures/`` of the best and
    worst images."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "jaccard", "objects", *[f"head{h}" for h in range(len(result.jaccard_per_head))]])
    for s in result.per_image:
        w.writerow([inert_cell(s.name), f"{s.jaccard:.6f}", s.objects, *[f"{v:.6f}" for v in s.per_head]])
    atomic_write_text(out / "per_image.csv", buf.getvalue())
    for kind, entries in (("best", result.best), ("worst", result.worst)):
        for rank, (score, index, grid) in enumerate(entries, 1):
            item = items[index]
            pic = evaluation_picture(item, grid, cfg, patch_size, score)
            viz.save_png(out / "pictures" / f"{kind}-{rank}-{_safe_name(item.name)}.png", pic)


def frame_name(source, index: int, from_folder: bool, used: set[str]) -> str:
    """The output name of a video frame: the frame file's stem for a folder of frames (as ``davis``
    names its masks), the frame number (``00000``) for a video file; made unique with the number."""
    name = _safe_name(Path(str(source)).stem) if from_folder else f"{index:05d}"
    if name in used:
        name = f"{name}-{index:05d}"
    used.add(name)
    return name


def _run_video(
    model, cfg: AttentionRunConfig, out: Path, record: dict, progress: Progress
) -> AttentionRunResult:
    """Each frame's head-mean map and masks as PNGs, and both side by side as an animated GIF (and MP4)."""
    assert cfg.video is not None, "check_run_config: the video form has --video"
    frames, total, file_fps = iter_video_frames(cfg.video)
    fps = cfg.fps or file_fps or 10.0
    from_folder = Path(cfg.video).is_dir()
    used: set[str] = set()
    n = 0
    with contextlib.ExitStack() as stack:
        gif = stack.enter_context(viz.GifWriter(out / "attention.gif", fps=fps))
        mp4 = stack.enter_context(viz.Mp4Writer(out / "attention.mp4", fps=fps)) if cfg.mp4 else None
        for res in video_attention(model, frames, cfg, progress, total=total):
            name = frame_name(res.path, n, from_folder, used)
            heat, overlay = frame_pictures(res)
            viz.save_png(out / "maps" / f"{name}.png", heat)
            viz.save_png(out / "masks" / f"{name}.png", overlay)
            side = np.concatenate([overlay, np.full((overlay.shape[0], 4, 3), 255, np.uint8), heat], axis=1)
            gif.add(side)
            if mp4 is not None:
                mp4.add(side)
            n += 1
    config = {
        **record,
        "form": "video",
        "video": str(cfg.video),
        "image_size": cfg.image_size,
        "resize": "shorter side to S, aspect kept" if cfg.image_size else "none",
        "threshold": cfg.threshold,
        "fps": fps,
        "colormap": "inferno",
    }
    files = ["attention.gif", "maps/", "masks/"] + (["attention.mp4"] if cfg.mp4 else [])
    config["frame_names"] = "the frame files' names" if from_folder else "frame numbers"
    metrics = {"frames": n, "patch_size": int(model.patch_size), "files": files}
    return AttentionRunResult("video", out, metrics, config, heads=record["heads"], frames=n, fps=fps)

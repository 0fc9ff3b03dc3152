"""``dinokit attn``: self-attention maps of images, their Jaccard against ground-truth objects, and
attention over a video."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from dinokit.errors import DinokitError

from ._common import (
    Arch,
    BatchSize,
    CheckpointKey,
    Device,
    NumWorkers,
    Output,
    Overwrite,
    PatchSize,
    Precision,
    Quiet,
    RichProgress,
    Seed,
    Weights,
    console,
    print_table,
    setup_logging,
)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def _unique_names(paths: list[Path]) -> list[str]:
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


def _load_model(weights, arch, patch_size, checkpoint_key):
    import dinokit
    from dinokit.eval.attention import check_attention_model

    model = dinokit.load_backbone(weights, arch=arch, patch_size=patch_size, checkpoint_key=checkpoint_key)
    check_attention_model(model)
    return model


def _model_config(model, weights, checkpoint_key) -> dict:
    from dinokit.models.registry import backbone_arch

    return {
        "weights": str(weights),
        "arch": backbone_arch(model),
        "patch_size": int(model.patch_size),
        "heads": int(model.num_heads),
        "checkpoint_key": checkpoint_key,
    }


def _write_npz(path: Path, **arrays) -> None:
    from dinokit.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# -- the three forms -----------------------------------------------------------------------------
def run_maps(paths: list[Path], model, cfg, out: Path, model_cfg: dict, progress) -> dict:
    from dinokit import viz
    from dinokit.eval.attention import attention_maps, summarize_maps
    from dinokit.io import write_metrics

    names = dict(zip(paths, _unique_names(paths)))
    p = int(model.patch_size)
    per_image = {}
    for res in attention_maps(model, paths, cfg, progress, total=len(paths)):
        name = names[res.path]
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        viz.save_png(d / "image.png", res.image)
        head_pics = []
        for h, m in enumerate(res.maps):
            pic = viz.apply_colormap(viz.upsample_nearest(m, p), "viridis")
            viz.save_png(d / f"attn-head{h}.png", pic)
            head_pics.append(pic)
        mean_pic = viz.apply_colormap(viz.upsample_nearest(res.mean_map, p), "viridis")
        viz.save_png(d / "attn-mean.png", mean_pic)
        colors = viz.distinct_colors(len(res.masks))
        overlay = viz.overlay_masks(res.image, viz.upsample_nearest(res.masks, p), colors, alpha=0.5, thickness=2)
        viz.save_png(d / "masks.png", overlay)
        tiles = [res.image, mean_pic, overlay, *head_pics]
        labels = ["input", "mean of heads", f"masks ({cfg.threshold:.0%} mass)"] + [f"head {h}" for h in range(len(head_pics))]
        viz.save_png(d / "grid.png", viz.make_grid(tiles, labels, cols=min(5, len(tiles))))
        _write_npz(
            d / "maps.npz",
            attention=res.maps.astype(np.float32),
            masks=res.masks,
            mean=res.mean_map.astype(np.float32),
            patch_size=np.int64(p),
            threshold=np.float64(cfg.threshold),
            input_size=np.asarray(res.image.shape[:2], dtype=np.int64),
        )
        per_image[name] = {"source": str(res.path), **summarize_maps(res)}
    config = {**model_cfg, "form": "maps", "image_size": cfg.image_size, "threshold": cfg.threshold,
              "colormap": "viridis", "crop": "top-left, to a multiple of the patch size"}
    write_metrics(out, {"images": len(per_image), "per_image": per_image}, config)
    return {"images": len(per_image), "heads": model_cfg["heads"]}


def load_ground_truth(images_dir: Path, masks: Optional[Path], coco: Optional[Path], objects: str,
                      binary_masks: bool, image_list: Optional[Path]):
    from dinokit.data.masks import ground_truth_from_coco, ground_truth_from_masks, read_image_list

    ids = read_image_list(image_list) if image_list is not None else None
    if coco is not None:
        return ground_truth_from_coco(images_dir, coco, objects=objects, image_list=ids)
    return ground_truth_from_masks(images_dir, masks, binary=binary_masks, image_list=ids)


def run_eval(items, images_dir: Path, masks: Optional[Path], coco: Optional[Path], model, cfg, out: Path,
             model_cfg: dict, objects: str, binary_masks: bool, ignore_void: bool, image_list: Optional[Path],
             progress):
    from dinokit import viz
    from dinokit.eval.attention import evaluate_jaccard, evaluation_picture
    from dinokit.io import atomic_write_text, write_metrics

    result = evaluate_jaccard(model, items, cfg, ignore_void=ignore_void, progress=progress)
    config = {
        **model_cfg,
        "form": "evaluation",
        "images": str(images_dir),
        "ground_truth": "coco" if coco is not None else "masks",
        "masks": str(masks) if masks is not None else None,
        "coco": str(coco) if coco is not None else None,
        "image_list": str(image_list) if image_list is not None else None,
        "objects": objects if coco is not None else ("binary" if binary_masks else "label values"),
        "binary_masks": binary_masks,
        "ignore_void": ignore_void,
        "image_size": cfg.image_size,
        "threshold": cfg.threshold,
        "ground_truth_resize": "PIL nearest to (S, S)" if cfg.image_size else "none",
        "image_resize": "torchvision Resize((S, S)), bilinear" if cfg.image_size else "none",
        "crop": "top-left, to a multiple of the patch size",
        "ties": "equal attention values are taken in patch order",
        "protocol": "per object the best head's Jaccard; mean over the image's objects; mean over images",
    }
    write_metrics(out, result.metrics(), config)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "jaccard", "objects", *[f"head{h}" for h in range(len(result.jaccard_per_head))]])
    for s in result.per_image:
        w.writerow([s.name, f"{s.jaccard:.6f}", s.objects, *[f"{v:.6f}" for v in s.per_head]])
    atomic_write_text(out / "per_image.csv", buf.getvalue())
    pics = out / "pictures"
    p = int(model.patch_size)
    for kind, entries in (("best", result.best), ("worst", result.worst)):
        for rank, (score, index, grid) in enumerate(entries, 1):
            item = items[index]
            pic = evaluation_picture(item, grid, cfg, p, score)
            viz.save_png(pics / f"{kind}-{rank}-{_safe_name(item.name)}.png", pic)
    return result


def run_video(video: Path, model, cfg, out: Path, model_cfg: dict, fps: Optional[float], mp4: bool, progress) -> dict:
    from dinokit import viz
    from dinokit.eval.attention import frame_pictures, iter_video_frames, video_attention
    from dinokit.io import write_metrics

    frames, total, file_fps = iter_video_frames(video)
    fps = fps or file_fps or 10.0
    p = int(model.patch_size)
    n = 0
    with contextlib.ExitStack() as stack:
        gif = stack.enter_context(viz.GifWriter(out / "attention.gif", fps=fps))
        mp4w = stack.enter_context(viz.Mp4Writer(out / "attention.mp4", fps=fps)) if mp4 else None
        for res in video_attention(model, frames, cfg, progress, total=total):
            heat, overlay = frame_pictures(res)
            viz.save_png(out / "maps" / f"{n:05d}.png", heat)
            viz.save_png(out / "masks" / f"{n:05d}.png", overlay)
            side = np.concatenate([overlay, np.full((overlay.shape[0], 4, 3), 255, np.uint8), heat], axis=1)
            gif.add(side)
            if mp4w is not None:
                mp4w.add(side)
            n += 1
    config = {**model_cfg, "form": "video", "video": str(video), "image_size": cfg.image_size,
              "resize": "shorter side to S, aspect kept" if cfg.image_size else "none",
              "threshold": cfg.threshold, "fps": fps, "colormap": "inferno"}
    files = ["attention.gif", "maps/", "masks/"] + (["attention.mp4"] if mp4 else [])
    write_metrics(out, {"frames": n, "patch_size": p, "files": files}, config)
    return {"frames": n, "fps": fps}


@contextlib.contextmanager
def _remove_if_left_empty(out: Path, created: bool):
    """A run refused on its first image leaves no empty output folder behind."""
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


# -- the command ---------------------------------------------------------------------------------
def attn(
    images: Annotated[
        Optional[list[str]],
        typer.Argument(help="Images, folders or glob patterns to draw attention maps of (the maps form).",
                       show_default=False),
    ] = None,
    weights: Weights = ...,
    output: Output = ...,
    arch: Arch = None,
    patch_size: PatchSize = None,
    checkpoint_key: CheckpointKey = "teacher",
    image_size: Annotated[
        int,
        typer.Option("--image-size", min=0,
                     help="Resize images to (S, S) (video frames: shorter side S) before cropping to a multiple "
                     "of the patch size; 0 keeps the original size."),
    ] = 480,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Fraction of each head's attention mass its mask keeps (0-1].")
    ] = 0.6,
    images_dir: Annotated[
        Optional[Path],
        typer.Option("--images", help="Evaluation form: the folder of images to score against ground truth."),
    ] = None,
    masks: Annotated[
        Optional[Path],
        typer.Option("--masks", help="Ground-truth masks named like the images (indexed/8-bit PNGs: 0 background, "
                     "255 void, other values objects)."),
    ] = None,
    coco: Annotated[
        Optional[Path], typer.Option("--coco", help="Ground truth from a COCO annotation file (polygons or RLE).")
    ] = None,
    objects: Annotated[
        str, typer.Option("--objects", help="COCO objects: instance, or class (instances of a category merged).")
    ] = "instance",
    binary_masks: Annotated[
        bool, typer.Option("--binary-masks", help="Read any nonzero mask pixel as one foreground object.")
    ] = False,
    ignore_void: Annotated[
        bool, typer.Option("--ignore-void", help="Leave void (255) pixels out of every Jaccard's union.")
    ] = False,
    image_list: Annotated[
        Optional[Path],
        typer.Option("--image-list", help="Evaluate only the images named in this file, one per line "
                     "(e.g. VOC's ImageSets/Segmentation/val.txt)."),
    ] = None,
    video: Annotated[
        Optional[Path],
        typer.Option("--video", help="Video form: a folder of frames or a video file (files need dinokit\\[video])."),
    ] = None,
    fps: Annotated[
        Optional[float], typer.Option("--fps", min=0.1, help="Frame rate of the GIF/MP4 (default: the file's, or 10).")
    ] = None,
    mp4: Annotated[bool, typer.Option("--mp4", help="Also write attention.mp4 (needs dinokit\\[video]).")] = False,
    batch_size: BatchSize = 8,
    num_workers: NumWorkers = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Self-attention maps of the last block's CLS token (DINO Fig. 1/3), masked at a fraction of the
    attention mass; with --images and --masks/--coco, the paper's attention-mask Jaccard; with --video,
    the maps of every frame as pictures and an animated GIF."""
    from dinokit.eval.attention import AttentionConfig
    from dinokit.io import prepare_output_dir
    from dinokit.runtime import precision_name, resolve_device, resolve_precision, seed_everything

    setup_logging(quiet)
    forms = [bool(images), images_dir is not None, video is not None]
    if sum(forms) == 0:
        raise DinokitError("Give images to draw maps of, --images with --masks or --coco to evaluate, or --video.")
    if sum(forms) > 1:
        raise DinokitError("Use one form at a time: positional images, --images (evaluation) or --video.")
    if images_dir is None and (masks is not None or coco is not None):
        raise DinokitError("--masks and --coco belong to the evaluation form; give the images with --images.")
    if images_dir is not None and (masks is None) == (coco is None):
        raise DinokitError("The evaluation form needs exactly one of --masks DIR or --coco ANNOTATIONS.json.")
    if not 0.0 < threshold <= 1.0:
        raise DinokitError(f"--threshold must be a fraction in (0, 1], not {threshold}.")
    if objects not in ("instance", "class"):
        raise DinokitError(f"--objects must be instance or class, not {objects!r}.")
    if images_dir is not None and not images_dir.is_dir():
        raise DinokitError(f"The image folder {images_dir} does not exist.")
    if masks is not None and not masks.is_dir():
        raise DinokitError(f"The mask folder {masks} does not exist.")
    if coco is not None and not coco.is_file():
        raise DinokitError(f"The annotation file {coco} does not exist.")
    if video is not None and not video.exists():
        raise DinokitError(f"The video {video} does not exist.")
    if image_list is not None and not image_list.is_file():
        raise DinokitError(f"The image list {image_list} does not exist.")

    from dinokit.data.images import expand_image_inputs

    # read the inputs first: a bad path is reported before anything is loaded or created
    paths = expand_image_inputs(images) if images else None
    items = (load_ground_truth(images_dir, masks, coco, objects, binary_masks, image_list)
             if images_dir is not None else None)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev, training=False)
    seed_everything(seed)  # --weights random is then the same network on every run
    model = _load_model(weights, arch, patch_size, checkpoint_key)
    model_cfg = _model_config(model, weights, checkpoint_key)
    model_cfg["seed"] = seed
    created = not output.exists()
    out = prepare_output_dir(output, overwrite=overwrite)
    with _remove_if_left_empty(out, created):
        cfg = AttentionConfig(image_size=image_size or None, threshold=threshold, batch_size=batch_size,
                              num_workers=num_workers, device=dev, dtype=dtype)
        model_cfg["precision"] = precision_name(dtype)
        with RichProgress(quiet=quiet) as progress:
            if video is not None:
                info = run_video(video, model, cfg, out, model_cfg, fps, mp4, progress)
                console.print(f"Wrote {info['frames']} frames and attention.gif to {out}.")
            elif images_dir is not None:
                r = run_eval(items, images_dir, masks, coco, model, cfg, out, model_cfg, objects, binary_masks, ignore_void,
                             image_list, progress)
                rows = [["Jaccard (best head per object)", r.jaccard], [f"best single head ({r.best_head})",
                        r.jaccard_per_head[r.best_head]]]
                rows += [[f"head {h}", v] for h, v in enumerate(r.jaccard_per_head)]
                print_table(f"Attention-mask Jaccard: {r.images} images, {r.objects} objects", ["", "Jaccard"], rows)
                if r.images_without_objects:
                    console.print(f"{r.images_without_objects} images without any object were skipped.")
                console.print(f"Results in {out / 'metrics.json'}.")
            else:
                info = run_maps(paths, model, cfg, out, model_cfg, progress)
                console.print(f"Wrote the attention maps of {info['images']} images ({info['heads']} heads) to {out}.")


def register(app: typer.Typer, synth_app: typer.Typer) -> None:
    app.command("attn")(attn)

"""``dinokit segment --head RUN/head.pth IMAGES...``: a trained linear segmentation head applied to new
images of any size (aspect kept: the shorter side resized to the head's image size, the sliding
window, the logits brought back to the photo's size)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoints import BackboneOptions, prepare_backbone, read_checkpoint
from ..checkpoints.backbone import given_normalization
from ..data.images import expand_image_inputs, read_image_or_skip
from ..data.normalization import IMAGENET, Normalization, check_normalization
from ..data.seg_transforms import eval_input
from ..errors import CheckpointError, DataError
from ..io import prepare_output_dir, write_json
from ..progress import NULL_PROGRESS, Progress
from ..runtime import RuntimeOptions, resolve_precision
from ..viz import save_png
from .seg_head import SegmentationHead, check_backbone, predict_labels
from .seg_outputs import comparison_picture, overlay, save_label_png
from .segmentation import HEAD_FORMAT, backbone_fingerprint

log = logging.getLogger("dinokit")


@dataclass
class PredictConfig(BackboneOptions, RuntimeOptions):
    head: Path
    output: Path
    images: list[Path] = field(default_factory=list)
    overwrite: bool = False


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    skipped: int = 0
    classes: list[str] = field(default_factory=list)


def load_head(path: str | Path) -> tuple[SegmentationHead, dict]:
    """A head.pth of ``dinokit segment`` (read with weights_only) as a module in eval mode, and its record."""
    ck = read_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("format") != HEAD_FORMAT:
        raise CheckpointError(f"{path} is not a head.pth written by dinokit segment.")
    head = SegmentationHead(int(ck["in_channels"]), int(ck["num_classes"]))
    head.load_state_dict(ck["head"])
    return head.eval(), ck


def predict_images(cfg: PredictConfig, progress: Progress = NULL_PROGRESS) -> PredictResult:
    """Label PNGs (``OUT/STEM.png``, the classes as palette indices) and pictures (``OUT/pictures/``:
    photo | prediction, and the overlay) for each image; the backbone must be the head's."""
    head, record = load_head(cfg.head)
    paths = expand_image_inputs(cfg.images)
    if not paths:
        raise DataError("Give the images (files or folders) to segment.")
    check_normalization(cfg.mean, cfg.std)
    theirs = record["backbone"]
    weights = cfg.weights or theirs.get("weights")
    arch = cfg.arch or (theirs.get("arch") if weights == "random" else None)
    patch = cfg.patch_size or (theirs.get("patch_size") if weights == "random" else None)
    backbone = prepare_backbone(BackboneOptions(weights=weights, arch=arch, patch_size=patch,
                                                checkpoint_key=cfg.checkpoint_key, model_kwargs=cfg.model_kwargs),
                                cfg)  # fmt: skip
    model = check_backbone(backbone.model)
    mine = backbone_fingerprint(model, weights)
    if mine["state"] != theirs["state"]:
        raise CheckpointError(
            f"{cfg.head} was trained on another backbone ({theirs['arch']} from {theirs['weights']}) than --weights "
            f"{weights} ({mine['arch']}, other weight values); give the weights (and --seed for random weights) the head "
            "was trained on."
        )
    prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    device, dtype = backbone.device, resolve_precision(cfg.precision, backbone.device, training=False)
    head = head.to(device)
    size, stride, blocks, classes = (
        int(record["image_size"]),
        int(record["stride"]),
        int(record["blocks"]),
        record["classes"],
    )
    result = PredictResult(classes=list(classes))
    saved = record.get("normalisation") or {}
    norm = Normalization(
        tuple(saved.get("mean", IMAGENET.mean)),
        tuple(saved.get("std", IMAGENET.std)),
        str(saved.get("source", "the head's record")),
    )  # the normalisation the head was trained with
    norm = given_normalization(norm, cfg.mean, cfg.std)  # --mean/--std on top
    task = progress.task("segmenting", total=len(paths))
    for i, path in enumerate(paths):
        decoded = read_image_or_skip(path, None, cfg.strict)
        task.advance(1)
        if decoded is None:
            result.skipped += 1
            continue
        w, h = decoded.image.size
        x = eval_input(decoded.image, size, norm)[None].to(device)
        pred = predict_labels(model, head, x, (h, w), size, stride, blocks, dtype).numpy()
        stem = path.stem if sum(p.stem == path.stem for p in paths) == 1 else f"{path.stem}_{i}"
        save_label_png(pred, cfg.output / f"{stem}.png")
        photo = np.asarray(decoded.image)
        comparison_picture(photo, None, pred, classes, cfg.output / "pictures" / f"{stem}.png")
        save_png(cfg.output / "pictures" / f"{stem}_overlay.png", overlay(photo, pred))
        result.written.append(cfg.output / f"{stem}.png")
    task.close()
    write_json(cfg.output / "predictions.json", {"head": str(cfg.head), "classes": list(classes),
                                                 "images": [str(p) for p in paths], "skipped": result.skipped,
                                                 "normalization": norm.record()})  # fmt: skip
    return result


__all__ = ["PredictConfig", "PredictResult", "load_head", "predict_images"]

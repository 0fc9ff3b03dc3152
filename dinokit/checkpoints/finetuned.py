"""The classifiers' files: a fine-tuned model (``model.pth`` / ``best.pth`` of dinokit finetune: backbone,
head and class names) and the weights of a linear probe."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.head import FinetuneModel
from ..models.registry import build_backbone
from ..presets import LINEAR_PRESETS, fetch_preset_file
from .backbone import backbone_state_dict
from .conversion import extract_backbone_state_dict, infer_arch, strip_prefixes
from .reading import read_checkpoint, require_finite_weights

FINETUNED_MODEL_FORMAT = "dinokit-finetuned"
#: the resumable training state of a fine-tuning run (its checkpoint.pth), refused where a model is expected
FINETUNE_CHECKPOINT_FORMAT = "dinokit-finetune-checkpoint"


def export_finetuned(
    model: nn.Module, classes: Sequence[str], spec: dict, image_size: int, extra: dict
) -> dict:
    """The ``model.pth`` layout (plain tensors, strings and numbers; ``weights_only``-safe):

    ``format`` ("dinokit-finetuned"), ``version`` (1), ``backbone`` (flat backbone state dict, the
    released-weights names), ``head`` (``weight`` (K, D), ``bias`` (K,)), ``classes`` (K names in
    label order), ``arch``, ``patch_size``, ``image_size`` (the crop size), ``resize_size``,
    ``mean``, ``std``, and run facts (``epoch``, ``val_top1``, ...).
    """
    # torchvision (behind data.transforms) stays out of `import dinokit` for start-up time
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for

    m = getattr(model, "module", model)  # the model inside a DistributedDataParallel
    assert isinstance(m, FinetuneModel)
    return {
        "format": FINETUNED_MODEL_FORMAT,
        "version": 1,
        "backbone": backbone_state_dict(m.backbone),
        "head": {k: v.detach().cpu().clone() for k, v in m.head.state_dict().items()},
        "classes": list(classes),
        "arch": spec["arch"],
        "patch_size": spec["patch_size"],
        "image_size": int(image_size),
        "resize_size": resize_for(image_size),
        # the normalisation the run used (the weights' own, or --mean/--std), which predict reads back
        "mean": list(spec.get("normalization", {}).get("mean", IMAGENET_MEAN)),
        "std": list(spec.get("normalization", {}).get("std", IMAGENET_STD)),
        **extra,
    }


def load_finetuned(path: str | os.PathLike) -> tuple[FinetuneModel, dict]:
    """A fine-tuned model (eval mode, CPU) and its file's metadata, from ``model.pth`` / ``best.pth``
    (or a run folder, meaning its ``model.pth``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pth").is_file():
            raise CheckpointError(f"{path} holds no model.pth; give the model file a fine-tuning run wrote.")
        path = path / "model.pth"
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == FINETUNE_CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a fine-tuning checkpoint for resuming; give the run's model.pth or best.pth instead."
        )
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FINETUNED_MODEL_FORMAT):
        raise CheckpointError(
            f"{path} is not a dinokit fine-tuned model (it has no classifier head and class names); "
            "make one with dinokit finetune."
        )
    try:
        sd = extract_backbone_state_dict(ckpt, source=str(path))
        arch, patch, extra = infer_arch(sd)
        backbone = build_backbone(arch, patch, **extra)
        backbone.load_state_dict(sd, strict=True)
        head = ckpt["head"]
        classes = list(ckpt["classes"])
        model = FinetuneModel(backbone, len(classes))
        model.head.load_state_dict(head, strict=True)
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"{path} is a damaged dinokit fine-tuned model ({str(e).splitlines()[0]})."
        ) from e
    meta = {k: v for k, v in ckpt.items() if k not in ("backbone", "head")}
    return model.eval(), meta


def load_linear_head(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A linear-probe state dict (``linear.weight``, ``linear.bias``) from a file or a preset name."""
    weights = str(weights)
    if weights in LINEAR_PRESETS and not Path(weights).exists():
        path = fetch_preset_file(LINEAR_PRESETS[weights], weights + " linear head")
    else:
        path = Path(weights).expanduser()
    ckpt = read_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold linear-probe weights.")
    sd = strip_prefixes(sd)
    if "linear.weight" not in sd and "weight" in sd and "bias" in sd:
        sd = {"linear.weight": sd["weight"], "linear.bias": sd["bias"]}
    w, b = sd.get("linear.weight"), sd.get("linear.bias")
    if not (
        isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.ndim == 2 and b.shape == w.shape[:1]
    ):
        raise CheckpointError(
            f"{path} does not hold linear-probe weights (a linear.weight matrix and its linear.bias)."
        )
    require_finite_weights({"linear.weight": w, "linear.bias": b}, str(path))
    return {"linear.weight": w, "linear.bias": b}

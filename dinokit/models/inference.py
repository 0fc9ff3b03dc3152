"""Casting a model for inference: bf16 weights once instead of autocast on every call."""

from __future__ import annotations

import copy

import torch

from .vit import VisionTransformer


def _cast_floating_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        return args, kwargs

    return hook


def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Cast a model's weights to ``dtype`` once, for inference; returns the same module (in place).

    The fast way to run bf16 inference on a CPU: autocast keeps fp32 weights and converts every
    weight and many activations on every call, which on a CPU costs about as much as the bf16
    matrix products save. A model cast here runs in bf16 end to end (LayerNorm and softmax still
    accumulate in fp32 inside their kernels). ``None`` or fp32 leaves the model as it is.

    The model is put in eval mode with gradients off. ViTs accept fp32 images unchanged (the patch
    embedding casts them); other models get a forward pre-hook that casts floating inputs. Outputs
    are in ``dtype``: call ``.float()`` on them before comparing or storing. Do not train a cast
    model; cast a copy (``copy.deepcopy``) if the fp32 weights are still needed.
    """
    model.eval()
    if dtype is None or dtype == torch.float32:
        return model
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if not isinstance(model, VisionTransformer) and not getattr(model, "_dinokit_cast_hook", None):
        hook = model.register_forward_pre_hook(_cast_floating_inputs(dtype), with_kwargs=True)
        # a plain attribute on the model: Module.__getattr__'s type knows only tensors and submodules
        model._dinokit_cast_hook = hook  # type: ignore[assignment]
    return model


def inference_model(
    model: torch.nn.Module, dtype: torch.dtype | None
) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The model to run inference with at ``dtype``, and the autocast dtype still needed around it.

    bf16 gets a copy cast once with :func:`cast_for_inference` (the caller's fp32 model is left as it
    is) and no autocast; a model already in ``dtype`` runs as it is; fp16 keeps autocast.
    """
    if dtype is None:
        return model, None
    if next(model.parameters()).dtype == dtype:
        return model, None
    if dtype == torch.bfloat16:
        return cast_for_inference(copy.deepcopy(model), dtype), None
    return model, dtype

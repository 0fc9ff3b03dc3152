"""Casting a model for bf16 inference: a ViT and other models, the copy inference_model makes."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import dinokit
from dinokit.models.inference import cast_for_inference, inference_model


def test_cast_for_inference_runs_a_vit_in_bf16_on_fp32_images():
    torch.manual_seed(0)
    ref = dinokit.build_backbone("vit_tiny", 16, depth=2)
    model = cast_for_inference(copy.deepcopy(ref), torch.bfloat16)
    assert not model.training and all(
        p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters()
    )
    x = torch.randn(3, 3, 48, 64)
    with torch.inference_mode():
        out = model(x)
        expected = ref.eval()(x)
        attn = model.get_cls_attention(x)
    assert out.dtype == torch.bfloat16
    assert F.cosine_similarity(out.float(), expected, dim=1).min() > 0.99
    assert attn.shape == (3, 3, 12)
    assert cast_for_inference(ref, None) is ref and ref.pos_embed.dtype == torch.float32


def test_cast_for_inference_casts_the_inputs_of_other_models():
    torch.manual_seed(0)  # a ResNet-like stack (the hook does not depend on the depth)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    model = cast_for_inference(copy.deepcopy(ref), torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out, expected = model(x), ref(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16)
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)
    cast_for_inference(model, torch.bfloat16)  # a second cast adds no second hook
    assert len(model._forward_pre_hooks) == 1


def test_inference_model_casts_a_copy_for_bf16_and_keeps_autocast_for_fp16():
    torch.manual_seed(0)
    m = dinokit.build_backbone("vit_tiny", 16, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        cast, ac = inference_model(m, torch.bfloat16)
        assert ac is None and cast is not m
        assert next(cast.parameters()).dtype == torch.bfloat16
        assert next(m.parameters()).dtype == torch.float32  # the caller's model is untouched
        assert torch.allclose(cast(x).float(), ref, atol=0.1)
    assert inference_model(cast, torch.bfloat16) == (cast, None)  # already cast: used as it is
    assert inference_model(m, None) == (m, None)
    assert inference_model(m, torch.float16) == (m, torch.float16)

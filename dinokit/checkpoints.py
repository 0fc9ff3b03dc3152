"""Every checkpoint format in and out.

Reads (always with ``torch.load(weights_only=True)``, never unpickling arbitrary objects):
1. released backbone weights: a flat state dict of the teacher backbone;
2. full training checkpoints (the reference trainer's and dinokit's): ``student`` / ``teacher``
   dicts with ``module.`` / ``backbone.`` / ``head.`` prefixes and an ``argparse.Namespace``;
3. linear-probe weights ``{"state_dict": {"module.linear.weight", ...}}`` (:func:`load_linear_head`);
4. timm state dicts (DINO's ViTs, ``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``,
   ``vit_*_patch16_dinov3``) and dinokit's own files (``{"backbone": ..., "arch": ...}``);
   the official DINOv2 hub files and DINOv3 release files are case 1;
5. Hugging Face transformers DINO, DINOv2 (with and without registers) and DINOv3 checkpoints
   (``pytorch_model.bin`` or ``model.safetensors``, or the folder holding one);
6. fine-tuned models, backbone + classifier head + class names (:func:`load_finetuned`).
Writes dinokit's own files atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, DinokitError
from .io import torch_save_atomic
from .models.head import FinetuneModel
from .models.registry import VIT_SHAPES, build_backbone, canonical_arch, is_vit_arch
from .models.vit import DINO_VARIANTS, RopeEmbedding, swiglu_hidden
from .presets import (
    LINEAR_PRESETS,
    PRESETS,
    fetch_hf_weights,
    fetch_preset_file,
    is_hf_repo_id,
    resolve_preset,
)
from .runtime import RuntimeOptions, inference_model, resolve_device, resolve_precision, seed_everything

log = logging.getLogger("dinokit")


# ---------------------------------------------------------------------------------------------
# Reading files safely
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without unpickling arbitrary objects.

    ``.safetensors`` files go through safetensors; everything else through
    ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allowed beyond plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The weights file {path} does not exist.")
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin", "backbone.pth", "checkpoint.pth"):
            if (path / candidate).is_file():
                return read_checkpoint(path / candidate)
        raise CheckpointError(f"The folder {path} holds no weights file (model.safetensors, pytorch_model.bin, ...).")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a safetensors file; install the optional extra with: pip install 'dinokit[safetensors]'."
            ) from e
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if not any("Weights only load failed" in ln for ln in lines):
            # a plain unpickling failure: the bytes are not a pickle at all
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}).") from e
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
        detail = f" ({detail.rstrip('.')})" if detail else ""
        raise CheckpointError(
            f"{path} holds Python objects beyond plain weights{detail}; dinokit refuses to unpickle it "
            "because that could run code."
        ) from e
    except Exception as e:  # zip, EOF, key and value errors of a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}).") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].rstrip(".") if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def file_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def state_dict_fingerprint(sd: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes and values (for caches keyed on weights)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k]
        h.update(k.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().to("cpu").contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(str(t.dtype).encode())
            # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------
# dinokit/timm name <-> Hugging Face ViTModel name; {i} is a block index, {p} weight or bias
_HF_NAMES = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
]


def _name_rule(source: str, target: str) -> tuple[str, str]:
    """A (regex, replacement) pair from two name templates ({i} comes before {p} in both)."""
    pattern = "^" + re.escape(source).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", "(weight|bias)") + "$"
    groups = iter(range(1, 3))
    repl = re.sub(r"\{[ip]\}", lambda _: f"\\{next(groups)}", target)
    return pattern, repl


# the names Dinov2Model / Dinov2WithRegistersModel (encoder.layer.*) and DINOv3ViTModel (layer.*) add
_HF_DINOV2_NAMES = [
    ("register_tokens", "embeddings.register_tokens"),
    ("blocks.{i}.norm1.{p}", "encoder.layer.{i}.norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layer.{i}.norm2.{p}"),
    ("blocks.{i}.ls1.gamma", "encoder.layer.{i}.layer_scale1.lambda1"),
    ("blocks.{i}.ls2.gamma", "encoder.layer.{i}.layer_scale2.lambda1"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.mlp.w12.{p}", "encoder.layer.{i}.mlp.weights_in.{p}"),
    ("blocks.{i}.mlp.w3.{p}", "encoder.layer.{i}.mlp.weights_out.{p}"),
]
_HF_DINOV3_NAMES = [
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.{p}"),
    ("blocks.{i}.norm1.{p}", "layer.{i}.norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "layer.{i}.norm2.{p}"),
    ("blocks.{i}.attn.proj.{p}", "layer.{i}.attention.o_proj.{p}"),
    ("blocks.{i}.ls1.gamma", "layer.{i}.layer_scale1.lambda1"),
    ("blocks.{i}.ls2.gamma", "layer.{i}.layer_scale2.lambda1"),
    ("blocks.{i}.mlp.w1.{p}", "layer.{i}.mlp.gate_proj.{p}"),  # gated: silu(gate) * up
    ("blocks.{i}.mlp.up.{p}", "layer.{i}.mlp.up_proj.{p}"),  # fc1 of a plain MLP, w2 of a gated one
    ("blocks.{i}.mlp.down.{p}", "layer.{i}.mlp.down_proj.{p}"),
    ("norm.{p}", "norm.{p}"),
]
_HF_RULES = [_name_rule(hf, ours) for ours, hf in _HF_NAMES + _HF_DINOV2_NAMES + _HF_DINOV3_NAMES]
_TO_HF_RULES = [_name_rule(ours, hf) for ours, hf in _HF_NAMES]
_HF_QKV = re.compile(
    r"^(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)"
    r"|layer\.(\d+)\.attention\.(q|k|v)_proj)\.(weight|bias)$"
)
_QKV_PART = {"q": "query", "k": "key", "v": "value"}


def is_hf_state_dict(sd: dict) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in _strip_hf_prefix(sd))


def _strip_hf_prefix(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for prefix in ("vit.", "dino.", "model.", "dinov2.", "dinov3_vit."):
            if k.startswith(prefix) and (k[len(prefix) :].startswith(("embeddings.", "encoder.", "layernorm.",
                                                                          "layer.", "norm."))):  # fmt: skip
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


def convert_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``ViTModel`` (facebook/dino-*), ``Dinov2Model``, ``Dinov2WithRegistersModel``
    or ``DINOv3ViTModel`` state dict onto dinokit/timm names (DINOv3's MLP names are settled by
    :func:`normalize_dino_state_dict`)."""
    sd = _strip_hf_prefix(sd)
    out: dict[str, torch.Tensor] = OrderedDict()
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _HF_QKV.match(k)
        if m:
            block, part = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), _QKV_PART[m.group(4)])
            qkv.setdefault((block, m.group(5)), {})[part] = v
            continue
        for pattern, repl in _HF_RULES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
        # anything else (pooler, classifier, mask_token) is not part of the backbone
    for (i, kind), parts in qkv.items():
        if kind == "bias" and set(parts) == {"query", "value"}:  # DINOv3 has no key bias: it is zero
            parts["key"] = torch.zeros_like(parts["query"])
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"The Hugging Face checkpoint lacks part of layer {i}'s attention.")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_hf_state_dict` (for exporting and for tests)."""
    out: dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", k)
        if m:
            q, kk, vv = v.chunk(3, dim=0)
            for name, part in (("query", q), ("key", kk), ("value", vv)):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{name}.{m.group(2)}"] = part.clone()
            continue
        for pattern, repl in _TO_HF_RULES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = v
                break
    return out


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    out = OrderedDict()
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _map_weight_norm_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """The newer parametrization API names weight-norm parameters differently; map to the old names."""
    out = OrderedDict()
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_backbone_state_dict(ckpt: Any, checkpoint_key: str = "teacher", source: str = "the checkpoint") -> dict:
    """The backbone's flat state dict from any supported checkpoint layout."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} does not hold a state dict (found a {type(ckpt).__name__}).")
    sd: Any = ckpt
    if checkpoint_key and checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
        sd = ckpt[checkpoint_key]
    elif "teacher" in ckpt or "student" in ckpt:
        present = [k for k in ("teacher", "student") if k in ckpt]
        raise CheckpointError(f"{source} has no {checkpoint_key!r} weights; use --checkpoint-key {present[0]}.")
    elif isinstance(ckpt.get("backbone"), dict):
        sd = ckpt["backbone"]
    else:
        for key in ("model", "state_dict", "model_state"):
            if isinstance(ckpt.get(key), dict):
                sd = ckpt[key]
                break
    if not _is_tensor_dict(sd):
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not sd:
        raise CheckpointError(f"{source} holds no tensors that could be backbone weights.")
    if is_hf_state_dict(sd):
        hf = normalize_dino_state_dict(convert_hf_state_dict(sd), source)
        require_finite_weights(hf, source)
        return hf
    sd = _strip_prefixes(sd)
    stripped = OrderedDict(
        (k, v) for k, v in sd.items() if not k.startswith(("head.", "fc.", "fc_norm.", "last_layer.", "mlp."))
    )
    if all(k.startswith("linear.") for k in sd):
        raise CheckpointError(
            f"{source} holds linear-probe weights, not a backbone; pass it as --linear-weights and give the "
            "backbone with --weights."
        )
    if not stripped:
        raise CheckpointError(f"{source} holds a projection head only, not backbone weights.")
    stripped = normalize_dino_state_dict(stripped, source)
    require_finite_weights(stripped, source)
    return stripped


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def normalize_dino_state_dict(sd: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """DINOv2 / DINOv3 layouts (official hub and release files, timm, transformers after
    :func:`convert_hf_state_dict`) onto the names of :class:`~dinokit.models.vit.VisionTransformer`.

    Drops what evaluation never uses (``mask_token``, ``local_cls_norm``); storage tokens and timm's
    ``reg_token`` become ``register_tokens``; timm's ``gamma_1/2`` the LayerScales; a masked key bias
    (DINOv3's ``bias_mask``) or timm's separate ``q_bias``/``v_bias`` one qkv bias with the key part
    zero; the SwiGLU halves (DINOv3's ``w1``/``w2``, timm's ``fc1_g``/``fc1_x`` or packed ``fc1``) one
    ``w12``. timm's register models keep the CLS position in the CLS token: their table gets a zero
    CLS entry back. A DINOv3 release file must carry its RoPE periods; timm and transformers do not
    store them, so the standard ones are computed. A v1 state dict passes through unchanged.
    """
    keys = set(sd)
    official_v3 = "storage_tokens" in keys
    if not (official_v3 or "reg_token" in keys or "register_tokens" in keys or "mask_token" in keys
            or any(".ls1.gamma" in k or ".gamma_1" in k or ".mlp." in k and (".w12." in k or ".w1." in k
                   or ".up." in k or ".fc1_g." in k) for k in keys)):  # fmt: skip
        return sd
    out: dict[str, torch.Tensor] = OrderedDict()
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "mask_token" or k.startswith("local_cls_norm."):
            continue
        if k in ("storage_tokens", "reg_token"):
            out["register_tokens"] = v
            continue
        m = _BLOCK_KEY.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            out[k] = v
    if "reg_token" in keys and "pos_embed" in out:
        pos = out["pos_embed"]
        side = int(round(math.sqrt(pos.shape[1])))
        if side * side == pos.shape[1]:  # timm's no_embed_class table: patches only
            out["pos_embed"] = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), dim=1)
    for i in sorted(blocks):
        for name, v in _normalize_block(blocks[i]).items():
            out[f"blocks.{i}.{name}"] = v
    is_v3 = "pos_embed" not in out and "register_tokens" in out
    if is_v3 and "rope_embed.periods" not in out:
        if official_v3:
            raise CheckpointError(
                f"{source} is a DINOv3 checkpoint without its RoPE periods (rope_embed.periods); the file is "
                "incomplete or was cut down, so the patch positions cannot be encoded."
            )
        dim = int(out["cls_token"].shape[-1]) if "cls_token" in out else 0
        if dim and dim % 64 == 0:  # every DINOv3 ViT has 64-dimensional heads
            out["rope_embed.periods"] = RopeEmbedding(64).periods.clone()
    return out


def _normalize_block(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One block's weights in dinokit's names (see :func:`normalize_dino_state_dict`)."""
    b = dict(b)
    for old, new in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
        if old in b:
            b[new] = b.pop(old)
    mask = b.pop("attn.qkv.bias_mask", None)
    if mask is not None and "attn.qkv.bias" in b:
        b["attn.qkv.bias"] = b["attn.qkv.bias"] * mask.to(b["attn.qkv.bias"].dtype)
    if "attn.q_bias" in b and "attn.v_bias" in b:
        q, v = b.pop("attn.q_bias"), b.pop("attn.v_bias")
        b["attn.qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
    b.pop("attn.k_bias", None)
    gated = any(k.startswith(("mlp.w1.", "mlp.fc1_g.")) for k in b)
    for p in ("weight", "bias"):
        gate = b.pop(f"mlp.w1.{p}", None) if "mlp.w1." + p in b else b.pop(f"mlp.fc1_g.{p}", None)
        if gate is not None:
            up = b.pop(f"mlp.w2.{p}", None) if f"mlp.w2.{p}" in b else b.pop(f"mlp.fc1_x.{p}", None)
            if up is None:
                up = b.pop(f"mlp.up.{p}", None)
            if up is not None:
                b[f"mlp.w12.{p}"] = torch.cat((gate, up))
        if f"mlp.up.{p}" in b:  # transformers' plain DINOv3 MLP
            b[f"mlp.fc1.{p}"] = b.pop(f"mlp.up.{p}")
        if f"mlp.down.{p}" in b:
            b[f"mlp.w3.{p}" if gated else f"mlp.fc2.{p}"] = b.pop(f"mlp.down.{p}")
        if gated and f"mlp.fc2.{p}" in b:  # timm's SwiGLU output layer
            b[f"mlp.w3.{p}"] = b.pop(f"mlp.fc2.{p}")
    fc1, fc2 = b.get("mlp.fc1.weight"), b.get("mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:  # timm's packed SwiGLU
        for p in ("weight", "bias"):
            if f"mlp.fc1.{p}" in b:
                b[f"mlp.w12.{p}"] = b.pop(f"mlp.fc1.{p}")
            if f"mlp.fc2.{p}" in b:
                b[f"mlp.w3.{p}"] = b.pop(f"mlp.fc2.{p}")
    return b


def require_finite_weights(sd: dict[str, Any], source: str = "the checkpoint") -> None:
    """Refuse weights holding NaN or inf: every feature and score computed from them would be NaN (or
    a meaningless number), so they are stopped where they are loaded."""
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source} holds non-finite values (NaN or inf) in {key}; the file is damaged or the training "
                "diverged."
            )


def infer_arch(sd: dict[str, torch.Tensor]) -> tuple[str, int | None, dict]:
    """(arch, patch_size, extra constructor kwargs) from a backbone state dict (in dinokit's names,
    see :func:`normalize_dino_state_dict`)."""
    if "patch_embed.proj.weight" in sd and ("pos_embed" in sd or "rope_embed.periods" in sd):
        w = sd["patch_embed.proj.weight"]
        patch = int(w.shape[-1])
        dim = int(w.shape[0])
        depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        if "rope_embed.periods" in sd or "blocks.0.ls1.gamma" in sd or "register_tokens" in sd:
            return _infer_dino_variant(sd, patch, dim, depth)
        n = sd["pos_embed"].shape[1] - 1
        side = int(round(n**0.5))
        extra: dict[str, Any] = {"img_size": side * patch}
        arch = next((a for a, s in VIT_SHAPES.items() if s["embed_dim"] == dim), None)
        if arch is None or depth != VIT_SHAPES[arch]["depth"]:
            arch = arch or "vit_small"
            extra.update(embed_dim=dim, depth=depth, num_heads=max(1, dim // 64))
        return arch, patch, extra
    if "conv1.weight" in sd and any(k.startswith("layer4.") for k in sd):
        return "resnet50", None, {}
    sample = ", ".join(list(sd)[:3])
    raise CheckpointError(f"The weights are not a ViT or ResNet-50 backbone (keys such as {sample}).")


def _infer_dino_variant(sd: dict[str, torch.Tensor], patch: int, dim: int, depth: int) -> tuple[str, int, dict]:
    """The DINOv2/v3 variant a state dict holds: its hub name when the shape is one of the released
    models', else the nearest name with the shape spelled out (tiny and custom models)."""
    rope = "rope_embed.periods" in sd
    regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    out_layer = sd.get("blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc2.weight")
    hidden = int(out_layer.shape[1]) if out_layer is not None else None
    heads = max(1, dim // (4 * int(sd["rope_embed.periods"].numel()))) if rope else max(1, dim // 64)
    extra: dict[str, Any] = {}
    if not rope:
        side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        extra["img_size"] = side * patch
    if "blocks.0.attn.qkv.bias" not in sd:
        extra["qkv_bias"] = False
    if "blocks.0.ls1.gamma" not in sd:
        extra["layerscale"] = None
    family = "dinov3_" if rope else "dinov2_"
    near = []  # same family, registers, width and feed-forward kind: a cut-down or custom model
    for name, spec in DINO_VARIANTS.items():
        if not name.startswith(family):
            continue
        if rope and spec["num_register_tokens"] != regs or not rope and bool(regs) != name.endswith("_reg"):
            continue
        if spec["embed_dim"] != dim or (spec.get("ffn") == "swiglu") != swiglu:
            continue
        near.append(name)
        if (spec["depth"], spec["num_heads"], spec["patch_size"]) != (depth, heads, patch):
            continue
        if hidden is not None and hidden != _variant_hidden(spec):
            continue
        return name, patch, extra
    base = "dinov3_vits16" if rope else "dinov2_vits14_reg" if regs else "dinov2_vits14"
    base = near[0] if near else base
    extra.update(embed_dim=dim, depth=depth, num_heads=heads, ffn="swiglu" if swiglu else "mlp",
                 num_register_tokens=regs)  # fmt: skip
    if hidden is not None:
        extra["ffn_hidden_dim"] = hidden
    return base, patch, extra


def _variant_hidden(spec: dict) -> int:
    dim, ratio = spec["embed_dim"], spec.get("mlp_ratio", 4.0)
    return swiglu_hidden(dim, ratio) if spec.get("ffn") == "swiglu" else int(dim * ratio)


def describe(arch: str, patch: int | None) -> str:
    return arch if patch is None else f"{arch} with patch size {patch}"


# ---------------------------------------------------------------------------------------------
# The backbone every command uses: one definition of its options, one function that makes it
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BackboneOptions:
    """Which backbone a command runs: the weight fields every config shares (one definition).

    ``weights`` is a file, a preset name or ``"random"``; arch and patch size are inferred from the
    weights when None and checked against them when given.
    """

    weights: str | None = None
    arch: str | None = None
    patch_size: int | None = None
    checkpoint_key: str = "teacher"  #: which weights of a training checkpoint: teacher or student
    model_kwargs: dict = field(default_factory=dict)  #: extra constructor arguments (tiny test models)


@dataclass
class PreparedBackbone:
    """A loaded backbone in fp32 on its device, in eval mode, with the compute precision to use."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None  #: the precision resolved for the command (None = fp32)

    def for_inference(self) -> tuple[nn.Module, torch.dtype | None]:
        """The model to run frozen: a copy cast once to bf16/fp16 where asked (see
        :func:`dinokit.runtime.inference_model`), else the fp32 model."""
        return inference_model(self.model, self.dtype)


def weights_needed(purpose: str = "") -> str:
    """The sentence for a command run without ``--weights``: which weights to give. Random weights
    are a baseline asked for by name, never what a forgotten option silently means."""
    presets = ", ".join(list(PRESETS)[:5])
    return (
        f"Give --weights{' ' + purpose if purpose else ''}: a checkpoint file, a preset ({presets}) "
        "or 'random' for a randomly initialised baseline."
    )


def prepare_backbone(cfg: BackboneOptions, runtime: RuntimeOptions | None = None, *, training: bool = False,
                     missing: str | None = None) -> PreparedBackbone:
    """Seed, load and place the backbone of ``cfg`` (a config with both option sets, or two objects).

    The seed is set before loading so that ``--weights random`` gives the same network for the
    same ``--seed`` in every command. ``missing`` is the sentence raised when ``cfg.weights`` is None.
    """
    runtime = cfg if runtime is None else runtime
    if cfg.weights is None:
        raise CheckpointError(missing or weights_needed())
    device = resolve_device(runtime.device)
    dtype = resolve_precision(runtime.precision, device, training=training)
    seed_everything(runtime.seed)
    model = load_backbone(cfg.weights, cfg.arch, cfg.patch_size, cfg.checkpoint_key, **cfg.model_kwargs)
    return PreparedBackbone(model.to(device).eval(), device, dtype)


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------
def load_backbone(
    weights: str | os.PathLike = "random",
    arch: str | None = None,
    patch_size: int | None = None,
    checkpoint_key: str = "teacher",
    vit_options: dict | None = None,
    **model_kwargs,
) -> nn.Module:
    """A backbone with weights: a file path, a preset name (e.g. ``dino_vits16``) or ``"random"``.

    Arch and patch size are inferred from the state dict when not given; when given they must
    match it. ``vit_options`` are constructor arguments for a ViT only (a training recipe's
    stochastic depth, whatever backbone the weights turn out to be); ``model_kwargs`` go to any
    backbone and win over them. The model is returned in eval mode on the CPU.
    """
    weights = str(weights)
    if weights == "random":
        arch = arch or "vit_small"
        model = build_backbone(arch, patch_size, **_with_vit_options(arch, vit_options, model_kwargs))
        model.weights_source = "random"
        return model.eval()
    preset = resolve_preset(weights)
    if preset is not None and not Path(weights).exists():
        url_path, p_arch, p_patch = preset
        if arch is not None and canonical_arch(arch) != p_arch:
            raise CheckpointError(
                f"The preset {weights!r} is {describe(p_arch, p_patch)}, but --arch {arch} was asked for."
            )
        if patch_size is not None and p_patch is not None and int(patch_size) != p_patch:
            raise CheckpointError(
                f"The preset {weights!r} is {describe(p_arch, p_patch)}, but --patch-size {patch_size} "
                "was asked for."
            )
        path = fetch_preset_file(url_path, weights)
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            # Only an unreadable file counts as a broken cache entry; a file that reads but does
            # not fit the request is the request's problem and the cached file stays.
            log.warning("the cached file %s does not load (%s); fetching it again", path, e)
            path.unlink(missing_ok=True)
            try:
                path = fetch_preset_file(url_path, weights)
                ckpt = read_checkpoint(path)
            except CheckpointError as e2:
                raise CheckpointError(
                    f"The cached file of preset {weights!r} did not load and was removed, and fetching it "
                    f"again failed: {str(e2).rstrip('.')}."
                ) from e2
        model = _model_from_checkpoint(ckpt, path, arch, patch_size, checkpoint_key, vit_options, model_kwargs)
        model.weights_source = weights
        return model
    path = Path(weights).expanduser()
    if not path.exists() and is_hf_repo_id(weights):  # a local path of that name wins
        path = fetch_hf_weights(weights)
    if not path.exists():
        known = ", ".join(["random", *PRESETS])
        if os.sep in weights or "." in weights:
            raise CheckpointError(f"The weights file {path} does not exist.")
        raise CheckpointError(f"Unknown weights {weights!r}: not a file and not a preset ({known}).")
    model = _model_from_checkpoint(read_checkpoint(path), path, arch, patch_size, checkpoint_key, vit_options,
                                   model_kwargs)  # fmt: skip
    model.weights_source = str(path)
    return model


def _with_vit_options(arch: str, vit_options: dict | None, model_kwargs: dict) -> dict:
    """The constructor arguments of ``arch``: ``vit_options`` apply to a ViT only."""
    if vit_options and is_vit_arch(arch):
        return {**vit_options, **model_kwargs}
    return dict(model_kwargs)


def _model_from_checkpoint(ckpt: Any, path: Path, arch, patch_size, checkpoint_key, vit_options,
                           model_kwargs) -> nn.Module:  # fmt: skip
    sd = extract_backbone_state_dict(ckpt, checkpoint_key, source=str(path))
    sd = _map_weight_norm_keys(sd)
    found_arch, found_patch, extra = infer_arch(sd)
    if arch is not None:
        want = canonical_arch(arch)
        if want != found_arch:
            raise CheckpointError(
                f"{path} holds {describe(found_arch, found_patch)} weights, but --arch {want} was asked for."
            )
    if patch_size is not None and found_patch is not None and int(patch_size) != found_patch:
        raise CheckpointError(
            f"{path} holds {describe(found_arch, found_patch)} weights, but --patch-size {patch_size} was asked for."
        )
    kwargs = {**extra, **_with_vit_options(found_arch, vit_options, model_kwargs)}
    try:
        model = build_backbone(found_arch, found_patch, **kwargs)
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (ValueError, RuntimeError) as e:  # shapes no model of that kind has, or that differ from it
        mismatch = re.search(r"size mismatch for ([^:]+): copying a param with shape (.+?) from checkpoint", str(e))
        detail = f"{mismatch.group(1)} has shape {mismatch.group(2)}" if mismatch else _first_line(e)
        raise CheckpointError(
            f"{path} has tensor shapes that fit no {describe(found_arch, found_patch)} ({detail}); the file is "
            "damaged or was not written for this model."
        ) from e
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys such as {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys such as {unexpected[0]}")
        raise CheckpointError(
            f"{path} does not fit {describe(found_arch, found_patch)}: {'; '.join(parts)}."
        )
    return model.eval()


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
    sd = _strip_prefixes(sd)
    if "linear.weight" not in sd and "weight" in sd and "bias" in sd:
        sd = {"linear.weight": sd["weight"], "linear.bias": sd["bias"]}
    w, b = sd.get("linear.weight"), sd.get("linear.bias")
    if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and w.ndim == 2 and b.shape == w.shape[:1]):
        raise CheckpointError(
            f"{path} does not hold linear-probe weights (a linear.weight matrix and its linear.bias)."
        )
    require_finite_weights({"linear.weight": w, "linear.bias": b}, str(path))
    return {"linear.weight": w, "linear.bias": b}


# ---------------------------------------------------------------------------------------------
# Fine-tuned models (model.pth / best.pth of dinokit finetune)
# ---------------------------------------------------------------------------------------------
FINETUNED_MODEL_FORMAT = "dinokit-finetuned"
#: the resumable training state of a fine-tuning run (its checkpoint.pth), refused where a model is expected
FINETUNE_CHECKPOINT_FORMAT = "dinokit-finetune-checkpoint"


def export_finetuned(model: nn.Module, classes: Sequence[str], spec: dict, image_size: int, extra: dict) -> dict:
    """The ``model.pth`` layout (plain tensors, strings and numbers; ``weights_only``-safe):

    ``format`` ("dinokit-finetuned"), ``version`` (1), ``backbone`` (flat backbone state dict, the
    released-weights names), ``head`` (``weight`` (K, D), ``bias`` (K,)), ``classes`` (K names in
    label order), ``arch``, ``patch_size``, ``image_size`` (the crop size), ``resize_size``,
    ``mean``, ``std``, and run facts (``epoch``, ``val_top1``, ...).
    """
    # torchvision (behind data.transforms) stays out of `import dinokit` for start-up time
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for

    m = model.module if hasattr(model, "module") else model
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
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
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
        raise CheckpointError(f"{path} is a damaged dinokit fine-tuned model ({str(e).splitlines()[0]}).") from e
    meta = {k: v for k, v in ckpt.items() if k not in ("backbone", "head")}
    return model.eval(), meta


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The flat state dict of a backbone (released-weights format), unwrapped from DDP/compile."""
    m = model
    while hasattr(m, "module") or hasattr(m, "_orig_mod"):
        m = getattr(m, "module", None) or m._orig_mod
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in m.state_dict().items())


def save_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a backbone as a flat state dict, the released-weights format, atomically."""
    torch_save_atomic(backbone_state_dict(model), path)


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """Save any dinokit checkpoint atomically (it must hold only what ``weights_only`` can read)."""
    torch_save_atomic(obj, path)


__all__ = [
    "PRESETS",
    "LINEAR_PRESETS",
    "DinokitError",
    "FINETUNED_MODEL_FORMAT",
    "FINETUNE_CHECKPOINT_FORMAT",
    "backbone_state_dict",
    "convert_hf_state_dict",
    "export_finetuned",
    "extract_backbone_state_dict",
    "file_fingerprint",
    "infer_arch",
    "load_backbone",
    "load_finetuned",
    "load_linear_head",
    "read_checkpoint",
    "require_finite_weights",
    "weights_needed",
    "save_backbone",
    "save_checkpoint",
    "state_dict_fingerprint",
    "to_hf_state_dict",
]

"""Key conversion: the state dicts of Hugging Face transformers, timm and the DINOv2 / DINOv3 releases
onto dinokit's names, the backbone's weights out of any checkpoint layout, and the architecture a
state dict holds."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.registry import VIT_SHAPES
from ..models.vit import DINO_VARIANTS, RopeEmbedding, swiglu_hidden
from .reading import require_finite_weights

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
            block, part = (
                (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), _QKV_PART[m.group(4)])
            )
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


def strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """The names without the wrappers' prefixes (``module.``, ``_orig_mod.``, ``backbone.``)."""
    out = OrderedDict()
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def map_weight_norm_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """The newer parametrization API names weight-norm parameters differently; map to the old names."""
    out = OrderedDict()
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        out[k] = v
    return out


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_backbone_state_dict(
    ckpt: Any, checkpoint_key: str = "teacher", source: str = "the checkpoint"
) -> dict:
    """The backbone's flat state dict from any supported checkpoint layout."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} does not hold a state dict (found a {type(ckpt).__name__}).")
    sd: Any = ckpt
    if checkpoint_key and checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
        sd = ckpt[checkpoint_key]
    elif "teacher" in ckpt or "student" in ckpt:
        present = [k for k in ("teacher", "student") if k in ckpt]
        raise CheckpointError(
            f"{source} has no {checkpoint_key!r} weights; use --checkpoint-key {present[0]}."
        )
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
    sd = strip_prefixes(sd)
    stripped: dict[str, torch.Tensor] = OrderedDict(
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


def normalize_dino_state_dict(
    sd: dict[str, torch.Tensor], source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
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


def _infer_dino_variant(
    sd: dict[str, torch.Tensor], patch: int, dim: int, depth: int
) -> tuple[str, int, dict]:
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

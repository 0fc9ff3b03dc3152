"""Optimisers and gradient handling: DINO's parameter groups without weight decay for biases and
1-d parameters, fine-tuning's parameter groups with layer-wise lr decay, AdamW / SGD / LARS,
per-parameter or global gradient clipping, the frozen last layer, and the teacher's EMA update. The
loops run over all parameters at once (``torch._foreach``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import DinokitError
from ..models.registry import is_vit

OPTIMIZERS = ("adamw", "sgd", "lars")


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed) and biases / 1-d parameters (``weight_decay=0``).

    The schedule sets the first group's weight decay every step; cls_token and pos_embed are 3-d and
    so decayed, as in the reference.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def layer_id(name: str, depth: int) -> int:
    """0 for patch_embed / cls_token / pos_embed / register tokens, i + 1 for block i, depth + 1 for the
    rest (norm, head)."""
    name = name.removeprefix("backbone.")
    if name in ("cls_token", "pos_embed", "mask_token", "register_tokens") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_lr_scale(layer: int, depth: int, layer_decay: float) -> float:
    """``layer_decay ** (depth + 1 - layer)``: block i gets d^(L - i), the embeddings d^(L + 1), the head 1."""
    return float(layer_decay ** (depth + 1 - layer))


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of a fine-tuned model (``.backbone`` + ``.head``): one per (layer,
    decayed or not), each with its ``lr_scale`` (layer-wise lr decay, as in BEiT / MAE fine-tuning).

    No weight decay for biases, 1-d parameters (norms) and the backbone's ``no_weight_decay()``
    names (cls_token, pos_embed), as in DeiT.
    """
    backbone = model.backbone
    assert isinstance(backbone, nn.Module), "a fine-tuned model: a backbone and a head"
    vit = is_vit(backbone)
    if not vit and layer_decay != 1.0:
        raise DinokitError("--layer-decay applies to ViT backbones only; leave it at 1 for a ResNet.")
    depth = len(backbone.blocks) if is_vit(backbone) else 0
    no_weight_decay = getattr(backbone, "no_weight_decay", None)
    skip = set(no_weight_decay()) if no_weight_decay is not None else set()
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        bare = name.removeprefix("backbone.")
        no_decay = p.ndim <= 1 or name.endswith(".bias") or bare in skip
        lid = layer_id(name, depth) if vit else (1 if name.startswith("head.") else 0)
        scale = layer_lr_scale(lid, depth, layer_decay) if vit else 1.0
        key = f"layer{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to ``lr * lr_scale`` (the layer-wise decay of :func:`layer_decay_param_groups`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    1-d parameters (biases, norms) get neither weight decay nor the trust-ratio scaling.
    """

    def __init__(
        self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def _fused_ok(params: Sequence[torch.Tensor]) -> bool:
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)) in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )


def build_optimizer(name: str, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (fused where torch supports it), SGD (momentum 0.9) or LARS; lr and wd come from the schedules."""
    name = name.lower()
    params = [p for g in param_groups for p in g["params"]]
    if name == "adamw":
        if _fused_ok(params):
            try:
                return torch.optim.AdamW(param_groups, lr=0.0, fused=True)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(param_groups, lr=0.0, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=0.9, foreach=True)
    if name == "lars":
        return LARS(param_groups)
    raise DinokitError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


@torch.no_grad()
def clip_gradients_per_parameter(params: Iterable[torch.Tensor], clip: float) -> None:
    """Scale each parameter's gradient so that its own L2 norm is at most ``clip`` (the reference's
    clipping: coefficient ``clip / (norm + 1e-6)`` when below 1)."""
    grads = grads_of(params)
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads)).float()
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coef.unbind(), grads)])


@torch.no_grad()
def clip_gradients_global(params: Iterable[torch.Tensor], clip: float) -> None:
    """Scale all gradients together so that their joint L2 norm is at most ``clip``."""
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip, foreach=True)


def cancel_last_layer_gradients(
    last_layer_params: Iterable[torch.Tensor], epoch: int, freeze_last_layer: int
) -> None:
    """During the first ``freeze_last_layer`` epochs the head's last layer gets no update."""
    if epoch >= freeze_last_layer:
        return
    for p in last_layer_params:
        p.grad = None


@torch.no_grad()
def ema_update(
    teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor], momentum: float
) -> None:
    """teacher = m * teacher + (1 - m) * student, over all parameters in two fused calls."""
    teacher, student = list(teacher_params), list(student_params)  # the fused calls take lists
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

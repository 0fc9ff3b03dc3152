"""What the model constructors share: the reference's weight initialisation and argument checks."""

from __future__ import annotations

import numbers

from torch import nn

from ..errors import ModelConfigError


def trunc_normal_init(module: nn.Module) -> None:
    """The reference's init (DINO's ``_init_weights``, as in timm's ViT), for ``model.apply``.

    Linear weights from a normal of std 0.02 truncated at +-2 (absolute, so in effect untruncated),
    Linear biases 0; LayerNorms weight 1, bias 0. Only the Linear weights draw random numbers, one
    layer after the other in ``apply`` order, so a seed gives the same model wherever it is built.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int if it is an integer of at least ``minimum``.

    A non-integer (a float, a string, a bool) is a TypeError; an integer below ``minimum`` is a
    :class:`~dinokit.errors.ModelConfigError` (a ValueError the CLI reports as one sentence).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ModelConfigError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def feature_dim(backbone: nn.Module) -> int:
    """The width of a backbone's output features, its ``num_features`` (a ViT's ``embed_dim``, the
    ResNet-50's 2048)."""
    width = getattr(backbone, "num_features", None)
    if not isinstance(width, int):
        raise ModelConfigError(
            f"{type(backbone).__name__} is not a dinokit backbone: it has no integer num_features."
        )
    return width

"""bf16 copies of a backbone's matrix weights made once per step, with autocast's exact numerics.

Under ``torch.autocast`` every Linear and convolution casts its fp32 weight and bias to bf16 at each
call: the student's casts are cached within the autocast region, but each cast is still one operator
per tensor forward and one per tensor backward, and the teacher's weights (which need no gradient)
are cast again at every forward. On a CPU each small operator costs a parallel region, and a
ViT-S's 50 matrices make a few hundred of them a step.

:class:`ReducedWeights` makes the same copies in one operator: the weights and biases of a
backbone's Linear and Conv2d modules, cast together (the same round-to-nearest-even conversion
autocast applies, so the values are bitwise the same) from one flat buffer that holds them all,
handed to the modules with
``torch.func.functional_call``; autocast leaves a weight that is already bf16 as it is, and casts the
activations as before. Gradients flow back through one operator too: the bf16 gradients of all
matrices cast to fp32 together, each parameter receiving exactly what autocast's cast would have
passed it. The teacher's copy is made once per EMA update (:meth:`ReducedWeights.invalidate` after
the update). Everything else (norms, tokens, the head kept in fp32) is untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def matrix_parameters(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """The weights and biases of ``module``'s Linear and Conv2d layers (what autocast casts to the
    lower precision), by their names in ``module`` (after ``prefix``)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            for pname, p in m.named_parameters(recurse=False):
                out.append((f"{prefix}{name}.{pname}" if name else f"{prefix}{pname}", p))
    return out


class _CastTogether(torch.autograd.Function):
    """The flat buffer ``flat`` (whose views are ``params``) -> its ``dtype`` copy, split into one view
    per parameter. Backward: the gradients concatenated and cast back in one go, each parameter
    receiving its part (exactly what a cast of that parameter alone would pass it)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, dtype: torch.dtype, *params: torch.Tensor):
        ctx.shapes = [p.shape for p in params]
        ctx.src_dtype = flat.dtype
        return tuple(flat.to(dtype).split([p.numel() for p in params]))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        sizes = [int(torch.Size(s).numel()) for s in ctx.shapes]
        if all(g is None for g in grads):
            return (None, None, *[None] * len(grads))
        like = next(g for g in grads if g is not None)
        parts = [g.reshape(-1) if g is not None else like.new_zeros(n) for g, n in zip(grads, sizes)]
        flat = torch.cat(parts).to(ctx.src_dtype)
        return (
            None,
            None,
            *[
                part.view(shape) if g is not None else None
                for g, part, shape in zip(grads, flat.split(sizes), ctx.shapes)
            ],
        )


class ReducedWeights:
    """The matrix weights of ``root``'s sub-module ``part`` (``"backbone"``; ``""``: all of ``root``)
    in ``dtype``, cast in one operator when :meth:`tensors` is asked for them. With ``keep`` (a module
    trained by no gradient, the teacher) the copy is kept until :meth:`invalidate`; otherwise each
    call casts anew, in the autograd graph.

    The parameters are moved into one flat fp32 buffer, of which each becomes a view (the same
    ``Parameter`` objects, so optimisers, state dicts and in-place updates see no difference)."""

    def __init__(self, root: nn.Module, dtype: torch.dtype, part: str = "backbone", keep: bool = False):
        named = matrix_parameters(root.get_submodule(part), f"{part}." if part else "")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dtype = dtype
        self.keep = keep
        self._kept: dict[str, torch.Tensor] | None = None
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            offset = 0
            for p in self.params:
                p.data = self.flat[offset : offset + p.numel()].view(p.shape)
                offset += p.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.keep and self._kept is not None:
            return self._kept
        if self.keep or not torch.is_grad_enabled():
            with torch.no_grad():
                parts = self.flat.to(self.dtype).split([p.numel() for p in self.params])
        else:
            parts = _CastTogether.apply(self.flat, self.dtype, *self.params)
        out = {n: t.view(p.shape) for n, t, p in zip(self.names, parts, self.params)}
        if self.keep:
            self._kept = out
        return out

    def invalidate(self) -> None:
        """The module's weights changed (an EMA update): the next :meth:`tensors` casts them again."""
        self._kept = None

    def __call__(self, module: nn.Module, *args, **kwargs):
        """``module(*args, **kwargs)`` with its matrix weights replaced by the ``dtype`` copies."""
        return torch.func.functional_call(module, self.tensors(), args, kwargs, strict=False)

"""Schedules, parameter groups, clipping and EMA against the spec's formulas written in the test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinokit.models.head import DINOHead, MultiCropWrapper
from dinokit.models.registry import build_backbone
from dinokit.train.optim import (
    LARS,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_parameter,
    ema_update,
    get_params_groups,
)
from dinokit.train.schedules import build_schedules, cosine_scheduler


def spec_value(k, base, final, epochs, iters, warmup, start=0.0):
    """Value k of the spec's schedule, computed on its own (no arrays)."""
    w = int(warmup * iters)
    if k < w:
        return start + (base - start) * k / (w - 1) if w > 1 else base
    n = epochs * iters - w
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (k - w) / n))


@pytest.mark.parametrize("epochs,iters,warmup", [(5, 7, 2), (100, 3, 10), (4, 10, 0)])
def test_cosine_first_end_of_warmup_last(epochs, iters, warmup):
    base, final = 0.5, 1e-3
    sched = cosine_scheduler(base, final, epochs, iters, warmup_epochs=warmup)
    assert len(sched) == epochs * iters
    w = warmup * iters
    points = [0, epochs * iters - 1] + ([w - 1, w] if w else [])
    for k in points:
        assert sched[k] == pytest.approx(
            spec_value(k, base, final, epochs, iters, warmup), rel=1e-12, abs=1e-15
        )
    if w:
        assert sched[0] == 0.0 and sched[w - 1] == pytest.approx(base)  # linspace endpoints included
    assert final < sched[-1] < sched[-2]  # the last value is just above final, still decreasing


def test_dino_schedules_as_the_spec_writes_them():
    epochs, iters, batch = 20, 5, 512
    s = build_schedules(
        epochs=epochs,
        niter_per_epoch=iters,
        global_batch=batch,
        warmup_epochs=10,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=6,
    )
    peak = 5e-4 * batch / 256
    assert s.lr[0] == 0.0
    assert s.lr[10 * iters - 1] == pytest.approx(peak)
    assert s.lr[10 * iters] == pytest.approx(peak)
    assert s.lr[-1] == pytest.approx(spec_value(epochs * iters - 1, peak, 1e-6, epochs, iters, 10))
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(spec_value(99, 0.04, 0.4, 20, 5, 0))
    assert s.momentum[0] == pytest.approx(0.996) and 0.9999 < s.momentum[-1] < 1.0
    assert s.at(0, 0)["teacher_temp"] == pytest.approx(0.04)
    assert s.at(0, 5)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(0, 19)["teacher_temp"] == pytest.approx(0.07)


def tiny_student():
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny", 16, depth=1)
    return MultiCropWrapper(bb, DINOHead(bb.embed_dim, 32, hidden_dim=16, bottleneck_dim=8))


def test_param_groups_no_decay_for_biases_and_1d():
    model = tiny_student()
    decayed, free = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decayed["params"]}
    fn = {names[id(p)] for p in free["params"]}
    assert free["weight_decay"] == 0.0
    assert "backbone.cls_token" in dn and "backbone.pos_embed" in dn  # decayed, as in the reference
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in fn)
    assert all(model.get_parameter(n).ndim > 1 for n in dn)
    assert "head.last_layer.weight_g" not in dn | fn  # frozen gain (norm_last_layer) is not optimised


def _with_grads(seed=0):
    torch.manual_seed(seed)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2, 2))]
    scales = [10.0, 0.01, 3.0]
    for p, s in zip(params, scales):
        p.grad = torch.randn_like(p) * s
    return params


def test_per_parameter_clipping_matches_the_reference_loop():
    params = _with_grads()
    expected = []
    for p in params:
        g = p.grad.clone()
        norm = g.norm(2)
        coef = 3.0 / (norm + 1e-6)
        expected.append(g * coef if coef < 1 else g)
    clip_gradients_per_parameter(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert params[1].grad.norm() < 1  # a small gradient is left alone


def test_global_clipping():
    params = _with_grads(1)
    total = torch.sqrt(sum((p.grad**2).sum() for p in params))
    expected = [p.grad * (3.0 / (total + 1e-6)) for p in params]
    clip_gradients_global(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    t = [torch.randn(3, 3), torch.randn(4)]
    s = [torch.randn(3, 3), torch.randn(4)]
    expected = [0.99 * a + 0.01 * b for a, b in zip(t, s)]
    ema_update(t, s, 0.99)
    for a, e in zip(t, expected):
        torch.testing.assert_close(a, e)


def test_frozen_last_layer_in_first_epoch():
    model = tiny_student()
    ll = [p for n, p in model.named_parameters() if "last_layer" in n and p.requires_grad]
    for p in ll:
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(ll, epoch=1, freeze_last_layer=1)
    assert all(p.grad is not None for p in ll)
    cancel_last_layer_gradients(ll, epoch=0, freeze_last_layer=1)
    assert all(p.grad is None for p in ll)


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([{"params": [w], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    opt.step()
    # trust ratio eta * |w| / |g| = 0.001 * 5 / 1; 1-d parameters take the plain gradient
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.1 * 0.005]]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.95, 0.95]))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizers_build_and_step(name):
    model = tiny_student()
    opt = build_optimizer(name, get_params_groups(model))
    for g in opt.param_groups:
        g["lr"] = 1e-3
    before = model.backbone.patch_embed.proj.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.backbone.patch_embed.proj.weight)

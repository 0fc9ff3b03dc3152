"""Fine-tuning through the library: layer-wise lr decay against its formula, the weight-decay groups,
the head-then-full schedule, and an exact resume after a signal mid epoch."""

from __future__ import annotations

import signal

import numpy as np
import torch

import dinokit
from dinokit.models.head import FinetuneModel
from dinokit.train.finetune import FinetuneConfig, build_schedule, finetune
from dinokit.train.optim import apply_lr, layer_decay_param_groups
from tests.helpers import SignalAfter, assert_same_weights, log_lines


# -- layer-wise learning-rate decay ------------------------------------------------------------------
def expected_scale(name: str, depth: int, d: float) -> float:
    """The documented formula, written out by hand: block i of L -> d^(L - i), embeddings -> d^(L + 1),
    final norm and head -> 1."""
    bare = name.removeprefix("backbone.")
    if bare.startswith("blocks."):
        return d ** (depth - int(bare.split(".")[1]))
    if bare in ("cls_token", "pos_embed") or bare.startswith("patch_embed."):
        return d ** (depth + 1)
    assert bare.startswith(("norm.", "head.")), bare
    return 1.0


def test_layer_decay_gives_each_block_the_formula_lr():
    """Adam's first step moves every weight with a non-zero gradient by exactly its lr (m/sqrt(v) = +-1),
    so the measured step of each tensor is the lr the optimizer actually used for it."""
    torch.manual_seed(0)
    depth, d, lr = 3, 0.6, 1e-3
    model = FinetuneModel(
        dinokit.build_backbone("vit_tiny", 16, depth=depth, img_size=32), 4, head_init_std=0.5
    )
    groups = layer_decay_param_groups(model, weight_decay=0.0, layer_decay=d)
    opt = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=lr, eps=1e-30
    )
    apply_lr(opt, lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(6, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    opt.step()
    seen = set()
    for n, p in model.named_parameters():
        step = (p.detach() - before[n]).abs()
        moved = step[p.grad.abs() > 0]
        assert moved.numel() > 0, n
        want = lr * expected_scale(n, depth, d)
        np.testing.assert_allclose(moved.median().item(), want, rtol=1e-3, err_msg=n)
        seen.add(n.split(".")[1] if n.startswith("backbone.blocks") else n)
    assert {"blocks", "backbone.cls_token", "backbone.pos_embed", "head.weight"} <= seen


def test_weight_decay_skips_biases_norms_and_tokens():
    model = FinetuneModel(dinokit.build_backbone("vit_tiny", 16, depth=2), 3)
    wd = {n: g["weight_decay"] for g in layer_decay_param_groups(model, 0.05, 0.75) for n in g["param_names"]}
    assert wd["backbone.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["head.weight"] == 0.05
    assert wd["backbone.patch_embed.proj.weight"] == 0.05
    for n in ("backbone.cls_token", "backbone.pos_embed", "backbone.blocks.1.norm1.weight", "head.bias",
              "backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight"):  # fmt: skip
        assert wd[n] == 0.0, n


def test_schedule_head_phase_then_warmup_and_cosine(tmp_path):
    cfg = FinetuneConfig(
        train=None, output=tmp_path, epochs=5, head_warmup_epochs=1, warmup_epochs=2, min_lr=1e-6
    )
    s = build_schedule(cfg, niter_per_epoch=4, peak_lr=1e-3)
    assert len(s) == 20
    assert np.all(s[:4] == 1e-3)  # head-only epoch at the peak lr
    np.testing.assert_allclose(s[4:12], np.linspace(0, 1e-3, 8))  # warm-up, endpoints included
    np.testing.assert_allclose(s[12], 1e-3)
    np.testing.assert_allclose(s[-1], 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * 7 / 8)))


def test_signal_mid_epoch_saves_and_resumes_exactly(labelled_folder, tiny2_weights, tmp_path):
    def cfg(out, **kw):
        return FinetuneConfig(
            train=labelled_folder / "train", val=labelled_folder / "val", output=out, weights=str(tiny2_weights),
            epochs=2, batch_size=4, image_size=32, num_workers=0, precision="fp32", device="cpu",
            warmup_epochs=1, lr=0.02, mixup=0.8, randaugment=5, **kw,
        )  # fmt: skip

    straight = finetune(cfg(tmp_path / "a"))
    assert straight.finished
    stopped = finetune(cfg(tmp_path / "b"), progress=SignalAfter(6))  # 4 steps per epoch: mid epoch 2
    assert stopped.signal == signal.SIGTERM and not stopped.finished and stopped.epochs_done == 1
    state = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = finetune(cfg(tmp_path / "b", resume=True))
    assert resumed.finished
    assert_same_weights(tmp_path / "a" / "model.pth", tmp_path / "b" / "model.pth")
    assert log_lines(tmp_path / "a") == log_lines(tmp_path / "b")

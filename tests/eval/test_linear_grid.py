"""DINOv2's and DINOv3's linear protocol: the grid's heads train exactly as heads trained one by one,
their inputs are the official ``create_linear_input``, the cosine is the official per-iteration one,
the head is chosen as the official code chooses it, and a run resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit.eval.features import cls_feature_fn
from dinokit.eval.linear import LinearConfig, default_feature_options, linear_eval
from dinokit.eval.linear_grid import (
    LEARNING_RATES,
    LinearGrid,
    batch_indices,
    choose_head,
    cosine_lr,
    grid_optimizer,
    protocol_heads,
    token_vector,
)
from dinokit.models.head import LinearClassifier


def official_create_linear_input(x_tokens_list, use_n_blocks, use_avgpool):
    """The official function (dinov2 and dinov3 ``eval/linear.py``), re-stated: the CLS tokens of the
    last ``use_n_blocks`` blocks, then the mean of the last block's patch tokens; ``x_tokens_list``
    holds (patch tokens, class token) per block, as ``get_intermediate_layers(..., return_class_token=True)``."""
    last = x_tokens_list[-use_n_blocks:]
    out = torch.cat([cls for _, cls in last], dim=-1)
    if use_avgpool:
        out = torch.cat((out, torch.mean(last[-1][0], dim=1)), dim=-1).reshape(out.shape[0], -1)
    return out.float()


def _token_list(model, x, n):
    """The official (patch tokens, class token) list, from the blocks' outputs through the final norm."""
    return [(o[:, 1:], o[:, 0]) for o in model.get_intermediate_layers(x, n)]


def test_the_official_grids():
    v2 = protocol_heads("dinov2")
    assert (
        len(v2) == 52
        and len(LEARNING_RATES) == 13
        and LEARNING_RATES[0] == 1e-5
        and LEARNING_RATES[-1] == 0.1
    )
    # the official order: blocks, then with/without the mean, then the learning rates
    assert [(h.n_blocks, h.avgpool) for h in v2[::13]] == [(1, False), (1, True), (4, False), (4, True)]
    v3 = protocol_heads("dinov3")
    assert len(v3) == 13 and all(h.n_blocks == 1 and h.avgpool for h in v3)
    assert v2[0].name(128 * 8 / 256) == "classifier_1_blocks_avgpool_False_lr_0_00004"  # the official 8 x 128
    # at one process's batch of 128, 5 decimals would give 1e-5 and 2e-5 (scaled) one name
    assert len({h.name(128 / 256) for h in v2}) == 52 and v2[0].name(0.5).endswith("_lr_5em06")


@pytest.mark.parametrize("arch", ["dinov3_vits16", "dinov2_vits14_reg"])
def test_every_head_reads_the_official_linear_input(arch):
    torch.manual_seed(0)
    m = dinokit.build_backbone(arch, embed_dim=32, depth=4, num_heads=1).eval()
    x = torch.randn(3, 3, 2 * m.patch_size, 3 * m.patch_size)
    with torch.no_grad():
        tokens = token_vector(m, x, 4)
        official = _token_list(m, x, 4)
    grid = LinearGrid(protocol_heads("dinov2", lrs=(0.1,)), 4, 32, 5)
    for spec, sl in zip(grid.specs, grid.slices):
        assert torch.equal(tokens[:, sl], official_create_linear_input(official, spec.n_blocks, spec.avgpool))


def test_v3_features_are_dinov3s_last_block_and_patch_mean():
    torch.manual_seed(0)
    m = dinokit.build_backbone("dinov3_vits16", embed_dim=32, depth=3, num_heads=1).eval()
    x = torch.randn(2, 3, 48, 32)
    n, avg = default_feature_options("dinov3_vits16")
    with torch.no_grad():
        ours = cls_feature_fn(n, avg)(m, x)
        official = official_create_linear_input(_token_list(m, x, 1), use_n_blocks=1, use_avgpool=True)
    assert ours.shape == (2, 64) and torch.allclose(ours, official, atol=1e-6)


def test_grid_heads_equal_heads_trained_one_by_one():
    torch.manual_seed(0)
    k, dim, classes, n, batch, steps = 4, 8, 3, 40, 16, 25
    x = torch.randn(n, (k + 1) * dim)
    y = torch.randint(0, classes, (n,))
    grid = LinearGrid(protocol_heads("dinov2", lrs=(1e-3, 0.1, 1.0)), k, dim, classes)
    start = [{key: v.clone() for key, v in h.state_dict().items()} for h in grid.heads]
    scale = batch / 256
    opt = grid_optimizer(grid, scale)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
    for it in range(steps):
        idx = batch_indices(n, batch, 0, it)
        opt.zero_grad()
        grid.loss(x[idx], y[idx]).backward()
        opt.step()
        sched.step()
    for i, spec in enumerate(grid.specs):
        alone = LinearClassifier(grid.slices[i].stop - grid.slices[i].start, classes)
        alone.load_state_dict(start[i])
        o = torch.optim.SGD(alone.parameters(), lr=spec.lr * scale, momentum=0.9, weight_decay=0)
        s = torch.optim.lr_scheduler.CosineAnnealingLR(o, steps, eta_min=0)
        for it in range(steps):
            idx = batch_indices(n, batch, 0, it)
            o.zero_grad()
            F.cross_entropy(alone(x[idx][:, grid.slices[i]]), y[idx]).backward()
            o.step()
            s.step()
        for a, b in zip(alone.parameters(), grid.heads[i].parameters()):
            assert torch.equal(a, b), spec  # bitwise: summing the losses keeps the gradients apart
        assert not torch.equal(grid.heads[i].linear.weight, start[i]["linear.weight"])  # it did train


def test_the_cosine_is_the_official_per_iteration_one():
    grid = LinearGrid(protocol_heads("dinov3", lrs=(1e-4, 0.02)), 1, 4, 2)
    opt = grid_optimizer(grid, 512 / 256)
    total = 40
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0)
    seen = {}
    for it in range(total + 1):
        seen[it] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for it in (0, 1, 7, 20, 33, 39, 40):  # the formula: lr_t = base * (1 + cos(pi t / T)) / 2
        for lr, base in zip(seen[it], (1e-4 * 2, 0.02 * 2)):
            assert lr == pytest.approx(0.5 * base * (1 + math.cos(math.pi * it / total)), rel=1e-9, abs=1e-15)
            assert lr == pytest.approx(cosine_lr(base, it, total), rel=1e-9, abs=1e-15)


def test_the_head_is_chosen_as_the_official_code_does():
    def official(top1):  # its loop: strictly better than the best so far, from 0
        best, best_acc = "", 0
        for i, acc in enumerate(top1):
            if acc > best_acc:
                best, best_acc = i, acc
        return best

    for top1 in ([10, 30, 30, 20], [5, 5, 5], [1, 2, 3, 99], [50, 10]):
        assert choose_head(top1) == official(top1)


def test_batches_are_an_endless_stream_of_reshuffles():
    n, batch = 10, 4
    stream = torch.cat([batch_indices(n, batch, 3, it) for it in range(5)])  # 20 positions: two whole turns
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(batch_indices(n, batch, 3, 3), stream[12:16])  # any batch on its own


def _run(tmp_path, name, features, **kw):
    train, val = features
    cfg = LinearConfig(
        output=tmp_path / name,
        train_features=train,
        val_features=val,
        protocol="dinov3",
        batch_size=16,
        epoch_length=6,
        epochs=3,
        device="cpu",
        **kw,
    )
    return linear_eval(cfg)


def test_grid_run_records_every_head_and_resumes_exactly(tmp_path, v3_feature_files):
    full = _run(tmp_path, "a", v3_feature_files)
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["linear"]["protocol"] == "dinov3" and len(m["linear"]["heads"]) == 13
    chosen = m["linear"]["chosen"]
    assert chosen == m["linear"]["heads"][choose_head([h["top1"] for h in m["linear"]["heads"]])]
    assert (
        m["linear"]["top1"] == chosen["top1"]
        and chosen["n_last_blocks"] == 1
        and chosen["avgpool_patch_tokens"]
    )
    assert "patch tokens" in m["config"]["tokens"] and m["config"]["epoch_length"] == 6
    stopped = _run(tmp_path, "b", v3_feature_files, stop_after=1)
    assert stopped.epochs_done == 1 and stopped.stopped_by == "stop-after"
    resumed = _run(tmp_path, "b", v3_feature_files, resume=True)
    assert resumed.epochs_done == 3 and resumed.heads == full.heads
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["grid"]
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["grid"]
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def v3_feature_files(tmp_path):
    """Features in the layout of a DINOv3 backbone's last block: CLS then the patch mean, 4 classes."""
    from dinokit.eval.features import save_features
    from tests.helpers import feature_clusters

    for name, n, seed in (("train", 12, 0), ("val", 4, 1)):
        fs = feature_clusters(n, 4, 16, seed)
        fs.fingerprint.update(arch="dinov3_vits16", n_last_blocks=1, avgpool_patch_tokens=True, embed_dim=8)
        save_features(fs, tmp_path / f"{name}.pt")
    return tmp_path / "train.pt", tmp_path / "val.pt"


def test_dinov2_and_v3_train_on_bicubic_crops_dino_on_bilinear():
    from torchvision import transforms as T

    from dinokit.data.normalization import SAT493M
    from dinokit.eval.linear import _official_train_transform, probe_train_transform

    official = _official_train_transform(LinearConfig(output="x", crop=32))(SAT493M)
    crop, norm = official.transforms[0], official.transforms[-1]
    assert isinstance(crop, T.RandomResizedCrop) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert crop.scale == (0.08, 1.0) and tuple(norm.mean) == (0.430, 0.411, 0.296)
    assert probe_train_transform(32).transforms[0].interpolation == T.InterpolationMode.BILINEAR

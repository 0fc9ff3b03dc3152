"""The data-size-aware defaults of pretraining, against values worked out by hand."""

from __future__ import annotations

import pytest

from dinokit.train.pretrain_settings import (
    PretrainConfig,
    auto_momentum_teacher,
    auto_out_dim,
    auto_warmup_epochs,
    resolve_auto_settings,
)


@pytest.mark.parametrize(
    ("n_images", "expected"),
    [
        (0, 1024),  # no images counts as one: 2**0, raised to the floor
        (100, 1024),  # log2(100) = 6.64 -> 128, raised to 1024
        (2000, 2048),  # log2 = 10.97 -> 11
        (3000, 4096),  # log2 = 11.55 -> 12
        (46340, 32768),  # log2 = 15.49999 -> 15
        (46341, 65536),  # log2 = 15.50001 -> 16
        (1_000_000, 65536),  # 2**20, capped
    ],
)
def test_auto_out_dim(n_images, expected):
    assert auto_out_dim(n_images) == expected


@pytest.mark.parametrize(
    ("iterations", "expected"),
    [
        (2500, 0.996),
        (100_000, 0.996),
        (2000, 0.995),  # 1 - 10/2000
        (2499, 1 - 10 / 2499),
        (1000, 0.99),  # 1 - 10/1000 = 0.99 exactly
        (100, 0.99),  # 0.9, raised to the floor
        (0, 0.99),
    ],
)
def test_auto_momentum_teacher(iterations, expected):
    assert auto_momentum_teacher(iterations) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("epochs", "expected"), [(100, 10.0), (200, 10.0), (30, 3.0), (5, 0.5), (1, 0.1)])
def test_auto_warmup_epochs(epochs, expected):
    assert auto_warmup_epochs(epochs) == pytest.approx(expected)


def test_resolve_fills_everything_left_unset_from_a_small_data_set():
    cfg = PretrainConfig(batch_size=64, epochs=100, local_crops=8)
    resolved, notes = resolve_auto_settings(cfg, n_images=100, world_size=2)
    # 64 x 2 processes > 100 images: 50 per process, so one iteration per epoch, 100 in all
    assert resolved.batch_size == 50
    assert resolved.out_dim == 1024
    assert resolved.momentum_teacher == pytest.approx(0.99)
    assert resolved.warmup_epochs == 10.0
    assert resolved.global_scale == (0.4, 1.0)
    assert len(notes) == 4 and "using 50" in notes[0] and "100 iterations" in notes[2]
    assert cfg.out_dim is None and cfg.batch_size == 64  # the given config is not changed


def test_resolve_keeps_given_settings_and_a_batch_that_fits():
    cfg = PretrainConfig(
        batch_size=64, epochs=100, out_dim=300, momentum_teacher=0.9, warmup_epochs=2, local_crops=0
    )
    resolved, notes = resolve_auto_settings(cfg, n_images=5000, world_size=1)
    assert (resolved.batch_size, resolved.out_dim, resolved.momentum_teacher, resolved.warmup_epochs) == (
        64,
        300,
        0.9,
        2,
    )
    assert resolved.global_scale == (0.14, 1.0)  # no local crops: the wider global-crop range
    assert notes == []


def test_resolve_on_a_larger_data_set():
    # 5000 images, batch 64 on one process: 78 iterations x 100 epochs = 7800 >= 2500
    resolved, _ = resolve_auto_settings(
        PretrainConfig(batch_size=64, epochs=100), n_images=5000, world_size=1
    )
    assert (resolved.out_dim, resolved.momentum_teacher, resolved.warmup_epochs) == (4096, 0.996, 10.0)


def test_config_round_trips_and_reads_an_old_config_json():
    cfg = PretrainConfig(arch="vit_tiny", batch_size=8, num_workers=0, global_scale=(0.3, 1.0))
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    # a config.json of an earlier version: field order differs, extra run facts, no new fields
    old = {
        "data": "d",
        "output": "o",
        "arch": "vit_tiny",
        "batch_size": 8,
        "seed": 3,
        "local_scale": [0.05, 0.4],
        "n_images": 33,
        "world_size": 1,
        "precision_used": "fp32",
    }
    loaded = PretrainConfig.from_dict(old)
    assert (loaded.batch_size, loaded.seed, loaded.local_scale, loaded.num_workers) == (8, 3, (0.05, 0.4), 4)

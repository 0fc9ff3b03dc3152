"""What only a CUDA GPU can show: fp16 training with a gradient scaler, bf16 training, pretraining
under torchrun with nccl (one process per GPU) and the DAVIS propagation on the GPU. Every test is
marked ``cuda`` and skipped where no GPU is available (``benchmarks/gpu_check.sh`` runs them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.train.dino import build_training_state, dino_step
from dinokit.train.pretrain_settings import PretrainConfig
from tests.cli.test_davis import make_davis
from tests.cli.test_pretrain_ddp import RANK_DUMP
from tests.helpers import make_image, run_cli

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VALUES = {"lr": 1e-3, "wd": 0.04, "momentum": 0.9}


def tiny_state(device, dtype):
    cfg = PretrainConfig(
        arch="vit_tiny",
        depth=2,
        out_dim=64,
        local_crops=2,
        global_size=32,
        local_size=16,
        global_scale=(0.4, 1.0),
        momentum_teacher=0.9,
        warmup_epochs=0,
        epochs=2,
        drop_path=0.0,
    )  # no random drop: the same numbers on both devices
    return build_training_state(cfg, device, dtype)


def crops(batch=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)
    ]


def first_losses(device, dtype, steps=3):
    state = tiny_state(device, dtype)
    losses = [float(dino_step(state, crops(), epoch=1, values=VALUES)) for _ in range(steps)]
    return state, losses


def test_fp16_trains_with_a_gradient_scaler():
    device = torch.device("cuda")
    state, losses = first_losses(device, torch.float16)
    assert state.scaler is not None and state.scaler.get_scale() > 0
    assert all(np.isfinite(losses))
    _, reference = first_losses(torch.device("cpu"), None)
    # the same weights and crops: the fp16 losses follow the fp32 CPU ones to fp16's precision
    assert np.allclose(losses, reference, rtol=2e-2, atol=2e-2), (losses, reference)
    assert next(state.student.parameters()).dtype == torch.float32  # fp32 master weights


def test_bf16_trains_without_a_scaler():
    state, losses = first_losses(torch.device("cuda"), torch.bfloat16)
    assert state.scaler is None and all(np.isfinite(losses))
    _, reference = first_losses(torch.device("cpu"), None)
    assert np.allclose(losses, reference, rtol=5e-2, atol=5e-2), (losses, reference)


def test_torchrun_nccl_one_process_per_gpu(tmp_path):
    n = torch.cuda.device_count()
    data = tmp_path / "data"
    for i in range(16 * n):
        make_image(data / f"{i}.png", size=(40, 40), seed=i)
    script = tmp_path / "launch.py"
    script.write_text(RANK_DUMP)
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    args = [
        "pretrain",
        "--data",
        str(data),
        "--output",
        str(out),
        "--arch",
        "vit_tiny",
        "--depth",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out-dim",
        "128",
        "--local-crops",
        "2",
        "--global-size",
        "32",
        "--local-size",
        "16",
        "--precision",
        "bf16",
        "--device",
        "cuda",
        "--num-workers",
        "0",
        "--quiet",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(n),
        str(script),
        str(dumps),
        *args,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "DINOKIT_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == n and config["device_used"].startswith("cuda")
    ranks = [torch.load(dumps / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(n)]
    for other in ranks[1:]:
        for k in ranks[0]["teacher"]:
            assert torch.equal(ranks[0]["teacher"][k], other["teacher"][k]), k
        assert torch.equal(ranks[0]["center"], other["center"])
    assert ranks[0]["center"].abs().sum() > 0


def test_davis_on_the_gpu_agrees_with_the_cpu(tmp_path, tiny2_weights):
    root = make_davis(tmp_path / "DAVIS")
    masks = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        r = run_cli(
            [
                "davis",
                "--data",
                str(root),
                "--weights",
                str(tiny2_weights),
                "--output",
                str(out),
                "--short-side",
                "64",
                "--num-workers",
                "0",
                "--device",
                device,
                "--precision",
                "fp32",
                "--quiet",
            ]
        )
        assert r.exit_code == 0, r.output
        masks[device] = [
            np.array(Image.open(p)) for s in ("squares", "bars") for p in sorted((out / s).glob("*.png"))
        ]
        assert json.loads((out / "metrics.json").read_text())["J&F-Mean"] >= 0
    same = np.mean([np.mean(a == b) for a, b in zip(masks["cpu"], masks["cuda"])])
    assert same > 0.99, same  # TF32 / kernel order may flip a few boundary pixels, no more

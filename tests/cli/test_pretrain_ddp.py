"""`dinokit pretrain` under `torchrun --nproc-per-node 2` on the CPU (gloo): the same command line,
DistributedDataParallel, and every rank ends with the same teacher and centre."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import make_image

RANK_DUMP = textwrap.dedent(
    """
    import os, sys, torch
    import dinokit.train.pretrain as mod

    pretrain = mod.pretrain

    def pretrain_and_dump(cfg, progress, **kwargs):
        result = pretrain(cfg, progress, **kwargs)
        state, rank = result.state, int(os.environ["RANK"])
        torch.save({"teacher": state.teacher.state_dict(), "center": state.dino_loss.center.cpu(),
                    "student": state.student.state_dict()}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
        return result

    mod.pretrain = pretrain_and_dump  # the command looks the function up when it runs
    from dinokit.commands import main
    main(sys.argv[2:])
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = tmp_path / "data"
    for i in range(32):
        make_image(data / f"{i}.png", size=(40, 40), seed=i)
    script = tmp_path / "launch.py"
    script.write_text(RANK_DUMP)
    out = tmp_path / "run"
    dumps = tmp_path / "dumps"
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
        "fp32",
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
        "2",
        str(script),
        str(dumps),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DINOKIT_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 16 and config["iterations_per_epoch"] == 2
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only rank 0 writes

    r0 = torch.load(dumps / "rank0.pt", weights_only=True)
    r1 = torch.load(dumps / "rank1.pt", weights_only=True)
    for k in r0["teacher"]:
        assert torch.equal(r0["teacher"][k], r1["teacher"][k]), k
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    assert torch.equal(r0["center"], r1["center"])
    assert r0["center"].abs().sum() > 0  # the centre did move
    saved = torch.load(out / "checkpoint.pth", weights_only=True)
    assert torch.equal(saved["dino_loss"]["center"].cpu(), r0["center"])
    assert len(saved["rng"]) == 2  # both ranks' random states, for exact resume

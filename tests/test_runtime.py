"""Device and precision choice, the torchrun environment, seeding, CPU planning and pinned numerics."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import dinokit
from dinokit import runtime
from dinokit.errors import DinokitError
from dinokit.runtime import cpu as runtime_cpu
from dinokit.runtime import devices as runtime_devices


@pytest.fixture(autouse=True)
def _fresh_dist_env():
    runtime.dist_env.cache_clear()
    yield
    runtime.dist_env.cache_clear()


def test_resolve_device():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    auto = runtime.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        with pytest.raises(DinokitError, match="no CUDA GPU"):
            runtime.resolve_device("cuda")
    with pytest.raises(DinokitError, match="Unknown device 'tpu'"):
        runtime.resolve_device("tpu")


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(runtime_devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.has_native_bf16("cpu")
    monkeypatch.setattr(runtime_devices, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert runtime.has_native_bf16("cpu")
    monkeypatch.setattr(runtime_devices, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert not runtime.has_native_bf16("cpu")
    assert not runtime.has_native_bf16("meta")


@pytest.mark.parametrize("native", [True, False])
def test_resolve_precision(monkeypatch, native):
    monkeypatch.setattr(runtime_devices, "has_native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu, training=True) == (torch.bfloat16 if native else None)
    assert runtime.resolve_precision("auto", cpu, training=False) is None  # evaluation matches the reference
    assert runtime.resolve_precision("fp32", cpu, training=True) is None
    assert runtime.resolve_precision("BF16", cpu, training=False) == torch.bfloat16
    with pytest.raises(DinokitError, match="fp16 needs a GPU"):
        runtime.resolve_precision("fp16", cpu, training=False)
    with pytest.raises(DinokitError, match="Unknown precision 'int8'"):
        runtime.resolve_precision("int8", cpu, training=False)
    assert runtime.precision_name(runtime.resolve_precision("bf16", cpu, True)) == "bf16"


def test_autocast_contexts():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with runtime.autocast(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
    with runtime.autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_torchrun_environment_is_read_once(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = runtime.dist_env()
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.dist_env() is env  # cached: read once per process
    runtime.dist_env.cache_clear()
    env = runtime.dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.distributed, env.is_main) == (3, 4, 1, True, False)
    runtime.dist_env.cache_clear()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(DinokitError, match="not integers"):
        runtime.dist_env()


def test_single_process_collectives_are_no_ops():
    assert runtime.init_distributed(torch.device("cpu")).world_size == 1
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(runtime.all_reduce_mean(t), torch.tensor([2.0, 4.0]))
    runtime.barrier()
    assert not runtime.is_dist()


def test_seed_everything_is_reproducible_and_per_rank():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    runtime.seed_everything(5)
    a = draw()
    runtime.seed_everything(5)
    assert draw() == a
    runtime.seed_everything(5, rank=1)
    assert draw() != a


def test_describe_runtime_lists_versions_devices_threads_and_bf16():
    info = runtime.describe_runtime()
    assert info["dinokit"] == dinokit.__version__ and info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_native_bf16"] == runtime.has_native_bf16("cpu")
    assert info["default_device"] in ("cpu", "cuda:0", "mps")
    for key in ("python", "torchvision", "cpu_count", "cuda_available", "cuda_devices", "mps_available"):
        assert key in info


def test_loader_workers_leave_the_compute_threads_their_cores(monkeypatch):
    monkeypatch.setattr(runtime_cpu, "available_cores", lambda: 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cpu, cuda = torch.device("cpu"), torch.device("cuda")
        assert runtime.loader_workers(4, cpu) == 4  # 8 cores - 2 threads = 6 free
        assert runtime.loader_workers(10, cpu) == 6
        assert runtime.loader_workers(4, cpu, world_size=4) == 0  # 2 cores per process, both computing
        assert runtime.loader_workers(4, cuda, world_size=4) == 2  # the GPU computes: the cores are free
        assert runtime.loader_workers(0, cuda) == 0
    finally:
        torch.set_num_threads(threads)


_PINNED_PROBE = """
import json, os, sys
import torch
from dinokit.runtime import pin_cpu_numerics
record = pin_cpu_numerics(threads=int(sys.argv[1]))
torch.manual_seed(0)
x = torch.randn(257, 384)
y = torch.nn.functional.gelu(x @ torch.randn(384, 1536)).softmax(-1).sum(0)
print(json.dumps({"record": record, "sum": float(y.double().sum()), "head": y[:4].tolist(),
                  "aten": os.environ.get("ATEN_CPU_CAPABILITY")}))
"""


@pytest.mark.slow
def test_pinned_numerics_take_effect_in_a_fresh_process_and_keep_the_users_choice():
    """pin_cpu_numerics before the first operation of a process selects the AVX2-level kernels (what
    an AVX2-only machine computes with) and the thread count; a variable the user set stays."""
    import json
    import subprocess
    import sys

    def probe(threads, **env):
        base = {k: v for k, v in os.environ.items() if k not in runtime.PINNED_CPU_KERNELS}
        out = subprocess.run(
            [sys.executable, "-c", _PINNED_PROBE, str(threads)],
            env={**base, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    pinned = probe(1)
    assert pinned["record"]["threads"] == 1
    assert pinned["aten"] == "avx2"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert pinned["record"]["cpu_capability"] == "AVX2"
    # the same computation with the variables set by hand before torch starts: the same bits
    by_hand = probe(1, **runtime.PINNED_CPU_KERNELS)
    assert by_hand["head"] == pinned["head"] and by_hand["sum"] == pinned["sum"]
    # a user's own choice is kept
    assert probe(2, ATEN_CPU_CAPABILITY="default")["record"]["cpu_capability"] == "DEFAULT"


def test_free_cores_sums_each_cores_idle_share(monkeypatch):
    monkeypatch.setattr(runtime_cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    snapshots = iter([
        {0: (100, 1000), 1: (500, 1000), 2: (0, 1000)},
        # cpu0 idle for all 100 ticks, cpu1 for 25 of 100, cpu2 never (another program keeps it busy)
        {0: (200, 1100), 1: (525, 1100), 2: (0, 1100)},
    ])  # fmt: skip
    monkeypatch.setattr(runtime_cpu, "_cpu_times", lambda cpus: next(snapshots))
    assert runtime.free_cores(probe_seconds=0) == pytest.approx(1.25)


def test_free_cores_reads_proc_stat_of_the_allowed_cores():
    free = runtime.free_cores(probe_seconds=0.05)
    assert 0.0 <= free <= runtime.available_cores()


def test_cpu_plan_takes_the_free_cores_and_leaves_workers_the_rest(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime_cpu, "available_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(
            runtime_cpu, "free_cores", lambda probe_seconds=0.2: 1.02
        )  # one busy program beside
        plan = runtime.plan_cpu(None, 4, cpu, world_size=1)
        assert (plan.threads, plan.workers, plan.chosen_by) == (1, 0, "free cores")
        assert (
            "1 compute thread(s), 0 data worker(s) (1.0 of 2 cores free; --threads overrides)"
            == plan.describe()
        )
        monkeypatch.setattr(runtime_cpu, "free_cores", lambda probe_seconds=0.2: 1.97)  # idle
        assert (
            runtime.plan_cpu(None, 4, cpu, world_size=1).threads,
            runtime.plan_cpu(None, 4, cpu, 1).workers,
        ) == (2, 0)
        monkeypatch.setattr(runtime_cpu, "free_cores", lambda probe_seconds=0.2: 0.1)  # busier than its cores
        assert runtime.plan_cpu(None, 4, cpu, world_size=1).threads == 1
        # --threads wins whatever is free; workers get what the threads leave
        plan = runtime.plan_cpu(2, 4, cpu, world_size=1)
        assert (plan.threads, plan.workers, plan.chosen_by) == (
            2,
            0,
            "--threads",
        ) and "set by --threads" in plan.describe()
        assert runtime.plan_cpu(1, 4, cpu, world_size=1).workers == 1
        # a GPU computes: the threads stay, the workers take the process's cores
        assert (
            runtime.plan_cpu(None, 4, cuda, world_size=1).threads,
            runtime.plan_cpu(None, 4, cuda, 1).workers,
        ) == (2, 2)
        # more cores: the threads never exceed torch's setting, the free rest goes to the workers
        monkeypatch.setattr(runtime_cpu, "available_cores", lambda: 8)
        monkeypatch.setattr(runtime_cpu, "free_cores", lambda probe_seconds=0.2: 7.0)
        plan = runtime.plan_cpu(None, 4, cpu, world_size=1)
        assert (plan.threads, plan.workers) == (2, 4)
        assert runtime.plan_cpu(None, 4, cpu, world_size=2).threads == 2  # 3.5 free cores each
        assert runtime.plan_cpu(None, 4, cpu, world_size=2).workers == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_sets_and_restores():
    from dinokit.runtime import cpu_threads

    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_auto_precision_of_the_embedding_commands_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime_devices, "has_native_bf16", lambda device="cpu": True)
    assert runtime.embedding_precision("auto", "cpu") == "bf16"
    assert runtime.embedding_precision("fp32", "cpu") == "fp32"
    assert runtime.embedding_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(runtime_devices, "has_native_bf16", lambda device="cpu": False)
    assert runtime.embedding_precision("auto", "cpu") == "fp32"
    # the protocols' evaluations keep fp32 under auto either way
    monkeypatch.setattr(runtime_devices, "has_native_bf16", lambda device="cpu": True)
    assert runtime.resolve_precision("auto", torch.device("cpu"), training=False) is None


def test_features_at_auto_precision_record_what_ran(monkeypatch, tiny4_weights, tmp_path):
    from dinokit.eval.features import load_features
    from tests.helpers import make_image, run_cli

    for i in range(2):
        make_image(tmp_path / "imgs" / f"{i}.png", (40, 40), seed=i)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime_devices, "has_native_bf16", lambda device="cpu", native=native: native)
        out = tmp_path / f"{expected}.pt"
        r = run_cli(
            [
                "features",
                "--weights",
                tiny4_weights,
                "--data",
                tmp_path / "imgs",
                "--output",
                out,
                "--resize",
                "32",
                "--image-size",
                "32",
                "--quiet",
            ]
        )
        assert r.exit_code == 0, r.output
        assert load_features(out).fingerprint["precision"] == expected

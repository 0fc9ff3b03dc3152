"""Where a DINO pretraining step spends its time: teacher forward, student forward, loss, backward,
clipping, optimiser, EMA; and its model-FLOP utilisation, before and after the cast-once path.

The recipe of `pretrain_throughput.py` (vit_tiny/16, 2x224 + 2x96 crops, batch 16, out_dim 4096).
In bf16 two training states step side by side on the same crops, interleaved: "before", autocast
casting the weights at each call, and "after", the backbones' bf16 weights cast once per step
(`dinokit.train.reduced_weights`, the numbers bitwise the same). Each part is timed in wall-clock
seconds and in this process's CPU seconds (which other programs on a shared machine disturb less);
the first step is left out. Then the model-FLOP utilisation: the floating-point work of the step's
matrix products and convolutions (counted by torch's FlopCounterMode, forward and backward) over
the step's compute time, against the bare rate of this machine's matrix products at the step's
precision measured in the same run (on the MLP's shape). `--threads` sets torch's threads (by
default what dinokit would choose now, as `dinokit pretrain` does).

`--ops N` profiles one more step by operator: the share of matrix products (and the rate they
reach, against the bare rate), of copies and casts, and of the rest, and the N slowest operators.

    python benchmarks/profile_step.py [--threads N] [--precision bf16] [--steps 4] [--ops 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinokit.data.images import find_images
from dinokit.data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop
from dinokit.runtime import autocast, plan_cpu
from dinokit.train.dino import build_training_state
from dinokit.train.optim import cancel_last_layer_gradients, clip_gradients_per_parameter
from dinokit.train.pretrain_settings import PretrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_throughput import make_images  # noqa: E402


class Clock:
    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.mark()

    def mark(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def lap(self, name: str):
        t, c = time.perf_counter(), time.process_time()
        self.wall[name] = self.wall.get(name, 0.0) + t - self.t
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self.c
        self.t, self.c = t, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--ops",
        type=int,
        default=0,
        metavar="N",
        help="also profile one step by operator: the groups' shares and the N slowest operators",
    )
    args = ap.parse_args()
    plan = plan_cpu(args.threads, 0, torch.device("cpu"))
    torch.set_num_threads(plan.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    cfg = PretrainConfig(
        arch="vit_tiny",
        out_dim=4096,
        local_crops=2,
        global_size=224,
        local_size=96,
        global_scale=(0.4, 1.0),
        momentum_teacher=0.996,
        warmup_epochs=0,
        epochs=2,
    )
    # before: autocast casts the weights at each call; after: the bf16 weights cast once per step
    paths = (
        {"autocast casts": False}
        if dtype is None
        else {"autocast casts (before)": False, "cast once (after)": True}
    )
    states = {
        name: build_training_state(cfg, torch.device("cpu"), dtype, cast_once=once)
        for name, once in paths.items()
    }
    rate_before = matmul_rate(2 * args.batch_size * 197, 192, 768, dtype or torch.float32)
    B = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), B)
        ds = MultiCropDataset(
            find_images(Path(tmp)), MultiCropAugmentation((0.4, 1.0), (0.05, 0.4), 2, 224, 96)
        )
        clocks = {name: Clock() for name in states}
        for step in range(args.steps + 1):
            crops, _ = collate_multicrop([ds[i] for i in range(B)])
            for name in list(states)[:: 1 if step % 2 else -1]:  # interleaved, the order alternating
                if step == 1:
                    clocks[name] = Clock()
                timed_step(states[name], crops, dtype, clocks[name])
        counter = FlopCounterMode(display=False)
        with counter:
            forward_backward(next(iter(states.values())), crops, dtype)
        ops = {}
        if args.ops:
            for name, state in states.items():
                state.optimizer.zero_grad(set_to_none=True)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    forward_backward(state, crops, dtype)
                    clip_gradients_per_parameter(state.trained_params, 3.0)
                    state.optimizer.step()
                    state.update_teacher(0.996)
                state.optimizer.zero_grad(set_to_none=True)
                ops[name] = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    n = args.steps
    flops = counter.get_total_flops()
    # the global crops' tokens through the MLP's first layer; measured before and after the steps, the best
    rate = max(rate_before, matmul_rate(2 * B * 197, 192, 768, dtype or torch.float32))
    print(f"{plan.describe()}; {args.precision}; {n} steps of {B} images each way, interleaved")
    print(
        f"the step's matrix products and convolutions: {flops / 1e9:.0f} GFLOP (FlopCounterMode, forward and "
        f"backward); this machine's bare {args.precision} matrix-product rate, measured in this run: "
        f"{rate / 1e9:.0f} GFLOP/s ({2 * B * 197}x192 @ 192x768, best of 10 rounds before and after)"
    )
    for name, clock in clocks.items():
        wall, cpu = sum(clock.wall.values()), sum(clock.cpu.values())
        compute = sum(v for k, v in clock.wall.items() if k != "data") / n
        print(
            f"\n{name}: {wall / n:.2f} s per step ({B * n / wall:.1f} images/s), {cpu / n:.2f} CPU s per step; "
            f"model-FLOP utilisation {100 * flops / compute / rate:.1f}% (the step's compute, all but data, "
            f"{compute:.2f} s, against {flops / rate:.2f} s for its products at the bare rate)"
        )
        print(f"{'part':16s}{'wall ms':>10s}{'share':>8s}{'CPU ms':>10s}")
        for k in clock.wall:
            print(
                f"{k:16s}{1000 * clock.wall[k] / n:10.1f}{100 * clock.wall[k] / wall:7.1f}%{1000 * clock.cpu[k] / n:10.1f}"
            )
        if name in ops:
            print_operator_groups(ops[name], flops, rate, args.ops)


def forward_backward(state, crops, dtype):
    with autocast(state.device, dtype):
        with torch.no_grad():
            t_out = state.forward_teacher(crops[:2])
        s_out = state.forward_student(crops)
    state.dino_loss(s_out, t_out, 1).backward()


def timed_step(state, crops, dtype, clock: Clock) -> None:
    """One DINO step as :func:`dinokit.train.dino.dino_step` makes it, each part timed."""
    clock.mark()
    for group in state.optimizer.param_groups:
        group["lr"] = 1e-4
    with autocast(state.device, dtype):
        with torch.no_grad():
            t_out = state.forward_teacher(crops[:2])
        clock.lap("teacher forward")
        s_out = state.forward_student(crops)
        clock.lap("student forward")
    loss = state.dino_loss(s_out, t_out, 1)
    clock.lap("loss")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.lap("backward")
    clip_gradients_per_parameter(state.trained_params, 3.0)
    clock.lap("clipping")
    cancel_last_layer_gradients(state.last_layer_params, 1, 1)
    state.optimizer.step()
    clock.lap("optimiser")
    state.update_teacher(0.996)
    clock.lap("EMA")


#: the operators that are matrix products or convolutions (what FlopCounterMode counts)
PRODUCT_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}
#: copies, most of them autocast's casts and the layout changes around attention
COPY_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"}


def print_operator_groups(ops: list[tuple[str, float, int]], flops: float, rate: float, top: int) -> None:
    """One profiled step by operator (each operator's self time: the wall time the calling thread
    spent in it, its own threads' parallel work included, nested operators excluded): matrix
    products, copies, the rest; the products' achieved rate against the machine's bare
    matrix-product rate; the ``top`` slowest operators."""
    total = sum(t for _, t, _ in ops)
    products = sum(t for k, t, _ in ops if k in PRODUCT_OPS)
    copies = sum(t for k, t, _ in ops if k in COPY_OPS)
    print(
        f"by operator (one step, {total:.2f} s of operator time): matrix products and convolutions "
        f"{100 * products / total:.0f}% (running at {flops / products / 1e9:.0f} GFLOP/s, "
        f"{100 * flops / products / rate:.0f}% of the bare rate above), copies and casts {100 * copies / total:.0f}%, "
        f"everything else (normalisation, activations, softmax, element-wise, optimiser) {100 * (total - products - copies) / total:.0f}%"
    )
    print(f"{'operator':40s}{'ms':>9s}{'share':>8s}{'calls':>7s}")
    for key, t, count in sorted(ops, key=lambda o: -o[1])[:top]:
        print(f"{key[:40]:40s}{1000 * t:9.1f}{100 * t / total:7.1f}%{count:7d}")


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5, rounds: int = 10) -> float:
    """FLOP/s of an (m, k) @ (k, n) matrix product in ``dtype`` on this machine's current threads: the
    best of ``rounds`` rounds (a ceiling; a busy moment of the machine only lowers a round)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t))
    return best


if __name__ == "__main__":
    main()

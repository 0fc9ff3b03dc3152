"""Inference throughput at 224 px of ViT-S/16 (DINO), ViT-S/14 (DINOv2) and ViT-S/16 (DINOv3):
dinokit against timm's ``vit_small_patch16_224``, ``vit_small_patch14_dinov2`` and
``vit_small_patch16_dinov3_qkvb``.

Each pair holds the same weights (checked: same features to 1e-4; timm's ViT-S/14 is built for
224 px with the position table dinokit resizes to that grid, timm's fastest configuration). Each is timed in fp32, in bf16
under autocast (fp32 weights, the usual mixed-precision recipe) and in bf16 with the weights cast
once (``dinokit.models.inference.cast_for_inference``), all under ``torch.inference_mode``. The machine's
matrix-multiply peak is measured in the same run with large fp32 and bf16 matmuls, and each
throughput is also given as a fraction of that peak (ViT-S/16 at 224 is 4.6 GMACs per image).

Configurations are timed in interleaved rounds (alternating their order) and the best round is
kept, so that a busy machine disturbs all of them alike; the load average is printed with the
results, and each rate is also given per second of this process's own CPU time, which other
programs on a shared machine disturb less.

    python benchmarks/vit_throughput.py                    # the three models, batch 32, 4 rounds
    python benchmarks/vit_throughput.py --models dinov2_vits14 --rounds 5 --json out.json

Goals on a CPU with bf16 units (avx512_bf16 / AMX): dinokit fp32 >= timm fp32, and dinokit bf16
>= 1.6x dinokit fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

import dinokit
from dinokit.models.inference import cast_for_inference
from dinokit.runtime import has_native_bf16


def vit_macs_per_image(
    image: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, prefix: int = 1
) -> float:
    """Multiply-accumulates of one ViT forward: patch embedding, then per block qkv, attention
    (q k^T and attn v), projection and the 4x MLP: 12 N D^2 + 2 N^2 D (N counts the CLS token and
    any register tokens, ``prefix`` in all)."""
    n_patch = (image // patch) ** 2
    n = n_patch + prefix
    return n_patch * dim * 3 * patch * patch + depth * (12 * n * dim * dim + 2 * n * n * dim)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul at ``dtype`` (best of ``reps``)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


#: benchmark name -> (dinokit arch, timm model, patch size, prefix tokens)
MODELS = {
    "vit_small": ("vit_small", "vit_small_patch16_224", 16, 1),
    "dinov2_vits14": ("dinov2_vits14", "vit_small_patch14_dinov2", 14, 1),
    "dinov3_vits16": ("dinov3_vits16", "vit_small_patch16_dinov3_qkvb", 16, 5),
}


def build_pair(seed: int, name: str = "vit_small"):
    """dinokit's model and timm's on the same weights, both for 224 px inputs."""
    import timm

    from dinokit.checkpoints import extract_backbone_state_dict, infer_arch

    arch, timm_name, patch, _ = MODELS[name]
    torch.manual_seed(seed)
    if name == "vit_small":
        ours = dinokit.build_backbone("vit_small", 16).eval()
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
    else:
        source = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
        with torch.no_grad():  # LayerScales at 1 (not timm's 1e-5), so that every block counts in the check
            for n, p in source.named_parameters():
                if "gamma" in n:
                    p.fill_(1.0)
        sd = extract_backbone_state_dict(source.state_dict())
        found, found_patch, extra = infer_arch(sd)
        ours = dinokit.build_backbone(found, found_patch, **extra).eval()
        ours.load_state_dict(sd, strict=True)
        if ours.pos_embed is not None:  # timm built for 224 px with the table resized by DINOv2's rule
            theirs = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=224).eval()
            with torch.no_grad():
                table = ours.interpolate_pos_encoding(224 // patch, 224 // patch, square_input=False)
            theirs.load_state_dict({**source.state_dict(), "pos_embed": table.clone()}, strict=True)
        else:
            theirs = source
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        diff = (ours(x) - theirs.forward_features(x)[:, 0]).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{name}: dinokit and timm disagree by {diff:.2e} on the same weights")
    return ours, theirs, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2, help="batches timed per configuration and round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best one is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    with torch.inference_mode():
        peak = {
            "fp32": max(matmul_peak(torch.float32, args.matmul_size, 3) for _ in range(2)),
            "bf16": max(matmul_peak(torch.bfloat16, args.matmul_size, 3) for _ in range(2)),
        }
    results = {name: run_model(args, name, peak) for name in names}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch_size": args.batch_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "matmul_peak_flops": peak, "models": results}, f, indent=2)  # fmt: skip


def run_model(args, name: str, peak: dict[str, float]) -> dict:
    """Time one dinokit/timm pair in fp32, bf16 autocast and bf16 weights; print and return the figures."""
    arch, timm_name, patch, prefix = MODELS[name]
    load_start = os.getloadavg()
    ours, theirs, diff = build_pair(seed=0, name=name)
    x32 = torch.randn(args.batch_size, 3, 224, 224)
    xbf = x32.to(torch.bfloat16)
    ours_bf = cast_for_inference(copy.deepcopy(ours), torch.bfloat16)
    theirs_bf = copy.deepcopy(theirs).to(torch.bfloat16)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    configs = {
        ("dinokit", "fp32"): (lambda: ours(x32), None),
        ("timm", "fp32"): (lambda: theirs(x32), None),
        ("dinokit", "bf16 autocast"): (lambda: ours(x32), autocast),
        ("timm", "bf16 autocast"): (lambda: theirs(x32), autocast),
        ("dinokit", "bf16 weights"): (lambda: ours_bf(x32), None),  # fp32 images, cast inside
        ("timm", "bf16 weights"): (lambda: theirs_bf(xbf), None),
    }
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    # images per second of this process's own CPU time (per thread): what the work costs, less
    # sensitive than wall-clock time to other programs on a shared machine
    cpu_rates: dict[tuple[str, str], list[float]] = {k: [] for k in configs}
    with torch.inference_mode():
        for fn, ctx in configs.values():  # warm-up: allocator, oneDNN kernels, position table
            with ctx() if ctx else torch.autocast("cpu", enabled=False):
                fn()
        for r in range(args.rounds):
            # every other round runs the configurations in reverse, so that none always runs first
            order = list(configs.items()) if r % 2 == 0 else list(configs.items())[::-1]
            for key, (fn, ctx) in order:
                with ctx() if ctx else torch.autocast("cpu", enabled=False):
                    t, c = time.perf_counter(), time.process_time()
                    for _ in range(args.iters):
                        fn()
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                rates[key].append(args.batch_size * args.iters / dt)
                cpu_rates[key].append(args.batch_size * args.iters / (dc / torch.get_num_threads()))
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k[0]} {k[1]} {v[-1]:.1f}" for k, v in rates.items()),
                flush=True,
            )
    load_end = os.getloadavg()

    flops = 2 * vit_macs_per_image(224, patch, prefix=prefix)
    best = {k: max(v) for k, v in rates.items()}
    print()
    print(
        f"{name} ({arch} vs timm {timm_name}), 224 px, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}, native bf16: {has_native_bf16('cpu')}"
    )
    print(f"dinokit vs timm on the same weights: max |diff| {diff:.1e}")
    print(
        f"matmul peak ({args.matmul_size}^3): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s (x{peak['bf16'] / peak['fp32']:.2f})"
    )
    best_cpu = {k: max(v) for k, v in cpu_rates.items()}
    print(
        f"{'model':8s} {'precision':14s} {'img/s best':>10s} {'median':>8s} {'of peak':>8s} {'img/CPU-s':>10s}"
    )
    for (model, prec), v in rates.items():
        p = peak["fp32" if prec == "fp32" else "bf16"]
        print(
            f"{model:8s} {prec:14s} {max(v):10.1f} {statistics.median(v):8.1f} {max(v) * flops / p:8.1%} "
            f"{best_cpu[(model, prec)]:10.1f}"
        )

    def ratio_table(b: dict) -> dict[str, float]:
        d32 = b[("dinokit", "fp32")]
        return {
            "dinokit fp32 / timm fp32": d32 / b[("timm", "fp32")],
            "dinokit bf16 autocast / dinokit fp32": b[("dinokit", "bf16 autocast")] / d32,
            "dinokit bf16 weights / dinokit fp32": b[("dinokit", "bf16 weights")] / d32,
            "dinokit bf16 autocast / timm bf16 autocast": b[("dinokit", "bf16 autocast")]
            / b[("timm", "bf16 autocast")],
            "dinokit bf16 weights / timm bf16 weights": b[("dinokit", "bf16 weights")]
            / b[("timm", "bf16 weights")],
        }

    ratios, cpu_ratios = ratio_table(best), ratio_table(best_cpu)
    print(f"{'ratio':45s} {'wall':>6s} {'CPU-time':>9s}")
    for name, value in ratios.items():
        print(f"{name:45s} {value:6.2f} {cpu_ratios[name]:9.2f}")
    goal_fp32 = ratios["dinokit fp32 / timm fp32"] >= 1.0
    goal_bf16 = max(
        ratios["dinokit bf16 autocast / dinokit fp32"], ratios["dinokit bf16 weights / dinokit fp32"]
    )
    print(f"goal dinokit fp32 >= timm fp32: {'met' if goal_fp32 else 'NOT met'} (wall-clock)")
    print(
        f"goal dinokit bf16 >= 1.6x fp32: {'met' if goal_bf16 >= 1.6 else 'NOT met'} "
        f"(best bf16 path x{goal_bf16:.2f}, wall-clock)"
    )
    print(
        f"load average at start {load_start[0]:.1f}, at end {load_end[0]:.1f} on {os.cpu_count()} CPUs "
        "(a busy machine lowers every figure; compare the ratios)"
    )
    return {
        "images_per_s": {f"{m} {p}": v for (m, p), v in rates.items()},
        "best_images_per_s": {f"{m} {p}": v for (m, p), v in best.items()},
        "images_per_cpu_s": {f"{m} {p}": v for (m, p), v in cpu_rates.items()},
        "cpu_time_ratios": cpu_ratios,
        "flops_per_image": flops,
        "ratios": ratios,
        "max_abs_diff": diff,
        "load_average": [load_start[0], load_end[0]],
    }


if __name__ == "__main__":
    main()

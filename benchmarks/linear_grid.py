"""What the DINOv2 linear protocol's grid costs per step beside one head, measured side by side.

    python benchmarks/linear_grid.py [--arch dinov2_vits14] [--batch 32] [--image-size 224]
                                     [--classes 1000] [--steps 3] [--device cpu] [--threads N]

A step of ``dinokit linear`` on images is one frozen-backbone forward (the CLS tokens of the last 4
blocks and the patch mean, as :func:`dinokit.eval.linear_grid.token_vector` gives them) and a training
step of the heads on it. Two steps are timed alternately on the same random batches and the same
random-weight backbone:

* ``grid``: the DINOv2 grid, 13 learning rates x the last 1 or 4 blocks x with/without the patch mean
  (52 heads), trained together on the one forward;
* ``one head``: the single head of the last 4 blocks + the patch mean (DINOv2's released heads' input).

It prints both per-step times, their ratio (goal: the grid at most 1.3x one head) and, for
information, the same two steps on cached features (no backbone: what ``--augment none`` trains on),
with the processor as ``dinokit info`` names it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dinokit
from dinokit.eval.linear_grid import LinearGrid, grid_optimizer, protocol_heads, token_vector
from dinokit.runtime import describe_runtime


def make_step(grid: LinearGrid, batch: int):
    opt = grid_optimizer(grid, batch / 256)

    def step(tokens, labels):
        opt.zero_grad(set_to_none=False)  # as GridRun: the grads stay allocated
        grid.loss(tokens, labels).backward()
        opt.step()

    return step


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="dinov2_vits14")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = dinokit.build_backbone(args.arch).eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    dim = model.embed_dim
    grid = LinearGrid(protocol_heads("dinov2"), 4, dim, args.classes).to(device)
    one = LinearGrid(
        protocol_heads("dinov2", lrs=(1e-3,), blocks=(4,), avgpool=(True,)), 4, dim, args.classes
    ).to(device)
    steps = {"grid": make_step(grid, args.batch), "one head": make_step(one, args.batch)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def full(name, x, y):
        def run():
            with torch.no_grad():
                tokens = token_vector(model, x, 4)
            steps[name](tokens, y)
            sync()

        return run

    def cached(name, tokens, y):
        def run():
            steps[name](tokens, y)
            sync()

        return run

    times = {f"{kind} / {name}": [] for kind in ("images", "cached features") for name in steps}
    for i in range(args.steps + 1):  # the first round warms up (allocator, kernels) and is not counted
        g = torch.Generator().manual_seed(i)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
        y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
        with torch.no_grad():
            tokens = token_vector(model, x, 4)
        order = list(steps) if i % 2 == 0 else list(reversed(steps))  # alternate who goes first
        for name in order:
            t = timed(full(name, x, y))
            if i:
                times[f"images / {name}"].append(t)
        for name in order:
            t = min(timed(cached(name, tokens, y)) for _ in range(3))
            if i:
                times[f"cached features / {name}"].append(t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    info = describe_runtime()
    where = (
        info["cuda_devices"][0]["name"]
        if device.type == "cuda"
        else f"{info['cpu']}, {torch.get_num_threads()} threads"
    )
    result = {
        "processor": where,
        "arch": args.arch, "batch": args.batch, "image_size": args.image_size, "classes": args.classes,
        "heads": len(grid.heads), "steps": args.steps,
        "seconds_per_step": {k: round(v, 4) for k, v in med.items()},
        "grid_over_one_head": round(med["images / grid"] / med["images / one head"], 3),
        "cached_grid_over_one_head": round(med["cached features / grid"] / med["cached features / one head"], 2),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print(
        f"{where}: one step of the {len(grid.heads)}-head grid costs {result['grid_over_one_head']:.2f}x one head "
        f"({med['images / grid']:.3f} s vs {med['images / one head']:.3f} s, {args.arch}, batch {args.batch}, "
        f"{args.image_size}px; goal <= 1.3x). On cached features, without the backbone: "
        f"{result['cached_grid_over_one_head']:.1f}x ({med['cached features / grid'] * 1e3:.1f} ms vs "
        f"{med['cached features / one head'] * 1e3:.1f} ms)."
    )


if __name__ == "__main__":
    main()

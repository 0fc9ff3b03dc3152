"""The throughput figures of a CUDA machine, in one JSON: ViT-S/16 inference against timm, DINO
pretraining steps against the reference-style loop, DAVIS seconds per frame.

- vit_inference: ViT-S/16 at 224, dinokit and timm `vit_small_patch16_224` with the same weights, in
  fp32, bf16 and fp16 autocast and with the weights cast to bf16 once; images/s.
- pretrain: DINO steps of the paper's ViT-S/16 recipe (2x224 + 8x96 crops, out_dim 65536) on crops
  already on the device: `dino_step` at `--precision auto` against the reference-style step (fp16
  autocast with a gradient scaler, as the reference trains on GPUs, and fp32); images/s.
- davis: `segment_video` on a generated 854x480 video, fp32 and bf16; seconds per frame.

`--smoke` runs every part at toy sizes (on a CPU too), to check the script before a GPU run.
`benchmarks/gpu_check.sh` calls it.

    python benchmarks/gpu_figures.py --json figures.json [--device cuda] [--smoke] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import dinokit
from dinokit.models.inference import cast_for_inference
from dinokit.runtime import precision_name, resolve_device, resolve_precision
from dinokit.train.dino import build_training_state, dino_step
from dinokit.train.pretrain_settings import PretrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_throughput import PlainDINO  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, images: int, warmup: int, iters: int, device: torch.device) -> float:
    """images/s of ``fn`` (one call handles ``images``), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return images * iters / (time.perf_counter() - t)


def vit_inference(device: torch.device, smoke: bool) -> dict:
    import timm

    batch, warmup, iters = (2, 1, 1) if smoke else (128, 3, 10)
    torch.manual_seed(0)
    ours = dinokit.build_backbone("vit_small", 16).eval().to(device)
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval().to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        diff = (ours(x[:2]) - theirs(x[:2])).abs().max().item()
    out: dict = {"batch": batch, "max_feature_difference_fp32": diff}
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name, dtype in dtypes.items():
        if dtype is torch.float16 and device.type != "cuda":
            continue
        for who, model in (("dinokit", ours), ("timm", theirs)):

            def call(model=model, dtype=dtype):
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
                ):
                    model(x)

            out[f"{who}_{name}_autocast" if dtype else f"{who}_fp32"] = rate(
                call, batch, warmup, iters, device
            )
    cast = cast_for_inference(copy.deepcopy(ours), torch.bfloat16)

    def call_cast():
        with torch.inference_mode():
            cast(x)

    out["dinokit_bf16_cast"] = rate(call_cast, batch, warmup, iters, device)
    for name in ("fp32", "bf16_autocast", "fp16_autocast"):
        if f"timm_{name}" in out:
            out[f"ratio_{name}"] = out[f"dinokit_{name}"] / out[f"timm_{name}"]
    return out


def pretrain_steps(device: torch.device, smoke: bool, compile_model: bool) -> dict:
    arch, batch, out_dim, local, warmup, iters = ("vit_tiny", 2, 256, 2, 1, 2) if smoke else \
        ("vit_small", 64, 65536, 8, 3, 10)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 3, 96, 96, generator=g) for _ in range(local)]
    crops = [c.to(device) for c in crops]
    dtype = resolve_precision("auto", device, training=True)
    out: dict = {"arch": f"{arch}/16", "batch": batch, "out_dim": out_dim, "crops": f"2x224 + {local}x96",
                 "dinokit_precision": precision_name(dtype)}  # fmt: skip
    values = {"lr": 1e-4, "wd": 0.04, "momentum": 0.996}
    for name, comp in (("dinokit", False), ("dinokit_compile", True)):
        if comp and not compile_model:
            continue
        cfg = PretrainConfig(
            arch=arch,
            out_dim=out_dim,
            local_crops=local,
            global_size=224,
            local_size=96,
            global_scale=(0.4, 1.0),
            warmup_epochs=0,
            epochs=100,
            compile=comp,
        )
        state = build_training_state(cfg, device, dtype)
        t = time.perf_counter()
        dino_step(state, crops, 1, values)
        sync(device)
        out[f"{name}_first_step_seconds"] = time.perf_counter() - t
        out[name] = rate(lambda state=state: dino_step(state, crops, 1, values), batch, warmup, iters, device)
        del state
    for prec in ("fp16", "fp32") if device.type == "cuda" else ("fp32",):
        plain = PlainDINO(arch, out_dim, 2 + local, 1000, batch, device, prec)
        its = iter(range(10**9))
        out[f"reference_style_{prec}"] = rate(lambda plain=plain, its=its: plain.step(next(its), 1, crops), batch,
                                              warmup, iters, device)  # fmt: skip
        out[f"ratio_vs_reference_style_{prec}"] = out["dinokit"] / out[f"reference_style_{prec}"]
        del plain
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def davis_frames(device: torch.device, smoke: bool) -> dict:
    from davis_speed import make_video

    from dinokit.eval.davis_run import segment_video
    from dinokit.eval.propagation import PropagationConfig

    n = 3 if smoke else 24
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_small", 16).eval().to(device)
    out: dict = {"frames": n, "size": "854x480"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seq = make_video(tmp / "video", n, *((96, 160) if smoke else ()))
        cfg = PropagationConfig()
        segment_video(model, seq, tmp / "warm", cfg, device, None, batch_size=2, num_workers=0)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            sync(device)
            t = time.perf_counter()
            res = segment_video(model, seq, tmp / name, cfg, device, dtype, 0, 2)
            sync(device)
            total = time.perf_counter() - t
            out[f"{name}_seconds_per_frame"] = total / n
            out[f"{name}_propagation_share"] = res.times.propagation / total
    if smoke:
        out["size"] = "160x96"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: check that every part runs")
    ap.add_argument(
        "--compile", action="store_true", help="also time the pretraining step under torch.compile"
    )
    args = ap.parse_args()
    device = resolve_device(args.device)
    figures: dict = {"device": str(device), "smoke": args.smoke, "torch": torch.__version__}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    parts = {"vit_inference": lambda: vit_inference(device, args.smoke),
             "pretrain": lambda: pretrain_steps(device, args.smoke, args.compile),
             "davis": lambda: davis_frames(device, args.smoke)}  # fmt: skip
    for name, part in parts.items():
        t = time.perf_counter()
        try:
            figures[name] = part()
        except Exception as e:  # one broken part must not lose the others' figures
            figures[name] = {"error": f"{type(e).__name__}: {e}"}
        figures[name]["seconds"] = time.perf_counter() - t
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Speed of ``dinokit davis`` against a per-frame, dense-affinity formulation (not a test).

Seconds per frame with vit_small/16 on a synthetic 854x480 video (frames resized to 832x480 as the
protocol says), split into feature extraction and label propagation, at fp32 and bf16, and the same
video through a formulation written here the way the reference evaluation works: one frame at a
time through the backbone, a dense (F, hw, hw) affinity times a dense window mask, top-k over all
context patches, upsampling, argmax, PNG. Everything in one run; it prints the ratios the project
holds itself to:

- propagation under 10% of the total time (dinokit, bf16);
- end to end at least 2.5x faster than the per-frame formulation with --precision bf16 (3x is the aim).

The per-frame formulation uses dinokit's backbone (fused attention), so the ratios measure the
batching, the windowed propagation and the precision; ``--reference-attention`` also times it with
the attention matrices formed explicitly, as the reference's model does. ``--memory`` adds the
whole-video peak memory at patch 8 on a 1152x480 video (in a subprocess).

    python benchmarks/davis_speed.py --frames 24 --device auto
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dinokit
from dinokit.data.davis import (
    FrameDataset,
    VideoSequence,
    first_frame_labels,
    read_mask,
    resize_labels_nearest,
)
from dinokit.data.palette import save_indexed_png
from dinokit.eval.davis_run import segment_video
from dinokit.eval.propagation import PropagationConfig
from dinokit.runtime import resolve_device


def make_video(
    root: Path, n_frames: int, height: int = 480, width: int = 854, seed: int = 0
) -> VideoSequence:
    """Three textured ellipses drifting over a smooth random background, with exact masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    bg = np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR)).astype(np.int16)
    textures = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(3)]
    frames_dir, masks_dir = root / "frames", root / "masks"
    frames_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n_frames):
        img = bg.copy()
        lab = np.zeros((height, width), np.uint8)
        for k in range(3):
            cy = height * (0.3 + 0.2 * k) + 20 * np.sin(t / 5 + k)
            cx = width * (0.2 + 0.3 * k) + 4 * t * (1 if k % 2 else -1)
            inside = ((yy - cy) / 70) ** 2 + ((xx - cx) / 110) ** 2 <= 1
            lab[inside] = k + 1
            img[inside] = textures[k][inside] // 2 + 100
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(frames_dir / f"{t:05d}.jpg", quality=90)
        if t == 0:
            save_indexed_png(lab, masks_dir / "00000.png")
    frames = sorted(frames_dir.glob("*.jpg"))
    return VideoSequence(name="bench", frames=frames, first_mask=masks_dir / "00000.png")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def per_frame_dense(model, seq: VideoSequence, out_dir: Path, cfg: PropagationConfig, device) -> dict:
    """The reference's shape: frame by frame, dense affinities, a dense window mask."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = FrameDataset(seq.frames)
    H, W = ds.original_size
    p = model.patch_size
    h, w = ds.size[0] // p, ds.size[1] // p
    mask = read_mask(seq.first_mask)
    first_seg = first_frame_labels(mask, (h, w)).unsqueeze(0).to(device)
    times = {"features": 0.0, "propagation": 0.0, "io": 0.0}

    def feature(i):
        t0 = time.perf_counter()
        x, _ = ds[i]
        t1 = time.perf_counter()
        out = model.get_intermediate_layers(x.unsqueeze(0).to(device), n=1)[0][0, 1:]
        _sync(device)
        times["io"] += t1 - t0
        times["features"] += time.perf_counter() - t1
        return out  # (hw, D)

    t0 = time.perf_counter()
    save_indexed_png(mask, out_dir / "00000.png")
    times["io"] += time.perf_counter() - t0
    feat0 = feature(0).T
    r = cfg.neighborhood
    ii = torch.arange(h, device=device).repeat_interleave(w)
    jj = torch.arange(w, device=device).repeat(h)
    window = (
        ((ii[:, None] - ii[None]).abs() <= r) & ((jj[:, None] - jj[None]).abs() <= r)
    ).float()  # (hw, hw)
    queue: list = []
    for t in range(1, len(seq.frames)):
        tar = feature(t)
        t1 = time.perf_counter()
        feats = [feat0] + [q[0] for q in queue]
        segs = [first_seg] + [q[1] for q in queue]
        src = F.normalize(torch.stack(feats), dim=1, p=2)  # (F, D, hw)
        tgt = F.normalize(tar, dim=1, p=2).unsqueeze(0).repeat(len(feats), 1, 1)
        aff = torch.exp(torch.bmm(tgt, src) / cfg.temperature) * window  # (F, hw, hw)
        aff = aff.transpose(2, 1).reshape(-1, h * w)
        kth = aff.topk(cfg.topk, dim=0).values.min(dim=0).values
        aff[aff < kth] = 0
        aff = aff / aff.sum(0, keepdim=True)
        seg_all = torch.cat(segs)
        C = seg_all.shape[1]
        seg = (seg_all.reshape(len(segs), C, -1).transpose(2, 1).reshape(-1, C).T @ aff).reshape(1, C, h, w)
        if len(queue) == cfg.n_last_frames:
            queue.pop(0)
        queue.append((tar.T, seg))
        up = F.interpolate(seg, scale_factor=p, mode="bilinear", align_corners=False)[0]
        for c in range(C):
            if up[c].max() > 0:
                up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
        lab = up.argmax(0).to(torch.uint8).cpu().numpy()
        _sync(device)
        t2 = time.perf_counter()
        times["propagation"] += t2 - t1
        save_indexed_png(resize_labels_nearest(lab, (H, W)), out_dir / f"{t:05d}.png")
        times["io"] += time.perf_counter() - t2
    return times


def memory_child(n_frames: int, device: str) -> None:
    """Whole video at patch 8 on 1152x480 frames: prints peak RSS (and CUDA peak) in GB."""
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        seq = make_video(Path(tmp), n_frames, height=480, width=1152)
        model = dinokit.build_backbone("vit_small", 8).eval().to(dev)
        t0 = time.perf_counter()
        segment_video(model, seq, Path(tmp) / "out", PropagationConfig(), dev, None, batch_size=2)
        dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    cuda = torch.cuda.max_memory_allocated(dev) / 1024**3 if dev.type == "cuda" else 0.0
    print(json.dumps({"peak_rss_gb": rss, "peak_cuda_gb": cuda, "seconds": dt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--batch-size", type=int, default=0, help="frames per feature batch (0 = auto, as dinokit davis)"
    )
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also the whole-video peak memory at patch 8")
    ap.add_argument(
        "--reference-attention",
        action="store_true",
        help="also time the per-frame formulation with explicit attention, as the reference's model",
    )
    ap.add_argument("--memory-frames", type=int, default=10)
    ap.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        memory_child(args.memory_frames, args.device)
        return
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_small", 16).eval().to(device)
    cfg = PropagationConfig()
    n = args.frames
    print(
        f"device {device}, vit_small/16, {n} frames of 854x480 (-> 832x480), torch threads {torch.get_num_threads()}"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seq = make_video(tmp / "video", n)
        # warm-up (kernels, allocator, thread pools)
        warm = VideoSequence("warm", seq.frames[:3], seq.first_mask)
        segment_video(model, warm, tmp / "warm", cfg, device, None, batch_size=2, num_workers=0)
        t0 = time.perf_counter()
        base = per_frame_dense(model, seq, tmp / "dense", cfg, device)
        base["total"] = time.perf_counter() - t0
        rows["per-frame dense, fp32"] = base
        if args.reference_attention:
            # the reference's model forms every attention matrix explicitly
            model.set_fused_attention(False)
            t0 = time.perf_counter()
            ref = per_frame_dense(model, seq, tmp / "dense_explicit", cfg, device)
            ref["total"] = time.perf_counter() - t0
            rows["  same, explicit attn"] = ref
            model.set_fused_attention(True)
        for name, dtype in (("dinokit, fp32", None), ("dinokit, bf16", torch.bfloat16)):
            out = tmp / name.replace(", ", "_")
            t0 = time.perf_counter()
            res = segment_video(model, seq, out, cfg, device, dtype, args.batch_size, args.num_workers)
            total = time.perf_counter() - t0
            rows[name] = {"features": res.times.features, "propagation": res.times.propagation,
                          "io": res.times.io, "total": total}  # fmt: skip
            differ = np.mean([
                np.mean(np.array(Image.open(out / f.name)) != np.array(Image.open(tmp / "dense" / f.name)))
                for f in sorted((tmp / "dense").glob("*.png"))
            ])  # fmt: skip
            print(f"{name}: {100 * differ:.3f}% of mask pixels differ from the per-frame dense formulation")
    print(
        f"\n{'seconds per frame':<24}{'features':>10}{'propagation':>13}{'io/wait':>10}{'total':>10}{'prop %':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<24}{r['features'] / n:>10.4f}{r['propagation'] / n:>13.4f}{r['io'] / n:>10.4f}"
            f"{r['total'] / n:>10.4f}{100 * r['propagation'] / r['total']:>7.1f}%"
        )
    b = rows["per-frame dense, fp32"]["total"]
    for name in ("dinokit, fp32", "dinokit, bf16"):
        print(
            f"end to end speed-up of {name} over the per-frame dense formulation: {b / rows[name]['total']:.2f}x"
        )
        if args.reference_attention:
            r = rows["  same, explicit attn"]["total"]
            print(
                f"  ... and over it with the reference's explicit attention: {r / rows[name]['total']:.2f}x"
            )
    bf = rows["dinokit, bf16"]
    share = bf["propagation"] / bf["total"]
    speed = b / bf["total"]
    print(
        f"goal: propagation < 10% of total (bf16): {100 * share:.1f}% -> {'met' if share < 0.10 else 'NOT met'}"
    )
    print(
        f"goal: end to end >= 2.5x with bf16: {speed:.2f}x -> {'met' if speed >= 2.5 else 'NOT met'} (aim 3x)"
    )
    if args.memory:
        cmd = [sys.executable, __file__, "--_memory-child", "--memory-frames", str(args.memory_frames),
               "--device", args.device]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print("memory run failed:", r.stderr.strip().splitlines()[-1:])
        else:
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"whole video, vit_small/8, 1152x480, {args.memory_frames} frames: peak RSS {m['peak_rss_gb']:.2f} GB"
                + (f", peak CUDA {m['peak_cuda_gb']:.2f} GB" if m["peak_cuda_gb"] else "")
                + f", {m['seconds'] / args.memory_frames:.2f} s/frame"
            )


if __name__ == "__main__":
    main()

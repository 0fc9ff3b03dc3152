"""`dinokit features` on phone photos and on small images, against the timm + PIL script a user writes.

Whole processes, interleaved rounds (the order alternating), the median of the rounds kept, in
wall-clock seconds and in the process's CPU seconds (all its threads; less disturbed by other
programs on a shared machine):
`dinokit features` (at its defaults, at --precision fp32 and bf16, and with --exact-decode) against
a ten-line script with timm's ``vit_small_patch16_224``, PIL and torchvision's evaluation transform
(fp32, and bf16 under autocast). Every model is a random ViT-S/16: the work per image is what counts
here. Also the cosine of dinokit's features (reduced decode) to those of --exact-decode on the same
files. The processor is named and the load average printed at the start and the end.

    python benchmarks/photos.py                      # 48 phone JPEGs, 96 small ones, 2 rounds
    python benchmarks/photos.py --phone 24 --small 0 --rounds 3 --json out.json

Goals (issue 28): phone JPEGs: dinokit at its defaults >= 2.0x the timm script in fp32, with
features within cosine 0.999 of the exact decode; small (500x375) images: >= 1.3x.

The pictures: each is a bundled photograph (cropped, flipped and tinted differently for each file) resized
up with Lanczos to the phone size, with Gaussian sensor noise added (sigma 3 grey levels per channel),
and saved as a baseline JPEG at quality 90 with 4:2:0 chroma, as phone cameras write them. Every
``exif_every``-th phone picture is stored the way a phone stores a portrait: the pixels landscape,
EXIF orientation 6 (turn 90 degrees clockwise to view).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: colour photographs bundled with scikit-image (no download); the grey ones are turned into RGB
SOURCES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "camera",
    "coins",
    "clock",
    "moon",
)
PHONE = (4032, 3024)
SMALL = (500, 375)


def source_photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SOURCES:
            a = getattr(skimage.data, name)()
            a = a[0] if isinstance(a, tuple) else a
            if a.ndim == 2:
                a = np.stack([a] * 3, axis=-1)
            out.append(np.ascontiguousarray(a[..., :3]))
    return out


def make_photos(
    folder: str | Path, n: int, size: tuple[int, int], exif_every: int = 0, seed: int = 0, quality: int = 90
) -> list[Path]:
    """``n`` JPEGs of ``size`` (width, height, as viewed landscape) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = source_photos()
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        # a different crop, flip and tint for each file, so no two files are the same picture
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        a = src[y : y + ch, x : x + cw].astype(np.float32)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = np.clip(a * rng.uniform(0.85, 1.15, size=3), 0, 255).astype(np.uint8)
        img = Image.fromarray(a).resize(size, Image.LANCZOS)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 3.0, (size[1], size[0], 3)).astype(np.float32)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = folder / f"photo{i:04d}.jpg"
        exif = Image.Exif()
        if exif_every and i % exif_every == exif_every - 1:
            # a portrait as a phone stores it: landscape pixels that EXIF orientation 6 turns upright
            img = img.resize((size[1], size[0]), Image.BILINEAR).transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
        img.save(path, quality=quality, subsampling="4:2:0", exif=exif.tobytes())
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The script a user writes: timm's ViT-S/16, PIL, torchvision's evaluation transform
# ---------------------------------------------------------------------------------------------
TIMM_SCRIPT = r"""
import sys, pathlib, torch, timm
from PIL import Image
from torchvision import transforms as T
folder, out, precision, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
paths = sorted(p for p in pathlib.Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
feats = []
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
    for i in range(0, len(paths), batch):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
        feats.append(model(x).float())
torch.save({"paths": [str(p) for p in paths], "features": torch.cat(feats)}, out)
"""


# ---------------------------------------------------------------------------------------------
# Whole processes, interleaved
# ---------------------------------------------------------------------------------------------
def dinokit_cmd(folder: Path, out: Path, batch: int, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name("dinokit")
    return [
        str(exe),
        "features",
        "--weights",
        "random",
        "--arch",
        "vit_small",
        "--patch-size",
        "16",
        "--data",
        str(folder),
        "--output",
        str(out),
        "--batch-size",
        str(batch),
        "--quiet",
        "--overwrite",
        *extra,
    ]


def configs(folder: Path, work: Path, batch: int) -> dict[str, list[str]]:
    script = work / "timm_pil.py"
    script.write_text(TIMM_SCRIPT)
    py = sys.executable
    return {
        "timm+PIL fp32": [py, str(script), str(folder), str(work / "timm32.pt"), "fp32", str(batch)],
        "timm+PIL bf16 (autocast)": [
            py,
            str(script),
            str(folder),
            str(work / "timm16.pt"),
            "bf16",
            str(batch),
        ],
        "dinokit features (defaults)": dinokit_cmd(folder, work / "dk.pt", batch),
        "dinokit --precision fp32": dinokit_cmd(folder, work / "dk32.pt", batch, "--precision", "fp32"),
        "dinokit --precision bf16": dinokit_cmd(folder, work / "dk16.pt", batch, "--precision", "bf16"),
        "dinokit fp32 --exact-decode": dinokit_cmd(
            folder, work / "dk32x.pt", batch, "--precision", "fp32", "--exact-decode"
        ),
    }


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a whole process; the CPU time (user + system, all its threads)
    is what other programs on a shared machine disturb less."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def features_of(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["features"].float()


def bench(name: str, folder: Path, work: Path, rounds: int, batch: int, n: int) -> dict:
    cmds = configs(folder, work, batch)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order, so drift hits all alike
        for k in order:
            wall, used = timed(cmds[k])
            times[k].append(wall)
            cpu[k].append(used)
            print(
                f"  {name} round {r + 1}: {k:30s} {wall:7.1f} s, {used:7.1f} CPU s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    cos = torch.nn.functional.cosine_similarity(features_of(work / "dk32.pt"), features_of(work / "dk32x.pt"))
    cos_default = torch.nn.functional.cosine_similarity(
        features_of(work / "dk.pt"), features_of(work / "dk32x.pt")
    )
    print(f"\n{name}: {n} images, batch {batch}, median of {rounds} rounds (whole processes)")
    t32, t16 = "timm+PIL fp32", "timm+PIL bf16 (autocast)"
    for k in names:
        print(
            f"  {k:30s} {med[k]:7.1f} s  {1000 * med[k] / n:7.1f} ms/image  {med[t32] / med[k]:5.2f}x timm fp32  "
            f"{med[t16] / med[k]:5.2f}x timm bf16 | CPU {med_cpu[k]:7.1f} s  {med_cpu[t32] / med_cpu[k]:5.2f}x  "
            f"{med_cpu[t16] / med_cpu[k]:5.2f}x"
        )
    print(
        f"  cosine of dinokit fp32 (reduced decode) to its --exact-decode features: min {cos.min():.6f} "
        f"mean {cos.mean():.6f}"
    )
    print(
        f"  cosine of dinokit at its defaults to fp32 --exact-decode: min {cos_default.min():.6f} "
        f"mean {cos_default.mean():.6f}"
    )
    return {
        "images": n,
        "times": times,
        "cpu_times": cpu,
        "median": med,
        "median_cpu": med_cpu,
        "cosine_reduced_vs_exact_min": float(cos.min()),
        "cosine_default_vs_exact_fp32_min": float(cos_default.min()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phone", type=int, default=48, help="phone-size JPEGs (0: none)")
    ap.add_argument("--small", type=int, default=96, help="500x375 JPEGs (0: none)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per batch, both sides (16: a 48-photo folder makes three batches, so "
        "decoding the next overlaps the model)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dinokit-photos-bench",
        help="where the pictures are made (kept for a rerun) and the features written",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from dinokit.runtime import describe_runtime

    info = describe_runtime()
    print(
        f"processor: {info['cpu']} ({info['cpu_count']} cores, {info['cpu_capability']}, native bf16: "
        f"{info['cpu_native_bf16']}); torch {info['torch']}; load average at start {os.getloadavg()}"
    )
    results = {"processor": info["cpu"], "load_start": os.getloadavg()}
    for name, n, size, exif in (("phone", args.phone, PHONE, 4), ("small", args.small, SMALL, 0)):
        if not n:
            continue
        folder = args.work / f"{name}-{n}"
        if len(list(folder.glob("*.jpg"))) != n:
            print(f"making {n} {size[0]}x{size[1]} JPEGs in {folder} ...", flush=True)
            make_photos(folder, n, size, exif_every=exif, seed=1 if name == "small" else 0)
        work = args.work / f"out-{name}"
        work.mkdir(parents=True, exist_ok=True)
        results[name] = bench(name, folder, work, args.rounds, args.batch_size, n)
    results["load_end"] = os.getloadavg()
    print(f"load average at the end {results['load_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

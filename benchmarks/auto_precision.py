"""What `--precision auto` should mean for the embedding commands (features, similar, duplicates, attn's
maps) on a CPU with native bf16: bf16 (weights cast once) against fp32, on real photographs.

For each backbone: the speed of the forward pass at 224 px (batch 64, interleaved rounds, the best
kept) and how far bf16's outputs are from fp32's on the photos: the cosine of the CLS features
(min, 1st percentile, mean), the cosine of the copy descriptor (CLS + GeM, what similar and
duplicates compare), whether each photo's nearest neighbour among the others stays the same, and the
agreement (IoU) of the attention masks that keep 60% of each head's mass.

The photos are scikit-image's bundled photographs and the phone JPEGs of benchmarks/photos.py
(cropped, flipped, tinted copies: near neighbours exist, as in a real folder). ``--weights`` adds a
checkpoint (e.g. a released DINO ViT-S/16) to the random backbones.

    python benchmarks/auto_precision.py [--weights dino_vits16.pth] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from dinokit.checkpoints import load_backbone
from dinokit.data.images import ImageDataset
from dinokit.data.transforms import eval_transform
from dinokit.eval.attention import mass_threshold
from dinokit.eval.descriptors import copy_descriptor
from dinokit.runtime import describe_runtime, inference_model

sys.path.insert(0, str(Path(__file__).parent))
from photos import PHONE, SMALL, make_photos  # noqa: E402


def photos(work: Path) -> torch.Tensor:
    folder = work / "precision-photos"
    if len(list(folder.glob("*.jpg"))) != 96:
        make_photos(folder / "small", 72, SMALL, seed=3)
        make_photos(folder / "phone", 24, PHONE, exif_every=4, seed=4)
    paths = sorted(folder.rglob("*.jpg"))
    ds = ImageDataset(paths, transform=eval_transform())
    return torch.stack([ds[i][0] for i in range(len(ds))])


def rate(model, x: torch.Tensor, rounds: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        model(x[:8])
        for _ in range(rounds):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return len(x) / best


@torch.inference_mode()
def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    cls, desc, attn = [], [], []
    for i in range(0, len(x), 32):
        b = x[i : i + 32]
        cls.append(model(b).float())
        desc.append(copy_descriptor(model, b).float())
        attn.append(model.get_cls_attention(b).float() if hasattr(model, "get_cls_attention") else None)
    return {
        "cls": torch.cat(cls),
        "desc": torch.cat(desc),
        "attn": torch.cat(attn) if attn[0] is not None else None,
    }


def compare(a: dict, b: dict) -> dict[str, float]:
    cos = torch.nn.functional.cosine_similarity(a["cls"], b["cls"])
    dcos = torch.nn.functional.cosine_similarity(a["desc"], b["desc"])

    def nearest(f):
        f = torch.nn.functional.normalize(f, dim=1)
        s = f @ f.T
        s.fill_diagonal_(-2)
        return s.argmax(dim=1)

    out = {
        "cls_cos_min": float(cos.min()),
        "cls_cos_p1": float(torch.quantile(cos, 0.01)),
        "cls_cos_mean": float(cos.mean()),
        "desc_cos_min": float(dcos.min()),
        "same_nearest_cls": float((nearest(a["cls"]) == nearest(b["cls"])).float().mean()),
        "same_nearest_desc": float((nearest(a["desc"]) == nearest(b["desc"])).float().mean()),
    }
    if a["attn"] is not None:
        ma, mb = mass_threshold(a["attn"], 0.6), mass_threshold(b["attn"], 0.6)
        inter = (ma & mb).sum(-1).float()
        union = (ma | mb).sum(-1).float().clamp_min(1)
        out["attn_mask_iou_mean"] = float((inter / union).mean())
        out["attn_mask_iou_min"] = float((inter / union).min())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", action="append", default=[], help="a checkpoint to add (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp") / "dinokit-photos-bench")
    args = ap.parse_args()
    info = describe_runtime()
    print(
        f"processor: {info['cpu']} ({info['cpu_count']} cores, {info['cpu_capability']}, native bf16: "
        f"{info['cpu_native_bf16']}), {torch.get_num_threads()} threads; load {os.getloadavg()}"
    )
    x = photos(args.work)
    print(f"{len(x)} photos at 224 px (72 of 500x375, 24 phone JPEGs, 6 of them EXIF-rotated)")
    backbones = [("random vit_small/16", "random", "vit_small"), ("random vit_base/16", "random", "vit_base")]
    backbones += [(w, w, None) for w in args.weights]
    for name, weights, arch in backbones:
        torch.manual_seed(0)
        fp32 = load_backbone(weights, arch, 16 if arch else None).eval()
        bf16, _ = inference_model(fp32, torch.bfloat16)
        r32 = r16 = 0.0
        for _ in range(args.rounds):  # interleaved, the best of each kept
            r32 = max(r32, rate(fp32, x[:64], 1))
            r16 = max(r16, rate(bf16, x[:64], 1))
        diff = compare(outputs(fp32, x), outputs(bf16, x))
        print(f"\n{name}: fp32 {r32:.1f} images/s, bf16 {r16:.1f} images/s: bf16 is {r16 / r32:.2f}x")
        for k, v in diff.items():
            print(f"  {k:22s} {v:.6f}")
    print(f"\nload at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

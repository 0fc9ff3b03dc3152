#!/usr/bin/env bash
# Every protocol on the built-in data, for a pretrained checkpoint and for the same network at random
# init, side by side (the figures the issues' closing notes quote). Not run by CI.
#   WEIGHTS=runs/pretrain/backbone.pth DATA=runs/shared OUT=runs/figures bash benchmarks/pretrained_vs_random.sh
# DATA must hold classify/ video/ copydays/ from `dinokit synth classify|video|copydays`.
set -euo pipefail
WEIGHTS=${WEIGHTS:?set WEIGHTS to a dinokit pretrain backbone.pth}
DATA=${DATA:-runs/shared}
OUT=${OUT:-runs/figures}
ARCH=${ARCH:-vit_tiny}
PATCH=${PATCH:-16}
SIZE=${SIZE:-96}
C="$DATA/classify"
mkdir -p "$OUT"
for name in random pretrained; do
  if [ "$name" = random ]; then W=(--weights random --arch "$ARCH" --patch-size "$PATCH" --seed 0); else W=(--weights "$WEIGHTS"); fi
  o="$OUT/$name"
  dinokit knn "${W[@]}" --train "$C/train" --val "$C/val" --resize "$SIZE" --image-size "$SIZE" --output "$o/knn" --overwrite -q
  dinokit linear "${W[@]}" --train "$C/train" --val "$C/val" --resize "$SIZE" --image-size "$SIZE" --features-only \
    --epochs 100 --lr 0.5 --output "$o/linear" --overwrite -q
  dinokit linear --train-features "$o/linear/train_features.pt" --val-features "$o/linear/val_features.pt" \
    --logistic --output "$o/logistic" --overwrite -q
  dinokit attn "${W[@]}" --images "$C/val" --masks "$C/masks/val" --image-size "$SIZE" --output "$o/attn" --overwrite -q
  dinokit davis "${W[@]}" --data "$DATA/video" --image-size 240 --output "$o/davis" --overwrite -q
  dinokit copydetect "${W[@]}" --data "$DATA/copydays/copydays" --image-size 128 --output "$o/copydetect" --overwrite -q
  dinokit finetune "${W[@]}" --train "$C/train" --val "$C/val" --epochs 5 --batch-size 32 --image-size "$SIZE" \
    --output "$o/finetune" --overwrite -q
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def get(name, path, *keys):
    try:
        m = json.loads((out / name / path / "metrics.json").read_text())
        for k in keys:
            m = m[k]
        return m
    except (OSError, KeyError, TypeError, ValueError):
        return None
rows = [
    ("k-NN 20-NN top-1 (%)", "knn", ("knn", "20", "top1")),
    ("linear top-1, final (%)", "linear", ("linear", "final", "top1")),
    ("logistic top-1 (%)", "logistic", ("logistic", "top1")),
    ("attention Jaccard", "attn", ("jaccard",)),
    ("DAVIS J&F-Mean", "davis", ("J&F-Mean",)),
    ("Copydays strong mAP", "copydetect", ("mAP", "strong")),
    ("fine-tuned top-1, 5 epochs (%)", "finetune", ("top1",)),
]
print(f"| metric | random init | pretrained |\n|---|---|---|")
for title, d, keys in rows:
    r, p = get("random", d, *keys), get("pretrained", d, *keys)
    f = (lambda v: "-" if v is None else f"{v:.3f}" if v <= 1.0 and "%" not in title else f"{v:.1f}")
    print(f"| {title} | {f(r)} | {f(p)} |")
PY

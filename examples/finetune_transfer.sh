#!/usr/bin/env bash
# Fine-tuning transfer (paper, Table 6, DeiT recipe), top-1 ViT-S/16 supervised / DINO:
#   CIFAR-10 99.0 / 99.0, CIFAR-100 89.5 / 90.5, iNat18 70.7 / 72.0, iNat19 76.6 / 78.2,
#   Flowers 98.2 / 98.5, Cars 92.1 / 93.0, ImageNet 79.9 / 81.5.
# DATA is an ImageFolder with train/ and val/.
source "$(dirname "$0")/_common.sh"
DATA=${DATA:-/data/flowers102}
MODEL=${MODEL:-dino_vits16}
OUT=${OUT:-runs/finetune-$(basename "$DATA")-$MODEL}
GPUS=${GPUS:-1}
need "$DATA/train" "a labelled data set (train/ and val/ ImageFolder roots)"
torchrun --nproc-per-node "$GPUS" -m dinokit finetune --weights "$MODEL" --train "$DATA/train" --val "$DATA/val" \
  --epochs 100 --batch-size 128 --lr 5e-4 --weight-decay 0.05 --label-smoothing 0.1 --drop-path 0.1 \
  --randaugment 9 --mixup 0.8 --cutmix 1.0 \
  --output "$OUT"
# the from-scratch baseline the paper compares with
torchrun --nproc-per-node "$GPUS" -m dinokit finetune --weights random --arch vit_small --patch-size 16 \
  --train "$DATA/train" --val "$DATA/val" --epochs 100 --batch-size 128 --output "$OUT-random"

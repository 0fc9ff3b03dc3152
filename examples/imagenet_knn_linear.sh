#!/usr/bin/env bash
# Frozen-feature evaluation of the released weights on ImageNet val (paper, Table 2):
#   ViT-S/16: 20-NN 74.5, linear 77.0 | ViT-S/8: 78.3, 79.7 | ViT-B/16: 76.1, 78.2 | ViT-B/8: 77.4, 80.1
#   ResNet-50: 67.5, 75.3
source "$(dirname "$0")/_common.sh"
IMAGENET=${IMAGENET:-/data/imagenet}
MODEL=${MODEL:-dino_vits16}
OUT=${OUT:-runs/imagenet-$MODEL}
GPUS=${GPUS:-1}
need "$IMAGENET/val" "ImageNet (train/ and val/ as ImageFolder roots)"
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$MODEL" --data "$IMAGENET/train" --output "$OUT/train.pt" --precision fp32
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$MODEL" --data "$IMAGENET/val" --output "$OUT/val.pt" --precision fp32
dinokit knn --train-features "$OUT/train.pt" --val-features "$OUT/val.pt" --k 10,20,100,200 --temperature 0.07 --output "$OUT/knn"
# the released linear heads, validated without training
dinokit linear --weights "$MODEL" --evaluate --linear-weights "$MODEL" --train "$IMAGENET/train" --val "$IMAGENET/val" --output "$OUT/linear-released"
# training the probe as the reference: 100 epochs, SGD, lr 0.001 * batch / 256, cosine; ViT-S: last 4 CLS tokens;
# the paper's global batch is 1024 (the reference's 8 GPUs x 128; the learning rate follows it) and it
# sweeps the learning rate per model
torchrun --nproc-per-node "$GPUS" -m dinokit linear --weights "$MODEL" --train "$IMAGENET/train" --val "$IMAGENET/val" --epochs 100 \
  --batch-size $((1024 / GPUS)) --output "$OUT/linear"

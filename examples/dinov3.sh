#!/usr/bin/env bash
# DINOv3 (Simeoni et al. 2025) ViT-S/16 through DINO's protocols: k-NN and linear on ImageNet, DAVIS
# label propagation and attention maps. DINOv3 weights are released under the DINOv3 licence: request
# them at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (or on Hugging Face,
# facebook/dinov3-vits16-pretrain-lvd1689m) and give the file or folder as WEIGHTS, or put the
# release file in torch.hub's cache and use the preset name dinov3_vits16.
# The DINOv3 README quotes no ImageNet k-NN / linear figures for the distilled ViTs.
source "$(dirname "$0")/_common.sh"
IMAGENET=${IMAGENET:-/data/imagenet}
DAVIS=${DAVIS:-/data/DAVIS}
WEIGHTS=${WEIGHTS:-${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/dinov3_vits16_pretrain_lvd1689m-08c60483.pth}
OUT=${OUT:-runs/dinov3_vits16}
GPUS=${GPUS:-1}
need "$WEIGHTS" "the DINOv3 ViT-S/16 weights (see the licence note at the top of this script)"
need "$IMAGENET/val" "ImageNet (train/ and val/ as ImageFolder roots)"
need "$DAVIS/JPEGImages/480p" "the DAVIS 2017 trainval folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)"
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$WEIGHTS" --data "$IMAGENET/train" --output "$OUT/train.pt" --precision fp32
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$WEIGHTS" --data "$IMAGENET/val" --output "$OUT/val.pt" --precision fp32
dinokit knn --train-features "$OUT/train.pt" --val-features "$OUT/val.pt" --k 10,20 --temperature 0.07 --output "$OUT/knn"
torchrun --nproc-per-node "$GPUS" -m dinokit linear --weights "$WEIGHTS" --train "$IMAGENET/train" --val "$IMAGENET/val" \
  --epochs 10 --output "$OUT/linear"
# RoPE needs no position table: DAVIS frames at 480 px go in at their own aspect ratio
dinokit davis --data "$DAVIS" --weights "$WEIGHTS" --output "$OUT/davis"
# attention of the CLS token over the patches (the 4 storage tokens are left out of the maps)
dinokit attn "$DAVIS/JPEGImages/480p/bike-packing" --weights "$WEIGHTS" --image-size 480 --output "$OUT/attn"

#!/usr/bin/env bash
# DINOv2 (Oquab et al. 2023) and its register models (Darcet et al. 2024) through DINO's protocols.
# ImageNet-1k top-1 in the DINOv2 README: ViT-S/14 k-NN 79.0, linear 81.1 (with registers 79.1, 80.9);
#   ViT-B/14 82.1 / 84.5; ViT-L/14 83.5 / 86.3; ViT-g/14 83.5 / 86.5.
# The registers paper's point, seen in the attention maps: compare MODEL with MODEL_REG on VOC12.
source "$(dirname "$0")/_common.sh"
IMAGENET=${IMAGENET:-/data/imagenet}
VOC=${VOC:-/data/VOCdevkit/VOC2012}
MODEL=${MODEL:-dinov2_vits14}
MODEL_REG=${MODEL_REG:-dinov2_vits14_reg}
OUT=${OUT:-runs/$MODEL}
GPUS=${GPUS:-1}
need "$IMAGENET/val" "ImageNet (train/ and val/ as ImageFolder roots)"
need "$VOC/SegmentationObject" "PASCAL VOC 2012 (JPEGImages, SegmentationObject, ImageSets/Segmentation)"
# k-NN on the CLS token (224 px centre crops of 256: a 16 x 16 grid of 14-pixel patches)
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$MODEL" --data "$IMAGENET/train" --output "$OUT/train.pt" --precision fp32
torchrun --nproc-per-node "$GPUS" -m dinokit features --weights "$MODEL" --data "$IMAGENET/val" --output "$OUT/val.pt" --precision fp32
dinokit knn --train-features "$OUT/train.pt" --val-features "$OUT/val.pt" --k 10,20 --temperature 0.07 --output "$OUT/knn"
# DINOv2's linear protocol: CLS of the last 4 blocks followed by the average patch token (the default
# for DINOv2/v3); --n-last-blocks 1 and --no-avgpool-patch-tokens give the other three settings it searches
torchrun --nproc-per-node "$GPUS" -m dinokit linear --weights "$MODEL" --train "$IMAGENET/train" --val "$IMAGENET/val" \
  --epochs 10 --output "$OUT/linear"
# attention maps and their Jaccard on VOC12 (480 px is cropped to 476, a 34 x 34 grid), without and with registers
for m in "$MODEL" "$MODEL_REG"; do
  dinokit attn --images "$VOC/JPEGImages" --masks "$VOC/SegmentationObject" \
    --image-list "$VOC/ImageSets/Segmentation/val.txt" --weights "$m" --attention-mass 0.6 --image-size 480 \
    --objects instance --output "runs/voc12-attention-$m"
done

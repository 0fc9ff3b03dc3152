#!/usr/bin/env bash
# Attention maps segment objects (paper, the table of Fig. 4): Jaccard of the best head's 60%-mass mask with
# each VOC12 val object: ViT-S/16 DINO 45.9 (supervised 27.3, random 22.0); ViT-S/8 44.7.
source "$(dirname "$0")/_common.sh"
VOC=${VOC:-/data/VOCdevkit/VOC2012}
MODEL=${MODEL:-dino_vits16}
OUT=${OUT:-runs/voc12-attention-$MODEL}
need "$VOC/SegmentationObject" "PASCAL VOC 2012 (JPEGImages, SegmentationObject, ImageSets/Segmentation)"
dinokit attn --images "$VOC/JPEGImages" --masks "$VOC/SegmentationObject" \
  --image-list "$VOC/ImageSets/Segmentation/val.txt" --weights "$MODEL" --attention-mass 0.6 --image-size 480 \
  --objects instance --output "$OUT"
# the random-init baseline of the table
dinokit attn --images "$VOC/JPEGImages" --masks "$VOC/SegmentationObject" \
  --image-list "$VOC/ImageSets/Segmentation/val.txt" --weights random --arch vit_small --patch-size 16 \
  --attention-mass 0.6 --image-size 480 --output "$OUT-random"

#!/usr/bin/env bash
# Your own folder of images, end to end: pretrain a small ViT with DINO, embed the folder, look at
# attention maps and find near-duplicates. Labels are optional; with an ImageFolder layout
# (ROOT/<class>/<image>) for TRAIN and VAL, a k-NN evaluation runs too.
#   IMAGES=~/photos OUT=runs/mine bash examples/own_folder.sh
source "$(dirname "$0")/_common.sh"
IMAGES=${IMAGES:-data/shapes/train}
TRAIN=${TRAIN:-}
VAL=${VAL:-}
OUT=${OUT:-runs/own-folder}
EPOCHS=${EPOCHS:-100}
if [ "$IMAGES" = "data/shapes/train" ] && [ ! -d "$IMAGES" ]; then
  dinokit synth classify --output data/shapes     # a built-in folder when none is given
  TRAIN=data/shapes/train VAL=data/shapes/val
fi
need "$IMAGES" "a folder of images"
dinokit pretrain --data "$IMAGES" --output "$OUT/pretrain" --arch vit_small --patch-size 16 --epochs "$EPOCHS" \
  --global-size 96 --local-size 48 --batch-size 64
W="$OUT/pretrain/backbone.pth"
dinokit features --weights "$W" --data "$IMAGES" --output "$OUT/features.pt" --resize 96 --image-size 96
dinokit attn "$IMAGES" --weights "$W" --image-size 224 --output "$OUT/attention"
dinokit duplicates "$IMAGES" --weights "$W" --image-size 224 --output "$OUT/duplicates"
if [ -n "$TRAIN" ] && [ -n "$VAL" ]; then
  dinokit knn --weights "$W" --train "$TRAIN" --val "$VAL" --resize 96 --image-size 96 --output "$OUT/knn"
fi
echo "Results in $OUT"

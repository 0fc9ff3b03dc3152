#!/usr/bin/env bash
# Copydays copy detection (paper, Table 4): strong mAP ViT-B/16 at 224: 81.7; ViT-B/8 at 320: 85.5,
# with 10k YFCC100M distractors in the database and 20k other YFCC100M images to learn the whitening.
source "$(dirname "$0")/_common.sh"
COPYDAYS=${COPYDAYS:-/data/copydays}     # original/ strong/ jpegqual/<q>/ crops/<c>/
DISTRACTORS=${DISTRACTORS:-/data/yfcc10k}
WHITENING=${WHITENING:-/data/yfcc20k}
MODEL=${MODEL:-dino_vitb8}
SIZE=${SIZE:-320}
OUT=${OUT:-runs/copydays-$MODEL-$SIZE}
need "$COPYDAYS/original" "the Copydays images"
need "$DISTRACTORS" "10k distractor images"
need "$WHITENING" "20k images to learn the whitening"
dinokit copydetect --data "$COPYDAYS" --weights "$MODEL" --image-size "$SIZE" --k 20 \
  --distractors "$DISTRACTORS" --whitening "$WHITENING" --output "$OUT"

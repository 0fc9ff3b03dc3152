#!/usr/bin/env bash
# DAVIS 2017 val, semi-supervised video object segmentation by label propagation (paper, Table 5):
#   J&F-Mean ViT-S/16 61.8 (J 60.2, F 63.4), ViT-B/16 62.3, ViT-S/8 69.9, ViT-B/8 71.4.
# Defaults are the reference code's (the paper follows Jabri et al.'s protocol): 7 previous frames + the
# first, window radius 12, top-5, temperature 0.1.
source "$(dirname "$0")/_common.sh"
DAVIS=${DAVIS:-/data/DAVIS}
MODEL=${MODEL:-dino_vits16}
OUT=${OUT:-runs/davis-$MODEL}
need "$DAVIS/JPEGImages/480p" "the DAVIS 2017 trainval folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)"
dinokit davis --data "$DAVIS" --weights "$MODEL" --n-last-frames 7 --neighborhood 12 --k 5 --temperature 0.1 \
  --output "$OUT"
# the results folder can be scored again on its own
dinokit davis-score --gt "$DAVIS" --pred "$OUT" --output "$OUT/score"

#!/usr/bin/env bash
# Image retrieval on revisited Oxford and Paris (paper, Table 3), mAP Medium / Hard:
#   ViT-S/16 trained on ImageNet (preset dino_vits16):            ROx 41.8 / 13.7, RPar 63.1 / 34.4;
#   trained on Google Landmarks v2 (preset dino_vits16_googlelandmark): ROx 51.5 / 24.3, RPar 75.3 / 51.6.
# The settings per data set are the DINO reference's (its README, "Image Retrieval on revisited Oxford
# and Paris"): Oxford at --imsize 224 without multi-scale, Paris at --imsize 512 with multi-scale, whole
# query images, and by default the Google Landmarks v2 weights. The paper does not list the settings
# behind its ImageNet row; this script uses the same per-data-set settings for both models.
source "$(dirname "$0")/_common.sh"
DATA=${DATA:-/data/revisitop}           # holds roxford5k/ and rparis6k/ (jpg/ + gnd_*.pkl)
MODEL=${MODEL:-dino_vits16_googlelandmark}
need "$DATA/roxford5k" "the revisited roxford5k data set"
dinokit retrieval --data "$DATA/roxford5k" --dataset roxford5k --weights "$MODEL" --image-size 224 \
  --output "runs/retrieval-roxford5k-$MODEL"
need "$DATA/rparis6k" "the revisited rparis6k data set"
dinokit retrieval --data "$DATA/rparis6k" --dataset rparis6k --weights "$MODEL" --image-size 512 --multiscale \
  --output "runs/retrieval-rparis6k-$MODEL"

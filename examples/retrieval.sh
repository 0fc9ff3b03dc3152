#!/usr/bin/env bash
# Image retrieval on revisited Oxford and Paris (paper, Table 8), mAP Medium / Hard:
#   ViT-S/16 trained on ImageNet: ROx 41.8 / 13.7, RPar 63.1 / 34.4;
#   trained on Google Landmarks v2 (preset dino_vits16_googlelandmark): ROx 51.5 / 24.3, RPar 75.3 / 51.6.
source "$(dirname "$0")/_common.sh"
DATA=${DATA:-/data/revisitop}           # holds roxford5k/ and rparis6k/ (jpg/ + gnd_*.pkl)
MODEL=${MODEL:-dino_vits16}
for ds in roxford5k rparis6k; do
  need "$DATA/$ds" "the revisited $ds data set"
  dinokit retrieval --data "$DATA/$ds" --dataset "$ds" --weights "$MODEL" --image-size 224 --multiscale \
    --output "runs/retrieval-$ds-$MODEL"
done

#!/usr/bin/env bash
# The README's performance figures in one go: the processor first (`dinokit info`), then each
# benchmark, every output kept in one folder. Run it twice on an idle machine and compare the two
# folders; a figure goes into the README only when both runs agree within 15%.
#   bash benchmarks/figures.sh [OUT]        (about 7 minutes on a 2-core CPU plus photos.py, which took 25 minutes on one shared at load 15; lightly, a peer of the
#   pretraining benchmark, comes with `pip install -e ".[bench]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/figures-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "   ($((SECONDS - t0)) s)" | tee -a "$OUT/commands.txt"
}
dinokit info --json > "$OUT/info.json"
dinokit info
uptime | tee "$OUT/load.txt"
run vit_throughput python benchmarks/vit_throughput.py --rounds 2 --json "$OUT/vit_throughput.json"
run pretrain_throughput python benchmarks/pretrain_throughput.py --images 64 --epochs 2 --json "$OUT/pretrain_throughput.json"
run knn_speed python benchmarks/knn_speed.py
run davis_speed python benchmarks/davis_speed.py --frames 12
run photos python benchmarks/photos.py --rounds 2 --json "$OUT/photos.json"
uptime | tee -a "$OUT/load.txt"
echo "figures in $OUT"

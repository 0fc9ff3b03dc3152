#!/usr/bin/env bash
# The GPU check, prepared to run as one command on a CUDA machine (a few minutes on one GPU):
#   1. the test suite's CUDA-marked tests (fp16 with a gradient scaler, bf16, torchrun with nccl and
#      one process per GPU, the DAVIS GPU path);
#   2. the throughput figures (benchmarks/gpu_figures.py: ViT-S/16 inference vs timm, DINO
#      pretraining steps vs the reference-style loop, DAVIS seconds per frame);
# and writes one JSON with both. Without a GPU it runs end to end all the same: the CUDA tests are
# skipped and the figures are taken at toy sizes on the CPU ("smoke": true), which checks the script.
#
#   bash benchmarks/gpu_check.sh [OUT.json]        (default gpu_check.json; PYTHON=... to choose)
#   GPU_CHECK_COMPILE=1 also times the pretraining step under torch.compile
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
echo "== CUDA available: $CUDA"
[ "$CUDA" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== CUDA-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests --junitxml="$WORK/tests.xml" 2>&1 | tail -n 15
TESTS_RC=${PIPESTATUS[0]}

echo "== throughput figures"
FIG_ARGS=(--json "$WORK/figures.json")
[ "$CUDA" = 1 ] || FIG_ARGS+=(--smoke)
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] && FIG_ARGS+=(--compile)
"$PY" benchmarks/gpu_figures.py "${FIG_ARGS[@]}"
FIG_RC=$?

"$PY" - "$WORK" "$OUT" "$TESTS_RC" "$FIG_RC" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, tests_rc, fig_rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
report = {"tests": {"exit_code": tests_rc}, "figures": None}
xml = work / "tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    report["tests"]["cases"] = cases
    for k in ("passed", "failure", "error", "skipped"):
        report["tests"][k] = sum(c["outcome"] == k for c in cases)
fig = work / "figures.json"
report["figures"] = json.loads(fig.read_text()) if fig.is_file() else {"error": f"gpu_figures.py exited {fig_rc}"}
out.write_text(json.dumps(report, indent=2))
t = report["tests"]
print(f"== wrote {out}: tests passed {t.get('passed')}, failed {t.get('failure')}, errors {t.get('error')}, "
      f"skipped {t.get('skipped')}; figures on {report['figures'].get('device')}"
      f"{' (smoke sizes)' if report['figures'].get('smoke') else ''}")
PYEOF
# pytest exits 5 when every selected test was skipped or none was selected (no GPU): not a failure
if [ "$TESTS_RC" != 0 ] && [ "$TESTS_RC" != 5 ]; then exit "$TESTS_RC"; fi
exit "$FIG_RC"

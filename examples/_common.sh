# Shared by the example scripts: stop with one sentence when a data folder is missing.
set -euo pipefail
need() {
  if [ ! -e "$1" ]; then
    echo "This example needs $2 at $1 (set the variable at the top of the script or in the environment)." >&2
    exit 2
  fi
}

#!/usr/bin/env bash
# Loader throughput: difftrain's modes and PyTorch's DataLoader on the same data, in one run.
#   scripts/bench/loader.sh [BUILD_DIR] [BATCHES]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
batches=${2:-200}
python=${PYTHON:-$root/.venv/bin/python}
cd "$root"
echo "# $(date -u +%F) $(nproc) cores; $("$python" -c 'import torch; print("torch", torch.__version__)')"
"$build/bench/bench_loader" configs/quickstart.json "$batches"
"$python" scripts/bench/loader_baseline.py /usr/share/datasets/fashion-mnist "$batches"

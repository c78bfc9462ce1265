#!/usr/bin/env bash
# JPEG decode throughput, one thread: difftrain (stb_image, libjpeg-turbo full size and
# DCT-scaled, each alone and with augment to R) against PIL and torchvision on the same files.
#   scripts/bench/decode.sh [BUILD_DIR] [R]      (R = 64)
# For each size (256x256, 512x384, 1024x768): 32 files made by make_bench_jpegs.py in a temp dir.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
R=${2:-64}
python=${PYTHON:-$root/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "# $(date -u +%F) $(nproc) cores; $("$python" -c 'import torch; print("torch", torch.__version__)'); libturbojpeg $(pkg-config --modversion libturbojpeg 2>/dev/null || echo '?'); R = $R"
for size in 256x256 512x384 1024x768; do
  "$python" "$root/scripts/bench/make_bench_jpegs.py" "$tmp/$size" 32 "${size%x*}" "${size#*x}"
  echo "## $size"
  "$build/bench/bench_decode" "$tmp/$size" "$R"
  "$python" "$root/scripts/bench/decode_baseline.py" "$tmp/$size" "$R"
done

#!/usr/bin/env bash
# One call on the GPU machine: build against its PyTorch, report the environment, run every
# test (the `gpu` label included) and the benchmarks, and print a summary last.
# Prepare here with scripts/fetch-gpu-deps.sh, then: run(command="bash scripts/gpu-check.sh", carry=[".gpu-deps"]).
# GPU_CHECK_REQUIRE_CUDA=0 lets it run on a machine without a GPU (to test the script itself).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/build-gpu}
mkdir -p "$out"
log=$out/gpu-check.log
exec > >(tee "$log") 2>&1
require_cuda=${GPU_CHECK_REQUIRE_CUDA:-1}
python=${PYTHON:-python3}
deps=$root/.gpu-deps/root/usr
build=$root/build-gpu
status=0
step() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"
nvcc --version 2>/dev/null | tail -1 || echo "nvcc: not found"
torch_prefix=$("$python" -c 'import torch, torch.utils; print(torch.utils.cmake_prefix_path)') || { echo "no PyTorch for $python"; exit 1; }
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

step "configure and build"
prefix="$torch_prefix"
[ -d "$deps" ] && prefix="$prefix;$deps" && export LD_LIBRARY_PATH="$deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
      -DCMAKE_INCLUDE_PATH="$deps/include" -DTORCH_CUDA_ARCH_LIST=9.0 >"$out/configure.log" 2>&1 \
  || { tail -40 "$out/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" >"$out/build.log" 2>&1 || { grep -E "error|FAILED" "$out/build.log" | head -40; exit 1; }
echo "configure + build: $(( $(date +%s) - start )) s"

step "difftrain env"
"$build/difftrain" env
if [ "$require_cuda" = 1 ]; then
  "$build/difftrain" env --device cuda >/dev/null || { echo "FAIL: CUDA is not usable to difftrain"; status=1; }
fi

step "tests (all labels)"
ctest --test-dir "$build" --output-on-failure -j 8 || status=1

step "benchmarks"
if [ -d scripts/bench ] && ls scripts/bench/*.sh >/dev/null 2>&1; then
  for b in scripts/bench/*.sh; do bash "$b" "$build" || status=1; done
else
  echo "no benchmarks yet"
fi

step "summary"
echo "gpu-check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status

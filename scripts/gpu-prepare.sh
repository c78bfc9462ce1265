#!/usr/bin/env bash
# Run HERE, on the CPU build machine: stage what a GPU machine needs to test this build without
# building there, in the git-ignored folder .gpu-carry/ (docs/GPU.md). Then, on the GPU machine,
# from the repository root: bash scripts/gpu-verify.sh
#
#   scripts/gpu-prepare.sh [--build-dir DIR] [--no-build] [--labels "gpu unit"] [--no-deps]
#                          [--max-mb N] [--out DIR]
#
#   --build-dir DIR  the CUDA build to stage (default: $BUILD_DIR, else build); built first with
#                    `make build BUILD_DIR=DIR` unless --no-build
#   --no-build       stage DIR as it is (it must hold difftrain and the test binaries)
#   --labels L       ctest labels whose test binaries are staged (default "gpu unit": what
#                    gpu-verify.sh runs; e2e and distributed tests train on the CPU)
#   --no-deps        leave out the -dev packages for the rebuild-on-the-device fallback
#   --max-mb N       fail when the folder is larger than N MB (10^6 bytes; default 48: the device run
#                    carries 64 MiB with the source tree)
#   --out DIR        the staging folder (default .gpu-carry)
#
# What it stages (gpu-verify.sh --dry-run checks all of it):
#   bin/        difftrain and the test binaries, stripped, RUNPATH $ORIGIN/../lib
#   lib/        the shared libraries they need that a PyTorch machine lacks (not LibTorch, CUDA,
#               NCCL, cuDNN, glibc, libstdc++, libgcc_s: those come from the device's own torch)
#   tests.tsv   one line per test binary: name, ctest label, timeout in seconds
#   wheels/     diffusers (pure Python), for the PyTorch side of the benchmark and the reference
#               tensors; the device's Python has every other package diffusers imports
#   data/fashion-mnist/  a real Fashion-MNIST subset (4096 train, 1024 test images) when this
#               machine has the dataset; else gpu-verify.sh writes random stand-in IDX files
#   deps.tar.gz Debian -dev packages (headers, spdlog, fmt, stb, gtest, gloo), only for a rebuild
#               on the device when its torch build differs from the stamp
#   stamp.txt   the torch build the binaries were linked against, the glibc they need, ...
#   MANIFEST    sha256 of every file above (checked on the device after the copy)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

build_dir=${BUILD_DIR:-build}
do_build=1 with_deps=1 max_mb=48 carry=.gpu-carry labels="gpu unit"
diffusers_version=0.42.1  # scripts/requirements.txt pins the same
while [ $# -gt 0 ]; do
  case $1 in
    --build-dir) build_dir=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --labels) labels=$2; shift 2 ;;
    --no-deps) with_deps=0; shift ;;
    --max-mb) max_mb=$2; shift 2 ;;
    --out) carry=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-prepare: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done
die() { echo "gpu-prepare: FAIL: $*" >&2; exit 1; }
note() { echo "gpu-prepare: $*"; }
for tool in ldd readelf strip sha256sum; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
have_patchelf=1
command -v patchelf >/dev/null || { have_patchelf=0; note "WARNING: patchelf is not installed (apt-get install patchelf): the binaries keep this machine's RUNPATH"; }

# 1. The build.
if [ "$do_build" = 1 ]; then
  note "make build BUILD_DIR=$build_dir"
  make build BUILD_DIR="$build_dir"
fi
build_dir=$(cd "$build_dir" 2>/dev/null && pwd) || die "no build directory $build_dir"
bin=$build_dir/difftrain
[ -x "$bin" ] || die "no $bin: build first (make build BUILD_DIR=$build_dir) or drop --no-build"
cache=$build_dir/CMakeCache.txt
[ -f "$cache" ] || die "$build_dir has no CMakeCache.txt"
cache_get() { sed -n "s/^$1:[A-Z]*=//p" "$cache" | head -1; }
readelf -d "$bin" | grep -q 'NEEDED.*libtorch_cuda\.so' \
  || die "$bin does not link libtorch_cuda.so: not a CUDA build (configure against a CUDA LibTorch)"
arch_list=$(cache_get TORCH_CUDA_ARCH_LIST)
arch_list=${arch_list:-${TORCH_CUDA_ARCH_LIST:-9.0}}
case ";$arch_list;" in *";9.0;"*|*";9.0a;"*) ;; *) die "TORCH_CUDA_ARCH_LIST is '$arch_list': the GPU machine is an H200 (9.0)" ;; esac
source_dir=$(cache_get CMAKE_HOME_DIRECTORY)
[ "$source_dir" = "$root" ] || note "WARNING: $build_dir was built from $source_dir, not $root: the carried binaries are that tree's, the scripts and configs this one's"
venv=$(cache_get DIFFTRAIN_VENV)
python=${PYTHON:-$venv/bin/python}
[ -x "$python" ] || python=$root/.venv/bin/python
"$python" -c 'import torch' 2>/dev/null || die "$python cannot import torch (set PYTHON to the build's venv python)"
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
site=$(dirname "$(dirname "$torch_lib")")
linked=$(ldd "$bin" | awk '$1 == "libtorch_cpu.so" {print $3}')
[ "$(dirname "$linked")" = "$torch_lib" ] || note "WARNING: $bin resolves libtorch_cpu.so to $linked, not to $python's $torch_lib"

# 2. The binaries: difftrain and the test executables of the chosen labels. ctest's own files
#    name absolute build paths, so the labels are read from gtest_discover_tests' include files
#    (TEST_PROPERTIES [==[LABELS;unit;...;TIMEOUT;300]==]) into tests.tsv.
carry_abs=$root/$carry
case $carry in /*) carry_abs=$carry ;; esac
rm -rf "$carry_abs"
mkdir -p "$carry_abs"/{bin,lib,wheels,data}
install -m 0755 "$bin" "$carry_abs/bin/difftrain"
printf '# name\tlabel\ttimeout_s  (from %s/tests/*_include.cmake)\n' "$build_dir" > "$carry_abs/tests.tsv"
staged=() skipped=()
for inc in "$build_dir"/tests/test_*\[1\]_include.cmake; do
  [ -e "$inc" ] || continue
  name=$(basename "$inc" '[1]_include.cmake')
  props=$(sed -n 's/.*TEST_PROPERTIES \[==\[\(.*\)\]==\].*/\1/p' "$inc")
  label=$(awk -F';' '{for (i = 1; i < NF; i++) if ($i == "LABELS") print $(i + 1)}' <<< "$props")
  timeout=$(awk -F';' '{for (i = 1; i < NF; i++) if ($i == "TIMEOUT") print $(i + 1)}' <<< "$props")
  [ -n "$label" ] || die "no LABELS in $inc"
  case " $labels " in *" $label "*) ;; *) skipped+=("$name($label)"); continue ;; esac
  if [ ! -x "$build_dir/tests/$name" ]; then
    note "WARNING: $name ($label) is registered but not built: not staged"; continue
  fi
  install -m 0755 "$build_dir/tests/$name" "$carry_abs/bin/$name"
  printf '%s\t%s\t%s\n' "$name" "$label" "${timeout:-300}" >> "$carry_abs/tests.tsv"
  staged+=("$name($label)")
done
[ ${#staged[@]} -gt 0 ] || die "no test binaries with labels '$labels' in $build_dir/tests"
note "test binaries staged: ${staged[*]}"
[ ${#skipped[@]} -eq 0 ] || note "left out (labels not in '$labels'): ${skipped[*]}"
awk -F'\t' '$2 == "gpu" {found = 1} END {exit !found}' "$carry_abs/tests.tsv" \
  || note "WARNING: no test binary labelled gpu (tests/test_gpu.cpp) built in $build_dir: gpu-verify.sh tests the unit label only"

# 3. The shared libraries the device lacks. Its PyTorch provides LibTorch and the CUDA, cuDNN and
#    NCCL libraries (torch/lib, nvidia/*/lib); its system provides glibc, libstdc++ and libgcc_s.
provided() {  # soname resolved-path
  case $1 in
    linux-vdso.so.*|ld-linux-x86-64.so.*|libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libutil.so.*|libresolv.so.*) return 0 ;;
    libstdc++.so.*|libgcc_s.so.*) return 0 ;;
    libtorch*|libc10*|libgomp.so.*|libshm.so|libcaffe2_*) return 0 ;;
    libcuda.so.*|libcudart.so.*|libcublas*|libcudnn*|libcufft*|libcufile*|libcurand*|libcusolver*|libcusparse*|libnccl*|libnvrtc*|libnvJitLink*|libnvshmem*|libnvToolsExt*|libnvtx*|libcupti*) return 0 ;;
  esac
  case $2 in "$site"/torch/*|"$site"/nvidia/*) return 0 ;; esac
  return 1
}
declare -A carried=()
for f in "$carry_abs"/bin/*; do
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    [ "$path" != "not" ] || die "ldd $f: $soname not found on this machine"
    provided "$soname" "$path" && continue
    carried[$soname]=$path
  done < <(ldd "$f")
done
for soname in "${!carried[@]}"; do
  cp -L "${carried[$soname]}" "$carry_abs/lib/$soname"
  chmod 0755 "$carry_abs/lib/$soname"
done
note "libraries carried: ${!carried[*]}"

# Strip, and point RUNPATH at lib/ (LibTorch then comes from LD_LIBRARY_PATH alone: the build
# venv's path no longer hides a missing library here).
strip --strip-unneeded "$carry_abs"/bin/* "$carry_abs"/lib/*
if [ "$have_patchelf" = 1 ]; then
  # shellcheck disable=SC2016  # $ORIGIN is the dynamic linker's, not the shell's
  for f in "$carry_abs"/bin/*; do patchelf --set-rpath '$ORIGIN/../lib' "$f"; done
  # shellcheck disable=SC2016
  for f in "$carry_abs"/lib/*; do patchelf --set-rpath '$ORIGIN' "$f"; done
fi

# The newest glibc / libstdc++ symbol versions the carried files need (the device's must be >=).
max_version() {  # prefix files...
  objdump -T "${@:2}" 2>/dev/null | grep -o "$1[0-9.]*" | sed "s/^$1//" | sort -V | tail -1
}
glibc_required=$(max_version GLIBC_ "$carry_abs"/bin/* "$carry_abs"/lib/*)
glibcxx_required=$(max_version GLIBCXX_ "$carry_abs"/bin/* "$carry_abs"/lib/*)

# 4. diffusers for the Python side (the benchmark's reference step, the reference tensors).
#    On Python >= 3.8 diffusers imports importlib.metadata from the standard library; its other
#    requirements (huggingface-hub >= 1.32, safetensors >= 0.8, numpy, filelock, requests, regex,
#    Pillow) are installed on the GPU machine (.library/device/KINDS.md).
wheel=diffusers-$diffusers_version-py3-none-any.whl
if [ ! -f ".whl/$wheel" ]; then
  note "downloading $wheel into .whl/ (for the device's CPython 3.12)"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "diffusers==$diffusers_version" \
    || die "cannot download diffusers==$diffusers_version (put $wheel into .whl/ by hand)"
fi
cp ".whl/$wheel" "$carry_abs/wheels/"

# 5. Training data: a real Fashion-MNIST subset (the full set is 30 MB of gzip).
fmnist=${DIFFTRAIN_TEST_DATA:-/usr/share/datasets/fashion-mnist}
if [ -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
  "$python" - "$fmnist" "$carry_abs/data/fashion-mnist" <<'EOF'
import gzip, os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for split, n in (("train", 4096), ("t10k", 1024)):
    for kind, header, item in (("images", 16, 28 * 28), ("labels", 8, 1)):
        name = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        with gzip.open(os.path.join(src, name)) as f:
            head = bytearray(f.read(header))
            body = f.read(n * item)
        head[4:8] = n.to_bytes(4, "big")  # the count field
        with gzip.open(os.path.join(dst, name), "wb", compresslevel=9) as f:
            f.write(bytes(head) + body)
with open(os.path.join(dst, "SUBSET"), "w") as f:
    f.write("the first 4096 train and 1024 t10k images of Fashion-MNIST (not the 60000/10000 of the full set)\n")
EOF
  note "data: Fashion-MNIST subset from $fmnist"
else
  note "WARNING: no Fashion-MNIST at $fmnist: gpu-verify.sh will write random stand-in IDX data"
fi

# 6. The -dev packages, for a rebuild on the device when its torch differs (scripts/fetch-gpu-deps.sh).
#    Packed: 8 MB of headers and libraries in 300 files become one ~2 MB file.
if [ "$with_deps" = 1 ]; then
  deps_tmp=$(mktemp -d)
  scripts/fetch-gpu-deps.sh "$deps_tmp" 2> >(grep -v 'unsandboxed' >&2) >/dev/null || die "scripts/fetch-gpu-deps.sh failed"
  rm -rf "$deps_tmp"/root/usr/share/{doc,man,lintian,bug}
  tar -C "$deps_tmp" -czf "$carry_abs/deps.tar.gz" root
  rm -rf "$deps_tmp"
fi

# 7. The stamp and the manifest.
commit=$(git -C "$source_dir" rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$source_dir" status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+dirty"
"$python" - "$carry_abs/stamp.txt" <<EOF
import sys, torch
lines = {
    "format": "difftrain-gpu-carry/1",
    "torch_version": torch.__version__,
    "torch_git_version": torch.version.git_version,
    "torch_cuda": torch.version.cuda or "none",
    "cuda_arch_list": "$arch_list",
    "difftrain_version": "$("$bin" --version 2>/dev/null | head -1 | awk '{print $2}')",
    "source_commit": "$commit",
    "glibc_required": "$glibc_required",
    "glibcxx_required": "$glibcxx_required",
    "labels": "$labels",
    "built_in": "$build_dir",
    "build_python": "$python",
    "prepared": "$(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(uname -n)",
}
with open(sys.argv[1], "w") as f:
    f.writelines(f"{k}={v}\n" for k, v in lines.items())
EOF
(cd "$carry_abs" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum > "$carry_abs.MANIFEST")
mv "$carry_abs.MANIFEST" "$carry_abs/MANIFEST"

# 8. Size, and a start under a clean environment with LibTorch from LD_LIBRARY_PATH only.
bytes=$(du -sb "$carry_abs" | cut -f1)
limit=$((max_mb * 1000 * 1000))
note "$carry: $(( bytes / 1000 )) kB in $(find "$carry_abs" -type f | wc -l) files (limit $max_mb MB)"
[ "$bytes" -le "$limit" ] || { du -sh "$carry_abs"/* >&2; die "$carry is $bytes bytes, over the $max_mb MB limit"; }
ld_path=$carry_abs/lib:$torch_lib$(for d in "$site"/nvidia/*/lib; do printf ':%s' "$d"; done)
env -i LD_LIBRARY_PATH="$ld_path" "$carry_abs/bin/difftrain" --version >/dev/null \
  || die "the staged difftrain does not start with LD_LIBRARY_PATH=$ld_path"
env -i LD_LIBRARY_PATH="$ld_path" "$carry_abs/bin/test_config" --gtest_list_tests >/dev/null \
  || die "the staged test_config does not start"
note "OK: the staged binaries start under env -i with LibTorch from LD_LIBRARY_PATH"
cat "$carry_abs/stamp.txt"
note "next: bash scripts/gpu-verify.sh --dry-run here, then on the GPU machine bash scripts/gpu-verify.sh (docs/GPU.md)"

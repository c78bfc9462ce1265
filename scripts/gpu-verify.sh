#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, after scripts/gpu-prepare.sh staged .gpu-carry/
# here and both travelled there (docs/GPU.md):
#
#   bash scripts/gpu-verify.sh [--dry-run] [--carry DIR] [--out DIR]
#
# It runs the carried binaries against that machine's own PyTorch (LD_LIBRARY_PATH: its torch/lib
# and nvidia/*/lib, then .gpu-carry/lib), in stages, each under `timeout`:
#   preflight  nvidia-smi; the carry folder complete and intact (MANIFEST); the stamp's torch build
#              against the device's torch.version.git_version (different: the rebuild stage runs);
#              glibc new enough; ldd finds every library; diffusers installed from the carried wheel
#   rebuild    only when the torch builds differ: cmake + ninja there, as scripts/gpu-check.sh does
#   env        difftrain env --device cuda
#   tests      the `gpu` label (test_gpu, test_groupnorm_silu_cuda), then the `unit` label, with
#              DIFFTRAIN_TEST_* pointing here
#   e2e        on CUDA with the carried data: bf16 training stopped by SIGTERM (exit 75) and resumed
#              with --resume latest; fp16 training; difftrain sample; a 1-process NCCL world (torchrun)
#   bench      optional, last, with the time the others left: scripts/bench/train.sh for
#              configs/cifar10_ddpm.json (batch 128, bf16) and the quickstart model (bf16): difftrain
#              with the speed switches off, each on alone and all on, against the diffusers step in
#              PyTorch eager and under torch.compile; its failure does not fail `overall`
# and writes $OUT/summary.md (one row per stage: status, seconds, key figure), printed last.
# Without $OUT it writes to build-gpu-verify/. Files in it: summary.md, gpu-verify.log (everything),
# env.json, tests.txt, bench.md (the benchmark tables), bench.jsonl (their rows).
#
# --dry-run (on the CPU machine): walks every stage and prints the exact commands instead of
# running what needs a GPU; what needs none runs for real: the carry folder, MANIFEST and stamp
# checks, ldd and a start of each binary against a local torch, the wheel install, the data.
# Exit 0 when the staged folder is complete and sound.
#
# Environment:
#   GPU_VERIFY_T_PREFLIGHT=40, _REBUILD=300, _ENV=25, _TESTS=150, _E2E=100: the timeouts in
#       seconds (315 s for the correctness stages without a rebuild, which skips the bench)
#   GPU_VERIFY_TOTAL=525        the whole call's limit: the bench stage gets what the others left of
#                               it (less 10 s), and is skipped under 60 s; the device tool stops a
#                               command at 540 s
#   GPU_VERIFY_T_BENCH=S        at most S seconds for the bench stage
#   GPU_VERIFY_BENCH_COMPILE=0  leave torch.compile out of the benchmark
#   GPU_VERIFY_BENCH_SWITCHES=L the speed switches to measure (train.sh --switches: all, none, or a
#                               comma-separated list; default all)
#   GPU_VERIFY_BENCH_ARGS="..." more train.sh options for both configs (e.g. "--steps 200")
#   GPU_VERIFY_STAGES="env e2e" run only these stages (and preflight and rebuild, which they need)
#   GPU_VERIFY_DEVICE=cpu       test this script itself without a GPU (no nvidia-smi; env, e2e and
#                               bench on the CPU, Gloo instead of NCCL)
#   PYTHON                      the machine's python with torch (default python3)
# The stage_* functions are called by name ("stage_$s"), which shellcheck cannot follow.
# shellcheck disable=SC2317
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
self=$root/scripts/gpu-verify.sh
stages=(preflight rebuild env tests e2e bench)

# ---------------------------------------------------------------------------------------------
# Helpers, shared by the parent and the stage processes.

say() { echo "$*"; }
fail() { echo "FAIL: $*"; exit 1; }
key() { printf '%s' "$*" > "$GV_WORK/key.$GV_STAGE"; }  # the stage's key figure for summary.md
dry() { [ "$GV_DRY" = 1 ]; }
# Print a command exactly (to fd 3, the stage's output, whatever the command's redirections),
# then run it unless this is a dry run. xo FILE: stdout to FILE; xr FILE: stdout and stderr.
show() {
  local a words=()
  for a in "${@:2}"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then words+=("$a"); else words+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "  \$ ${words[*]}$1" >&3
}
x() { show "" "$@"; dry || "$@"; }
xo() { local f=$1; shift; show " > $f" "$@"; dry || "$@" > "$f"; }
xr() { local f=$1; shift; show " > $f 2>&1" "$@"; dry || "$@" > "$f" 2>&1; }
bindir() { cat "$GV_WORK/bindir"; }
stamp_get() { sed -n "s/^$1=//p" "$GV_CARRY/stamp.txt" | head -1; }
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$2" ]; }  # $1 >= $2

# ---------------------------------------------------------------------------------------------
# Stages. Each runs in its own process (under timeout), or in a subshell in a dry run.

stage_preflight() {
  say "GPU:"
  if dry; then x nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  elif [ "$GV_DEV" = cpu ]; then say "  GPU_VERIFY_DEVICE=cpu: no GPU needed (a test of this script)"; gpu="CPU (GPU_VERIFY_DEVICE=cpu)"
  else
    gpu=$(x nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) || fail "nvidia-smi failed"
    say "  $gpu"
  fi

  say "the carry folder $GV_CARRY:"
  for f in stamp.txt MANIFEST tests.tsv bin/difftrain; do [ -s "$GV_CARRY/$f" ] || fail "$GV_CARRY/$f is missing: run scripts/gpu-prepare.sh"; done
  (cd "$GV_CARRY" && sha256sum --quiet -c MANIFEST) || fail "$GV_CARRY does not match its MANIFEST (changed or cut short in transit)"
  unlisted=$(cd "$GV_CARRY" && comm -13 <(awk '{print $2}' MANIFEST | LC_ALL=C sort) <(find . -type f ! -name MANIFEST -printf '%P\n' | LC_ALL=C sort))
  [ -z "$unlisted" ] || say "  WARNING: files not in MANIFEST: $unlisted"
  say "  MANIFEST: $(wc -l < "$GV_CARRY/MANIFEST") files intact, $(du -sh "$GV_CARRY" | cut -f1)"
  ls "$GV_CARRY"/wheels/diffusers-*.whl >/dev/null 2>&1 || fail "no diffusers wheel in $GV_CARRY/wheels"
  while IFS=$'\t' read -r name label timeout; do
    case $name in '#'*|'') continue ;; esac
    [ -x "$GV_CARRY/bin/$name" ] || fail "tests.tsv names $name, not in $GV_CARRY/bin"
    case $label in gpu|unit|e2e|distributed) ;; *) fail "tests.tsv: $name has an unknown label '$label'" ;; esac
    [[ $timeout =~ ^[0-9]+$ ]] || fail "tests.tsv: $name has a bad timeout '$timeout'"
  done < "$GV_CARRY/tests.tsv"
  awk -F'\t' '$2 == "gpu" {found = 1} END {exit !found}' "$GV_CARRY/tests.tsv" \
    || say "  WARNING: no test binary labelled gpu (test_gpu) staged: the gpu label is not tested"

  say "the stamp:"
  declare -A want=(
    [format]='^difftrain-gpu-carry/1$' [torch_version]='^[0-9]+\.[0-9]+\.[0-9]+' [torch_git_version]='^[0-9a-f]{40}$'
    [torch_cuda]='^[0-9]+\.[0-9]+$' [cuda_arch_list]='9\.0' [glibc_required]='^[0-9]+\.[0-9]+$'
    [glibcxx_required]='^[0-9]+\.[0-9]+\.[0-9]+$' [source_commit]='^([0-9a-f]{40}(\+dirty)?|unknown)$')
  for k in "${!want[@]}"; do
    v=$(stamp_get "$k")
    [[ $v =~ ${want[$k]} ]] || fail "stamp.txt: $k='$v' does not match ${want[$k]}"
  done
  sed 's/^/  /' "$GV_CARRY/stamp.txt"

  say "this machine's torch ($GV_PY):"
  read -r tv tgit tcuda tavail < <("$GV_PY" -c 'import torch; print(torch.__version__, torch.version.git_version, torch.version.cuda, torch.cuda.is_available())') \
    || fail "$GV_PY cannot import torch"
  say "  torch $tv, git $tgit, CUDA $tcuda, GPU available: $tavail"
  dry || [ "$GV_DEV" = cpu ] || [ "$tavail" = True ] || fail "torch.cuda.is_available() is False"
  match="= stamp"
  if [ "$tgit" != "$(stamp_get torch_git_version)" ]; then
    match="!= stamp ($(stamp_get torch_version) $(stamp_get torch_git_version | cut -c1-10)): rebuild"
    say "  torch build differs from the stamp: the rebuild stage builds against this one"
    touch "$GV_WORK/rebuild"
  else
    say "  same torch build as the stamp: the carried binaries are used"
  fi

  glibc=$(ldd --version | head -1 | grep -o '[0-9]\+\.[0-9]\+$')
  version_ge "$glibc" "$(stamp_get glibc_required)" || fail "glibc $glibc is older than the $(stamp_get glibc_required) the binaries need"
  libstdcxx=$(ldd "$GV_CARRY/bin/difftrain" | awk '$1 ~ /^libstdc\+\+/ {print $3}')
  glibcxx=$(grep -ao 'GLIBCXX_[0-9.]*[0-9]' "$libstdcxx" 2>/dev/null | sed 's/GLIBCXX_//' | sort -V | tail -1)
  [ -n "$glibcxx" ] || fail "cannot read the GLIBCXX versions of ${libstdcxx:-libstdc++}"
  version_ge "$glibcxx" "$(stamp_get glibcxx_required)" || fail "$libstdcxx has GLIBCXX $glibcxx, older than the $(stamp_get glibcxx_required) the binaries need"
  say "  glibc $glibc (needs $(stamp_get glibc_required)), libstdc++ GLIBCXX $glibcxx (needs $(stamp_get glibcxx_required))"

  say "libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"
  for f in "$GV_CARRY"/bin/*; do
    missing=$(ldd "$f" 2>&1 | grep 'not found' | awk '{print $1}' | sort -u | tr '\n' ' ')
    [ -z "$missing" ] || fail "ldd $f: not found: $missing"
  done
  say "  ldd: every library of $(find "$GV_CARRY/bin" -type f | wc -l) binaries found"
  "$GV_CARRY/bin/difftrain" --version > /dev/null || fail "$GV_CARRY/bin/difftrain does not start"
  if dry; then  # on the device the tests stage starts them anyway
    for f in "$GV_CARRY"/bin/test_*; do
      n=$("$f" --gtest_list_tests 2>/dev/null | grep -c '^  ') || fail "$f --gtest_list_tests failed"
      printf '%s=%s\n' "$(basename "$f")" "$n" >> "$GV_WORK/test_counts"
    done
    say "  every binary starts; tests listed: $(tr '\n' ' ' < "$GV_WORK/test_counts")"
  fi
  if ! grep -q DIFFTRAIN_TEST_SOURCE_DIR "$GV_CARRY"/bin/test_config 2>/dev/null; then
    say "  WARNING: the test binaries predate the DIFFTRAIN_TEST_* overrides (tests/test_paths.h): tests that read the source tree look in $(stamp_get built_in)/.."
  fi

  say "diffusers from the carried wheel:"
  "$GV_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GV_WORK/site" \
    "$GV_CARRY"/wheels/*.whl || fail "pip install of the carried wheels failed"
  dver=$("$GV_PY" -c 'import diffusers; print(diffusers.__version__)') || fail "diffusers does not import"
  say "  diffusers $dver in $GV_WORK/site"

  say "data:"
  if [ -f "$GV_CARRY/data/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
    echo "$GV_CARRY/data/fashion-mnist" > "$GV_WORK/datadir"
    say "  $(cat "$GV_CARRY/data/fashion-mnist/SUBSET" 2>/dev/null || echo "Fashion-MNIST in $GV_CARRY/data")"
  else
    "$GV_PY" - "$GV_WORK/data" <<'EOF' || fail "cannot write stand-in data"
import gzip, os, sys
import numpy as np
out = sys.argv[1]; os.makedirs(out, exist_ok=True); rng = np.random.default_rng(0)
for split, n in (("train", 4096), ("t10k", 1024)):
    with gzip.open(f"{out}/{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
    with gzip.open(f"{out}/{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
open(f"{out}/SUBSET", "w").write("random stand-in IDX data, 4096 train and 1024 t10k images of 28x28\n")
EOF
    echo "$GV_WORK/data" > "$GV_WORK/datadir"
    say "  random stand-in IDX data in $GV_WORK/data"
  fi
  key "${gpu:-(dry run)}; torch $tv $match; glibc $glibc"
}

stage_rebuild() {
  needed=1
  if [ ! -f "$GV_WORK/rebuild" ]; then
    say "the stamp matches this machine's torch: nothing to rebuild"; key "not needed"; needed=0
    dry || exit 3
    say "(dry run: the commands it runs when the stamp differs)"
  fi
  [ -f "$GV_CARRY/deps.tar.gz" ] || fail "no $GV_CARRY/deps.tar.gz: run scripts/gpu-prepare.sh without --no-deps"
  x mkdir -p "$GV_WORK/deps"
  x tar -C "$GV_WORK/deps" -xzf "$GV_CARRY/deps.tar.gz" || fail "cannot unpack deps.tar.gz"
  deps=$GV_WORK/deps/root/usr
  prefix=$("$GV_PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || fail "no torch.utils.cmake_prefix_path"
  pyroot=$("$GV_PY" -c 'import sys; print(sys.prefix)')
  targets=(difftrain)
  while IFS=$'\t' read -r name _; do case $name in '#'*|'') ;; *) targets+=("$name") ;; esac; done < "$GV_CARRY/tests.tsv"
  build=$GV_WORK/build
  x cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$prefix;$deps" \
    "-DCMAKE_INCLUDE_PATH=$deps/include" -DTORCH_CUDA_ARCH_LIST=9.0 "-DDIFFTRAIN_VENV=$pyroot" || fail "configure failed"
  x cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" || fail "build failed"
  if [ "$needed" = 0 ]; then exit 3; fi
  if ! dry; then
    mkdir -p "$GV_WORK/bin"
    ln -sf "$build/difftrain" "$GV_WORK/bin/difftrain"
    for t in "${targets[@]:1}"; do ln -sf "$build/tests/$t" "$GV_WORK/bin/$t"; done
    echo "$GV_WORK/bin" > "$GV_WORK/bindir"
  fi
  key "$(dry && echo would rebuild || echo rebuilt) ${#targets[@]} targets against torch $("$GV_PY" -c 'import torch; print(torch.__version__)')"
}

stage_env() {
  bin=$(bindir)/difftrain
  x "$bin" --version || fail "difftrain --version"
  if dry; then
    x "$bin" env --device cuda
    "$bin" env --json > "$GV_WORK/env.json" || fail "difftrain env --json"  # runs without a GPU too
    key "$(jq_env "$GV_WORK/env.json") (CPU, dry run)"
    return 0
  fi
  x "$bin" env --device "$GV_DEV" || fail "difftrain env --device $GV_DEV: the device is not usable to difftrain"
  xo "$GV_OUT/env.json" "$bin" env --json --device "$GV_DEV" || fail "difftrain env --json --device $GV_DEV"
  key "$(jq_env "$GV_OUT/env.json")"
}
jq_env() {
  "$GV_PY" - "$1" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
g = e["gpus"][0] if e["gpus"] else None
print(f"{g['name'] + ' sm_' + g['compute_capability'].replace('.', '') if g else 'no GPU'}; torch {e['torch']['version']} "
      f"(built {e['torch']['built_against']}); CUDA {e['cuda']['runtime_version'] or '-'}; cuDNN {e['cudnn_version'] or '-'}; "
      f"NCCL {e['nccl_version'] or '-'}")
EOF
}

stage_tests() {
  bin=$(bindir)
  data=$(cat "$GV_WORK/datadir")
  export DIFFTRAIN_TEST_SOURCE_DIR=$root DIFFTRAIN_TEST_BIN=$bin/difftrain DIFFTRAIN_TEST_PYTHON=$GV_PYABS
  export DIFFTRAIN_TEST_REFERENCE_DIR=$GV_WORK/reference DIFFTRAIN_TEST_DATA=$data
  say "  environment: DIFFTRAIN_TEST_SOURCE_DIR=$root DIFFTRAIN_TEST_BIN=$bin/difftrain DIFFTRAIN_TEST_PYTHON=$GV_PYABS"
  say "               DIFFTRAIN_TEST_REFERENCE_DIR=$GV_WORK/reference DIFFTRAIN_TEST_DATA=$data"
  # ctest's make_reference fixture, once, before the tests that read it run in parallel.
  xr "$GV_WORK/make_reference.log" "$GV_PYABS" tests/reference/make_reference.py "$GV_WORK/reference" \
    || { tail -20 "$GV_WORK/make_reference.log"; fail "make_reference.py failed"; }
  mkdir -p "$GV_WORK/tests"
  dry || : > "$GV_OUT/tests.txt"
  deadline=$((SECONDS + GV_T_TESTS - 10))  # a binary gets what is left, so that the stage reports it
  run_binary() {  # name label timeout
    local name=$1 label=$2 t=$3 args=(--gtest_brief=1 --gtest_color=no)
    [ "$t" -le $((deadline - SECONDS)) ] || t=$((deadline - SECONDS))
    [ "$t" -ge 1 ] || t=1
    # The carried data is a subset; this test wants the full 60000 + 10000 images.
    [ "$name" != test_data ] || args+=(--gtest_filter=-Data.RealFashionMnist)
    local log=$GV_WORK/tests/$name.log start=$SECONDS rc=0
    xr "$log" timeout -k 5 "$t" "$bin/$name" "${args[@]}" || rc=$?
    dry && return 0
    local passed failed skipped
    passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    failed=$(grep -c '^\[  FAILED  \] [A-Za-z_0-9/]*\.[A-Za-z_0-9/]* (' "$log")  # --gtest_brief prints no count
    skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
    printf '%s\t%s\trc=%s\tpassed=%s\tfailed=%s\tskipped=%s\t%ss\n' "$name" "$label" "$rc" "${passed:-0}" "${failed:-0}" \
      "${skipped:-0}" "$((SECONDS - start))" >> "$GV_OUT/tests.txt"
    if [ "$rc" != 0 ]; then echo "--- $name (exit $rc$([ "$rc" = 124 ] && echo ": timed out after $t s")):"; grep -E '^\[  FAILED  \]|: Failure$' "$log" | head -20; tail -3 "$log"; fi
  }
  # The gpu label alone on the GPU, then the unit tests in parallel (ctest -j).
  jobs_max=$(( $(nproc) / 2 )); [ "$jobs_max" -ge 1 ] || jobs_max=1
  for label in gpu unit; do
    while IFS=$'\t' read -r name l t; do
      case $name in '#'*|'') continue ;; esac
      [ "$l" = "$label" ] || continue
      if [ "$label" = gpu ] || dry; then run_binary "$name" "$l" "$t"
      else
        while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
        run_binary "$name" "$l" "$t" &
      fi
    done < "$GV_CARRY/tests.tsv"
    wait
  done
  if dry; then key "$(awk -F'\t' '!/^#/ {n[$2]++} END {for (l in n) printf "%s: %d binaries; ", l, n[l]}' "$GV_CARRY/tests.tsv")$(
    awk -F= '{s += $2} END {print s " tests listed"}' "$GV_WORK/test_counts")"; return 0; fi
  sort -o "$GV_OUT/tests.txt" "$GV_OUT/tests.txt"
  column -t "$GV_OUT/tests.txt" 2>/dev/null || cat "$GV_OUT/tests.txt"
  summary=$(awk -F'\t' '{split($4, p, "="); split($5, f, "="); split($6, s, "="); P[$2] += p[2]; F[$2] += f[2]; S[$2] += s[2];
                         if ($3 != "rc=0") bad[$2] = bad[$2] " " $1}
                        END {for (l in P) printf "%s %d passed, %d failed, %d skipped%s; ", l, P[l], F[l], S[l], bad[l] ? " (failing:" bad[l] ")" : ""}' "$GV_OUT/tests.txt")
  awk -F'\t' '$2 == "gpu" {found = 1} END {exit !found}' "$GV_OUT/tests.txt" || summary="gpu: no test binary staged; $summary"
  key "${summary%; }"
  ! grep -qv $'\trc=0\t' "$GV_OUT/tests.txt"
}

stage_e2e() {
  bin=$(bindir)/difftrain
  data=$(cat "$GV_WORK/datadir")
  runs=$GV_WORK/runs
  common=(--config configs/quickstart.json --set "run.device=$GV_DEV" --set "data.path=$data" --set "run.output_dir=$runs"
          --set logging.progress=false --set logging.log_every=10 --set logging.sample_every=0 --set checkpoint.every=20
          --set train.lr_warmup_steps=5 --set sampling.num_final_samples=16 --set sampling.num_inference_steps=10)
  # The script's own test on a CPU: the e2e tests' small model (tests/e2e/train_run.h), in seconds.
  [ "$GV_DEV" = cuda ] || common+=(--set data.resolution=16 --set model.sample_size=16 --set "model.block_out_channels=[16, 32]"
    --set 'model.down_block_types=["DownBlock2D", "AttnDownBlock2D"]' --set 'model.up_block_types=["AttnUpBlock2D", "UpBlock2D"]'
    --set train.batch_size=8)
  figures=()

  say "bf16, stopped by SIGTERM after the step-20 checkpoint, then --resume latest:"
  ck=$runs/bf16/checkpoints
  show " > $GV_WORK/bf16.log 2>&1 &" "$bin" train "${common[@]}" --set run.name=bf16 --set train.mixed_precision=bf16 --set train.max_steps=100000
  say "  (wait for $ck/step_00000020/manifest.json, then kill -TERM; expect exit 75)"
  if ! dry; then
    "$bin" train "${common[@]}" --set run.name=bf16 --set train.mixed_precision=bf16 --set train.max_steps=100000 > "$GV_WORK/bf16.log" 2>&1 &
    pid=$!
    wait_s=$((GV_T_E2E / 2))  # on an H200 it takes seconds; leave the rest to the other runs
    for _ in $(seq $((wait_s * 10))); do [ -f "$ck/step_00000020/manifest.json" ] || ! kill -0 "$pid" 2>/dev/null && break; sleep 0.1; done
    [ -f "$ck/step_00000020/manifest.json" ] || { kill -KILL "$pid"; tail -20 "$GV_WORK/bf16.log"; fail "no step-20 checkpoint within $wait_s s"; }
    kill -TERM "$pid"; rc=0; wait "$pid" || rc=$?
    [ "$rc" = 75 ] || { tail -20 "$GV_WORK/bf16.log"; fail "SIGTERM: exit $rc, expected 75"; }
    stopped=$(find "$ck" -maxdepth 2 -name manifest.json | sed 's|.*/step_0*\([0-9]*\)/manifest.json|\1|' | sort -n | tail -1)
    say "  exit 75, newest checkpoint at step $stopped"
  fi
  stopped=${stopped:-20}
  xr "$GV_WORK/bf16-resume.log" "$bin" train "${common[@]}" --set run.name=bf16 --set train.mixed_precision=bf16 \
    --set "train.max_steps=$((stopped + 20))" --resume latest || { tail -20 "$GV_WORK/bf16-resume.log"; fail "bf16 resume failed"; }
  dry || grep -q "resumed from" "$GV_WORK/bf16-resume.log" || fail "the resumed run does not say 'resumed from'"
  dry || figures+=("bf16 TERM@$stopped->75, resumed to $((stopped + 20)), loss $(loss_range "$runs/bf16")")

  say "fp16 (GradScaler):"
  if [ "$GV_DEV" = cuda ]; then
    xr "$GV_WORK/fp16.log" "$bin" train "${common[@]}" --set run.name=fp16 --set train.mixed_precision=fp16 --set train.max_steps=40 \
      || { tail -20 "$GV_WORK/fp16.log"; fail "fp16 training failed"; }
    dry || figures+=("fp16 loss $(loss_range "$runs/fp16")")
  else
    say "  skipped: fp16 needs CUDA"
  fi

  say "difftrain sample:"
  xr "$GV_WORK/sample.log" "$bin" sample --run "$runs/bf16" --checkpoint latest -n 16 --steps 10 --device "$GV_DEV" -o "$GV_WORK/samples" || { tail -20 "$GV_WORK/sample.log"; fail "difftrain sample failed"; }
  dry || [ -f "$GV_WORK/samples/grid.png" ] || fail "difftrain sample wrote no grid.png"
  dry || figures+=("sample: $(find "$GV_WORK/samples" -name '*.png' ! -name grid.png | wc -l) images + grid.png")

  backend=nccl; [ "$GV_DEV" = cuda ] || backend=gloo
  say "$backend, a world of 1 through torchrun:"
  xr "$GV_WORK/nccl.log" "$GV_PY" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python "$bin" train "${common[@]}" \
    --set run.name=nccl --set "distributed.backend=$backend" --set train.mixed_precision=bf16 --set train.max_steps=20 || { tail -20 "$GV_WORK/nccl.log"; fail "the NCCL run failed"; }
  dry || figures+=("$backend world 1 ok")
  if dry; then key "4 runs (bf16 + SIGTERM + resume, fp16, sample, NCCL)"; else key "$(printf '%s; ' "${figures[@]}" | sed 's/; $//')"; fi
}
loss_range() {  # first and last train/loss in a run's metrics.jsonl
  "$GV_PY" - "$1/metrics.jsonl" <<'EOF'
import json, sys
v = [json.loads(l).get("train/loss") for l in open(sys.argv[1]) if l.strip()]
v = [x for x in v if x is not None]
print(f"{v[0]:.3f}->{v[-1]:.3f}" if v else "-")
EOF
}

stage_bench() {
  if [ -f "$GV_WORK/rebuild" ] && ! dry; then say "rebuilt in this call: no time left for the benchmark; run again"; key "skipped after a rebuild"; exit 3; fi
  bin=$(bindir)
  data=$(cat "$GV_WORK/datadir")
  for f in scripts/bench/train.sh scripts/bench/reference_train.py configs/cifar10_ddpm.json configs/quickstart.json; do
    [ -f "$f" ] || fail "$f is missing from the working tree"
  done
  # scripts/bench/train.sh, one call per config: difftrain with the speed switches off, each on
  # alone, all on; the diffusers step in PyTorch eager and under torch.compile (default mode for the
  # 35.7M cifar10_ddpm, reduce-overhead = CUDA graphs for the launch-bound quickstart: --compile-mode
  # auto). Each call gets a budget and prints its table whatever fits (runs in the order baseline,
  # eager, all on, compile, single switches). The stage has GV_T_BENCH seconds (what the earlier
  # stages left of GPU_VERIFY_TOTAL); 20 of them stay for a cut run's checkpoint and the tables.
  opts=(--build "$bin" --device "$GV_DEV" --switches "${GPU_VERIFY_BENCH_SWITCHES:-all}")
  if [ "${GPU_VERIFY_BENCH_COMPILE:-1}" != 1 ]; then opts+=(--no-compile)
  elif ! dry && ! "$GV_PY" -c 'import triton' 2>/dev/null; then say "  $GV_PY cannot import triton: no torch.compile rows"; opts+=(--no-compile)
  fi
  read -r -a extra <<< "${GPU_VERIFY_BENCH_ARGS:-}"
  budget=$((GV_T_BENCH - 20))
  start=$SECONDS
  : > "$GV_WORK/bench.md"
  rc_all=0 n=0
  # The 35.7M CIFAR-10 model (batch 128, bf16) gets 3/5 of the budget: torch.compile takes a minute
  # or more there; the quickstart (1.1M, batch 64, bf16 on the carried data) what is left, with more
  # steps (about 5 ms each).
  for spec in "3/5|--warmup 20 --steps 100|configs/cifar10_ddpm.json" \
              "1/1|--warmup 50 --steps 300|configs/quickstart.json data.path=$data train.mixed_precision=bf16"; do
    share=${spec%%|*} rest=${spec#*|}
    read -r -a steps_opts <<< "${rest%%|*}"
    case_=${rest#*|}
    n=$((n + 1))
    b=$(( (budget - (SECONDS - start)) * ${share%/*} / ${share#*/} ))
    if ! dry && [ "$b" -lt 30 ]; then
      printf "\`%s\`: not run, %s s of the benchmark budget left\n\n" "$case_" "$b" >> "$GV_WORK/bench.md"; continue
    fi
    cmd=(bash scripts/bench/train.sh "${opts[@]}" "${steps_opts[@]}" --budget "$b" --results "$GV_WORK/bench$n.jsonl" "${extra[@]}" "$case_")
    if dry; then
      show "" "${cmd[@]}"
      "${cmd[@]}" --dry-run 2>&1 | sed 's/^/    /' || fail "train.sh --dry-run '$case_' failed"
      continue
    fi
    show " > $GV_WORK/bench.one" "${cmd[@]}"
    rc=0
    "${cmd[@]}" > "$GV_WORK/bench.one" || rc=$?  # no `timeout` around it: its --budget is the limit
    if [ "$rc" != 0 ]; then rc_all=1; echo "train.sh '$case_': exit $rc (a run failed: the notes under the table say which)" >> "$GV_WORK/bench.md"; echo >> "$GV_WORK/bench.md"; fi
    cat "$GV_WORK/bench.one" >> "$GV_WORK/bench.md"
  done
  dry && { key "2 configs x (difftrain: switches off, each on, all on; PyTorch eager, torch.compile), budget $budget s"; return 0; }
  cp "$GV_WORK/bench.md" "$GV_OUT/bench.md"
  cat "$GV_WORK"/bench[0-9].jsonl > "$GV_OUT/bench.jsonl" 2>/dev/null || true
  cat "$GV_WORK/bench.md"
  # Key: per config, difftrain's baseline img/s and its ratios, the fastest difftrain variant.
  key "$("$GV_PY" - "$GV_OUT/bench.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = []
for case in dict.fromkeys(r["case"] for r in rows):
    ok = [r for r in rows if r["case"] == case and r.get("status") == "ok"]
    runs = [r for r in rows if r["case"] == case and not r.get("meta")]
    eager = next((r["img_per_s"] for r in ok if r.get("impl") == "pytorch" and r.get("compile") == "none"), None)
    comp = next((r["img_per_s"] for r in ok if r.get("impl") == "pytorch" and r.get("compile") not in (None, "none")), None)
    mine = [r for r in ok if r.get("impl") == "difftrain"]
    text = case.split()[0]
    if mine:
        best = max(mine, key=lambda r: r["img_per_s"])
        base = next((r for r in mine if r["rank"] == 0), None)
        text += f": {best['variant'].removeprefix('difftrain').strip(', ') or 'difftrain'} {best['img_per_s']:,.0f} img/s"
        text += "".join(f" {best['img_per_s'] / v:.2f}x {n}" for n, v in (("eager", eager), ("compile", comp)) if v)
        if base and base is not best:
            text += f" (switches off {base['img_per_s']:,.0f})"
    text += f" [{len(ok)}/{len(runs)} runs]"
    out.append(text)
print("; ".join(out) or "no results")
EOF
)"
  return "$rc_all"
}

# ---------------------------------------------------------------------------------------------
# A stage process: bash gpu-verify.sh --stage NAME (the parent exported GV_*).
if [ "${1:-}" = --stage ]; then
  GV_STAGE=$2
  exec 3>&1
  "stage_$GV_STAGE"
  exit $?
fi

# ---------------------------------------------------------------------------------------------
# The parent.
dry_run=0 carry=.gpu-carry out=${OUT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --carry) carry=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-verify: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done
out=${out:-$root/build-gpu-verify}
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -d "$carry" ] || { echo "gpu-verify: no $carry here: run scripts/gpu-prepare.sh on the build machine and bring it along (docs/GPU.md)" >&2; exit 1; }
carry=$(cd "$carry" && pwd)
exec > >(tee "$out/gpu-verify.log") 2>&1 3>&1
work=$(mktemp -d "${TMPDIR:-/tmp}/difftrain-gpu-verify.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The device's python and its torch; a dry run here may borrow the project venv's.
py=${PYTHON:-python3}
if ! "$py" -c 'import torch' 2>/dev/null; then
  build_py=$(sed -n 's/^build_python=//p' "$carry/stamp.txt" 2>/dev/null)
  if [ "$dry_run" = 1 ] && [ -x "${build_py:-/nonexistent}" ]; then
    echo "(dry run: $py has no torch; the build's $build_py stands in for the device's)"; py=$build_py
  else
    echo "gpu-verify: $py cannot import torch (set PYTHON)"; exit 1
  fi
fi
torch_dir=$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
site=$(dirname "$torch_dir")
ld=$carry/lib:$torch_dir/lib
for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && ld=$ld:$d; done
export LD_LIBRARY_PATH=$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PYTHON=$py  # scripts/bench/train.sh's python
export GV_DEV=${GPU_VERIFY_DEVICE:-cuda}
export GV_DRY=$dry_run GV_CARRY=$carry GV_OUT=$out GV_WORK=$work GV_PY=$py
GV_PYABS=$("$py" -c 'import sys; print(sys.executable)'); export GV_PYABS
export GV_T_PREFLIGHT=${GPU_VERIFY_T_PREFLIGHT:-40} GV_T_REBUILD=${GPU_VERIFY_T_REBUILD:-300} GV_T_ENV=${GPU_VERIFY_T_ENV:-25}
export GV_T_TESTS=${GPU_VERIFY_T_TESTS:-150} GV_T_E2E=${GPU_VERIFY_T_E2E:-100} GV_T_BENCH=${GPU_VERIFY_T_BENCH:-0}
export GV_TOTAL=${GPU_VERIFY_TOTAL:-525}  # the device tool stops a command at 540 s
echo "$carry/bin" > "$work/bindir"

echo "# gpu-verify $([ "$dry_run" = 1 ] && echo '--dry-run ')$(date -u '+%F %H:%M:%S UTC') on $(uname -n), $(nproc) cores"
echo "# LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
rows=() overall=0 optional="bench" optional_bad=()  # an optional stage failing leaves overall as it is
for s in "${stages[@]}"; do
  case " preflight rebuild ${GPU_VERIFY_STAGES:-${stages[*]}} " in *" $s "*) ;; *) rows+=("| $s | SKIP | 0 | not in GPU_VERIFY_STAGES |"); continue ;; esac
  t_var=GV_T_${s^^}; t=${!t_var}
  if [ "$s" = bench ]; then  # what the earlier stages left of the total, less the kill grace of 10 s
    t=$((GV_TOTAL - SECONDS - 10))
    [ -z "${GPU_VERIFY_T_BENCH:-}" ] || [ "$GPU_VERIFY_T_BENCH" -ge "$t" ] || t=$GPU_VERIFY_T_BENCH
    if [ "$t" -lt 60 ] && [ "$dry_run" = 0 ]; then
      rows+=("| $s | SKIP | 0 | only $t s left of GPU_VERIFY_TOTAL=$GV_TOTAL s |"); printf '\n=== %s: SKIP (%s s left)\n' "$s" "$t"; continue
    fi
    export GV_T_BENCH=$t
  fi
  printf '\n=== %s (timeout %s s, %s)\n' "$s" "$t" "$(date -u +%H:%M:%S)"
  start=$(date +%s%N)
  if [ "$dry_run" = 1 ]; then
    (GV_STAGE=$s; "stage_$s"); rc=$?
  else
    timeout -k 10 "$t" bash "$self" --stage "$s"; rc=$?
  fi
  tenths=$(( ($(date +%s%N) - start) / 100000000 )); secs=$((tenths / 10)).$((tenths % 10))
  case $rc in
    0) st=$([ "$dry_run" = 1 ] && echo DRY || echo PASS) ;;
    3) st=SKIP ;;
    124|137) st="TIMEOUT ($t s)"; bad=1 ;;
    *) st="FAIL ($rc)"; bad=1 ;;
  esac
  if [ "${bad:-0}" = 1 ]; then
    case " $optional " in *" $s "*) optional_bad+=("$s: $st") ;; *) overall=1 ;; esac
  fi
  bad=0
  k=$(cat "$work/key.$s" 2>/dev/null || echo "-")
  rows+=("| $s | $st | $secs | ${k//|//} |")
  echo "=== $s: $st in $secs s"
done

{
  echo "# gpu-verify summary$([ "$dry_run" = 1 ] && echo ' (dry run: nothing ran on a GPU)')"
  echo
  echo "$(date -u '+%F %H:%M UTC') on $(uname -n); carry: torch $(sed -n 's/^torch_version=//p' "$carry/stamp.txt"), commit $(sed -n 's/^source_commit=//p' "$carry/stamp.txt" | cut -c1-12), prepared $(sed -n 's/^prepared=//p' "$carry/stamp.txt")"
  echo
  echo "| stage | status | seconds | key figure |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "overall: $([ "$overall" = 0 ] && echo PASS || echo FAIL)${optional_bad[*]:+ (optional: ${optional_bad[*]})}"
  if [ -s "$out/bench.md" ] && [ "$dry_run" = 0 ]; then echo; echo "## Benchmark (scripts/bench/train.sh)"; echo; cat "$out/bench.md"; fi
} > "$out/summary.md"
echo
cat "$out/summary.md"
exit "$overall"

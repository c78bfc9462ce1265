#!/usr/bin/env bash
# The tests under sanitizers, each mode in its own build directory (docs/PERFORMANCE.md
# "Sanitizers" has the runs, their times and what they found):
#   scripts/test-sanitized.sh asan    ASan + UBSan (RelWithDebInfo): the unit, e2e and distributed tests
#   scripts/test-sanitized.sh tsan    TSan: the loader, shard reader and distributed tests
# Extra arguments go to ctest (e.g. -R Loader). LibTorch is not instrumented; the few suppressions
# this needs are in tests/sanitizers/, each with its reason. Every sanitizer report, also from a
# difftrain process a test spawned (whose exit code the test may expect to be non-zero), is written
# under <build>/sanitizer-reports/; the script fails when there is one, or when a test fails.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-}; shift || true
supp=$root/tests/sanitizers
case $mode in
  asan) sanitizers=address,undefined; targets=(all); select=(-L 'unit|e2e|distributed') ;;
  tsan) sanitizers=thread; targets=(difftrain test_data test_webdataset test_distributed test_distributed_e2e test_two_hosts)
        select=(-R '^(Loader|Data|WebDatasetTest|ProcessGroup[A-Za-z]*|World|Distributed|TwoHosts)\.') ;;
  *) echo "usage: scripts/test-sanitized.sh asan|tsan [ctest arguments]" >&2; exit 1 ;;
esac
build=$root/build-$mode
venv=${DIFFTRAIN_VENV:-$root/.venv}
DIFFTRAIN_VENV=$venv "$root/scripts/install-deps.sh" || exit 1
if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIFFTRAIN_VENV="$venv" \
    -DDIFFTRAIN_SANITIZERS=$sanitizers -DDIFFTRAIN_TEST_TIMEOUT=1800 \
    -DCMAKE_PREFIX_PATH="$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" || exit 1
fi
start=$(date +%s)
cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" || exit 1
built=$(date +%s)
reports=$build/sanitizer-reports
rm -rf "$reports" && mkdir -p "$reports"
common="log_path=$reports/report:print_stacktrace=1"
# protect_shadow_gap=0: the CUDA runtime maps memory where ASan's shadow gap would be (LLVM's
# AddressSanitizer docs); only a GPU machine initialises CUDA, but the binary is the same.
# verify_asan_link_order=0: the clock-skew test preloads libfaketime ahead of the ASan runtime.
export ASAN_OPTIONS="$common:detect_leaks=1:protect_shadow_gap=0:verify_asan_link_order=0"
export LSAN_OPTIONS="$common:suppressions=$supp/lsan.supp"
export UBSAN_OPTIONS="$common:suppressions=$supp/ubsan.supp"
# Tests scale the margins that cover a process's start-up (tests/test_paths.h).
export DIFFTRAIN_TEST_SANITIZER=$mode DIFFTRAIN_TEST_TIME_SCALE=4
export TSAN_OPTIONS="$common:suppressions=$supp/tsan.supp:second_deadlock_stack=1"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "${select[@]}" "$@"
rc=$?
end=$(date +%s)
n=$(find "$reports" -type f | wc -l)
echo "test-sanitized $mode: build $((built - start)) s, tests $((end - built)) s, ctest exit $rc, $n sanitizer report(s) in $reports"
for f in $(find "$reports" -type f | head -20); do echo "== $f"; grep -m1 -E "ERROR|WARNING|runtime error" "$f"; done
[ "$rc" -eq 0 ] && [ "$n" -eq 0 ]

#!/usr/bin/env bash
# Fuzzes every parser that reads untrusted bytes with libFuzzer, AddressSanitizer and UBSan
# (fuzz/fuzz_targets.cpp): IDX images and labels, gzip, CIFAR-10, PNG and JPEG (full size and at
# a DCT scale), tar, safetensors headers, checkpoint manifests and config JSON. Each target starts
# from its committed seeds (fuzz/corpus/<target>, written by fuzz/make_seeds.py) and dictionary
# (fuzz/dict/<target>.dict) and keeps what it finds in build-fuzz/corpus/<target>. Not part of `make test`.
#   scripts/fuzz.sh [--seconds S | --runs N] [--timeout S] [TARGET ...]    (default: every target, 60 s each)
# Prints one line per target: executions, rate, coverage (edges, features), corpus size, findings.
# --timeout (default 10 s) is libFuzzer's per-input limit, in wall-clock seconds: beside other work
# at nice 19 a fast input can be starved past 10 s, so a long campaign there takes a larger one.
# Needs clang and libclang-rt-dev (libFuzzer); installs them on Debian when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/build-fuzz
all_targets=(idx_images idx_labels cifar10 gzip_idx image jpeg_scaled tar safetensors manifest config)
limit=(-max_total_time=60)
timeout=10
targets=()
while [ $# -gt 0 ]; do
  case $1 in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2"); shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
if ! command -v clang++ >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  sudo_cmd=(); [ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends clang libclang-rt-dev
fi
# {fmt} as the build uses it: LibTorch's copy, header-only (config.cpp formats its messages with it).
python=${PYTHON:-$root/.venv/bin/python}
fmt_include=/usr/include
[ -x "$python" ] && fmt_include=$("$python" -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')
mkdir -p "$out"
srcs=("$root/fuzz/fuzz_targets.cpp")
for s in data_formats jpeg tar safetensors_header checkpoint_manifest config device_spec; do srcs+=("$root/src/$s.cpp"); done
if [ ! -x "$out/fuzz_targets" ] || [ -n "$(find "${srcs[@]}" "$root/include" -newer "$out/fuzz_targets" 2>/dev/null | head -1)" ]; then
  echo "fuzz: building $out/fuzz_targets"
  clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -DFMT_HEADER_ONLY=1 \
    -I"$root/include" -isystem "$fmt_include" "${srcs[@]}" -lz -lstb -lturbojpeg -o "$out/fuzz_targets"
fi

status=0
for t in "${targets[@]}"; do
  [ -d "$root/fuzz/corpus/$t" ] || { echo "fuzz: unknown target $t (known: ${all_targets[*]})"; exit 2; }
  mkdir -p "$out/corpus/$t" "$out/findings/$t"
  rm -f "$out/findings/$t"/*
  log=$out/$t.log
  # The first directory gathers new inputs; the committed seeds are read, not written.
  (cd "$out/findings/$t" && DIFFTRAIN_FUZZ_TARGET=$t "$out/fuzz_targets" "${limit[@]}" -dict="$root/fuzz/dict/$t.dict" \
     -max_len=65536 -timeout="$timeout" -rss_limit_mb=2048 -print_final_stats=1 -print_funcs=0 "$out/corpus/$t" "$root/fuzz/corpus/$t" >"$log" 2>&1) || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log")
  last=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last"); ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  findings=$(find "$out/findings/$t" -name 'crash-*' -o -name 'timeout-*' -o -name 'leak-*' -o -name 'oom-*' | wc -l)
  if [ "$findings" -eq 0 ] && grep -q "ERROR: \|SUMMARY: \|runtime error" "$log"; then findings=1; fi
  printf 'fuzz: %-12s %12s execs in %6s s (%s/s)  cov %s  ft %s  corpus %s  findings %s\n' "$t" "${execs:-?}" "${secs:-?}" \
    "$(( ${execs:-0} / (${secs:-1} > 0 ? ${secs:-1} : 1) ))" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$findings"
  if [ "$findings" -ne 0 ]; then
    status=1
    echo "fuzz: FINDINGS for $t in $out/findings/$t; log $log"
    grep -E "ERROR: |SUMMARY: |runtime error|what\(\)" "$log" | head -5 || true
  fi
done
exit $status

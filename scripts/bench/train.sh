#!/usr/bin/env bash
# Training speed: difftrain against the same model and step in Python PyTorch
# (scripts/bench/reference_train.py: eager, and torch.compile), one run after the other on the same
# machine in the same call; prints one Markdown table per case for docs/PERFORMANCE.md, every
# ratio from the same call.
#
#   scripts/bench/train.sh [options] [BUILD_DIR] [CASE ...]
#
# BUILD_DIR (a directory with the difftrain binary, as scripts/gpu-check.sh passes it to every
# benchmark) is the same as --build.
# A CASE is one quoted string: a config file, then --set overrides as key=value words:
#   'configs/quickstart.json model.block_out_channels=[64,128,256]'
# Without cases: on CUDA configs/cifar10_ddpm.json (35.7M parameters, batch 128, bf16); on the CPU
# the quickstart model and a mid-size one (block_out_channels [64,128,256]).
#
# Per case it runs, in this order (so that a --budget cut leaves the most useful rows):
#   1. difftrain, the speed switches off (the baseline)   2. PyTorch eager
#   3. difftrain, every switch on                         4. PyTorch torch.compile (with --compile)
#   5. difftrain with each switch on alone
# The switches are train.cuda_graph, train.channels_last, train.fused_groupnorm_silu,
# train.cudnn_benchmark, train.allow_tf32 (docs/CONFIG.md). On CUDA all five by default, on the CPU
# none (the CPU table is difftrain against eager, as before). The table's rows: the baseline, each
# switch, all on, eager, compile; columns: img/s, ms/step, MFU, peak GiB, ratio to eager, ratio to
# compile.
#
# Options:
#   --device cpu|cuda   default: cuda when nvidia-smi lists a GPU and torch sees it, else cpu
#   --config FILE       a case with no overrides (repeatable; the same as a CASE)
#   --set KEY=VALUE     an override for every case, after the benchmark's own and before the case's
#                       (repeatable), e.g. --set train.batch_size=256
#   --steps N           timed steps (default: cpu 15, cuda 100)
#   --warmup N          untimed steps first; difftrain logs every N steps and its first interval is
#                       skipped (default: cpu 5, cuda 20; keep >= 4 on CUDA: train.cuda_graph captures
#                       after 3 eager steps)
#   --switches LIST     the switches to measure, comma-separated, without "train.", or all / none
#                       (default: cuda all, cpu none)
#   --compile           also time torch.compile of the UNet (default on CUDA; on the CPU it needs a C++
#                       compiler and minutes of compilation)
#   --compile-mode M    default | reduce-overhead | max-autotune | auto (default auto: reduce-overhead,
#                       i.e. CUDA graphs, on CUDA for models under 10M parameters such as the
#                       quickstart's, default otherwise, e.g. for cifar10_ddpm); implies --compile
#   --no-compile        no torch.compile row
#   --budget S          seconds for the whole call (0: none). Each run gets what is left (it is cut
#                       by SIGTERM: difftrain stops after a checkpoint, the reference prints the steps
#                       done; both are reported with a note), and a run that cannot fit its
#                       estimate is skipped and listed; the table is always printed.
#   --results FILE      also write the rows as JSON lines to FILE
#   --threads N         CPU threads for both sides (default 0: every core)
#   --stream            difftrain reads through its streaming loader instead of data.preload=true
#   --build DIR         where the difftrain binary is (default: build)
#   --keep              keep the work directory (configs, logs, run directories)
#   --dry-run           print every command instead of running it; only `difftrain config print`
#                       (no GPU needed) runs, to resolve the batch and precision
#
# Both sides get the same resolved config (`difftrain config print` of the case): difftrain trains
# on the config's data (preloaded onto the device unless --stream; when data.path is missing, a
# random stand-in in the same file format is written, and the table says so); the reference
# uses random batches already on the device. The CPU runs in fp32 (train.mixed_precision=no)
# unless a case sets it; with train.mixed_precision=auto the reference runs what difftrain resolved it
# to (the log says). difftrain's figures come from its metrics.jsonl: img/s over the logged intervals
# after the first, train/mfu (else, marked †, the reference's FLOP count per image x difftrain's
# img/s / the reference's peak), system/gpu_mem_peak_gb (the peak since the start, warm-up included;
# the reference resets its peak after the warm-up). Exit status 1 when a run fails or the parameter
# counts differ; runs skipped or cut by --budget are not failures.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3  # machines without the project venv (the GPU machine)
all_switches=(cuda_graph channels_last fused_groupnorm_silu cudnn_benchmark allow_tf32)
build=build device="" steps="" warmup="" threads=0 compile="" compile_mode=auto stream=0 keep=0 dry=0 budget=0
switches_arg="" results_out=""
cases=() global_sets=()
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --config) cases+=("$2"); shift 2 ;;
    --set) global_sets+=("$2"); shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --switches) switches_arg=$2; shift 2 ;;
    --compile) compile=1; shift ;;
    --compile-mode) compile_mode=$2; compile=1; shift 2 ;;
    --no-compile) compile=0; shift ;;
    --budget) budget=$2; shift 2 ;;
    --results) results_out=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --stream) stream=1; shift ;;
    --build) build=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "train.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
    *) if [ -d "$1" ] && [ -x "$1/difftrain" ]; then build=$1; else cases+=("$1"); fi; shift ;;
  esac
done
die() { echo "train.sh: $*" >&2; exit 1; }
bin=$build/difftrain
[ -x "$bin" ] || die "no $bin (make build, or --build DIR)"
case $compile_mode in default|reduce-overhead|max-autotune|auto) ;; none) compile=0 ;; *) die "--compile-mode $compile_mode: default, reduce-overhead, max-autotune or auto" ;; esac
for n in "$budget" "$threads" ${steps:+"$steps"} ${warmup:+"$warmup"}; do
  [[ $n =~ ^[0-9]+$ ]] || die "'$n' is not a number of steps, seconds or threads"
done
if [ -z "$device" ]; then
  device=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
  fi
fi
case $device in cpu|cuda) ;; *) die "--device $device: cpu or cuda" ;; esac
if [ "$device" = cuda ]; then
  steps=${steps:-100} warmup=${warmup:-20} compile=${compile:-1} switches_arg=${switches_arg:-all}
  [ ${#cases[@]} -gt 0 ] || cases=('configs/cifar10_ddpm.json')
else
  steps=${steps:-15} warmup=${warmup:-5} compile=${compile:-0} switches_arg=${switches_arg:-none}
  [ ${#cases[@]} -gt 0 ] || cases=('configs/quickstart.json'
                                   'configs/quickstart.json model.block_out_channels=[64,128,256]')
fi
if [ "$warmup" -lt 1 ] || [ "$steps" -lt 1 ]; then die "--warmup and --steps must be >= 1"; fi
switches=()
case $switches_arg in
  all) switches=("${all_switches[@]}") ;;
  none) ;;
  *) IFS=', ' read -r -a words <<< "$switches_arg"
     for s in "${words[@]}"; do
       [ -n "$s" ] || continue
       s=${s#train.}
       case " ${all_switches[*]} " in *" $s "*) switches+=("$s") ;; *) die "--switches: unknown switch '$s' (${all_switches[*]})" ;; esac
     done ;;
esac

reference=1
if [ "$dry" = 0 ] && ! "$python" -c 'import diffusers' 2>/dev/null; then
  echo "train.sh: $python cannot import diffusers: only difftrain is timed (pip install diffusers==0.42.1)" >&2
  reference=0
fi

if [ "$dry" = 1 ]; then
  work=${TMPDIR:-/tmp}/difftrain-bench.DRYRUN
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/difftrain-bench.XXXXXX")
  if [ "$keep" = 1 ]; then echo "# work directory: $work" >&2; else trap 'rm -rf "$work"' EXIT; fi
fi
results=$work/results.jsonl
[ "$dry" = 1 ] || : > "$results"
status=0

# The budget: a deadline for the whole call. SIGTERM (an outer timeout) cuts the running child
# the same way and skips the rest; the table is still printed.
start_s=$SECONDS
deadline=$((budget > 0 ? SECONDS + budget : 0))
stopped=""
child=""
# shellcheck disable=SC2317  # called by the trap
on_term() { stopped="SIGTERM"; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true; }
trap on_term TERM INT
left() { if [ "$deadline" -gt 0 ]; then echo $((deadline - SECONDS)); else echo 1000000000; fi; }
# Print a command (quoted where needed), to stderr.
show() {
  local a words=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then words+=("$a"); else words+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "  \$ ${words[*]}" >&2
}
# run_cut LOG CMD...: run CMD with stdout and stderr to LOG, under `timeout` for the time left, in
# the background so that a SIGTERM to this script reaches it at once. Sets rc.
run_cut() {
  local log=$1; shift
  local t; t=$(left)
  [ "$t" -ge 1 ] || t=1  # timeout 0 would mean no limit
  rc=0
  if [ "$deadline" -gt 0 ]; then
    timeout -k 15 "$t" "$@" > "$log" 2>&1 &
  else
    "$@" > "$log" 2>&1 &
  fi
  child=$!
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done  # a trap interrupted the wait
  child=""
}
# row CASE VARIANT RANK STATUS: a row without figures (skipped, failed) into the results.
row() {
  "$python" -c 'import json, sys; a = sys.argv; print(json.dumps({"case": a[1], "variant": a[2], "rank": int(a[3]), "status": a[4]}))' \
    "$@" >> "$results"
}
# skip_if_short NEED VARIANT CASE RANK: when the budget cannot fit NEED seconds (or a SIGTERM came),
# record the row as skipped and return 0.
skip_if_short() {
  local reason=""
  if [ -n "$stopped" ]; then reason="not run: $stopped"
  elif [ "$(left)" -lt "$1" ]; then reason="skipped: $(( $(left) > 0 ? $(left) : 0 )) s of the ${budget} s budget left, about $1 s needed"
  fi
  [ -n "$reason" ] || return 1
  echo "   $2: $reason" >&2
  [ "$dry" = 1 ] || row "$3" "$2" "$4" "$reason"
  return 0
}

# Settings of the benchmark itself; a case's own overrides come after them and win.
bench_sets=(run.device="$device" run.num_threads="$threads" train.max_steps=$((warmup + steps)) train.lr_warmup_steps=0
            logging.log_every="$warmup" logging.sample_every=0 logging.progress=false checkpoint.every=100000000 checkpoint.keep_every=0
            sampling.num_final_samples=0 sampling.num_samples=1 sampling.batch_size=1 sampling.num_inference_steps=1)
[ "$stream" = 1 ] || bench_sets+=(data.preload=true)
[ "$device" = cuda ] || bench_sets+=(train.mixed_precision=no)

gpu_name=""
if [ "$device" = cuda ] && [ "$dry" = 0 ]; then
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
fi
echo "# $(date -u '+%F %H:%M UTC') | $(uname -n) | $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) | $(
  "$python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "no torch") | $(
  "$bin" --version 2>&1 | head -1)${gpu_name:+ | $gpu_name}" >&2
[ "$device" != cuda ] || [ "$dry" = 1 ] || nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader >&2 || true
echo "# device $device, $warmup warm-up + $steps timed steps, switches: ${switches[*]:-none}, torch.compile: $(
  [ "$compile" = 1 ] && echo "$compile_mode" || echo no), budget: $([ "$budget" -gt 0 ] && echo "$budget s" || echo none)" >&2

n=0
for spec in "${cases[@]}"; do
  n=$((n + 1))
  read -r -a words <<< "$spec"
  config=${words[0]}
  case_sets=("${words[@]:1}")
  label="$(basename "$config" .json)${global_sets[*]:+ ${global_sets[*]}}${case_sets[*]:+ ${case_sets[*]}}"
  dir=$work/case$n
  [ "$dry" = 1 ] || mkdir -p "$dir"
  set_args=()
  for s in "${bench_sets[@]}" "${global_sets[@]}" "${case_sets[@]}"; do set_args+=(--set "$s"); done
  # The resolved config: run even in a dry run (no GPU needed), into a temporary file there.
  cfg_file=$dir/config.json
  [ "$dry" = 0 ] || { cfg_file=$(mktemp); show "$bin" config print --config "$config" "${set_args[@]}"; echo "    > $dir/config.json" >&2; }
  if ! "$bin" config print --config "$config" "${set_args[@]}" > "$cfg_file" 2> "$cfg_file.err"; then
    echo "train.sh: $label: $(cat "$cfg_file.err")" >&2; status=1; rm -f "$cfg_file.err"; continue
  fi
  rm -f "$cfg_file.err"
  # The config's data, or a random stand-in in its file format when it is not on this machine
  # (a dry run only says so).
  data_note=$("$python" - "$cfg_file" "$dir/data" "$dry" <<'EOF'
import json, os, sys
path, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfg = json.load(open(path))
d = cfg["data"]
present = {"idx": ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"],
           "cifar10": ["data_batch_1.bin"]}.get(d["dataset"])
if present is None or any(os.path.exists(os.path.join(d["path"], f)) for f in present):
    sys.exit(0)
missing = d["path"]
if dry:
    print(f"data: a random stand-in in the {d['dataset']} format would be written to {out} ({missing} is missing here)")
    sys.exit(0)
import numpy as np
rng = np.random.default_rng(0)
os.makedirs(out, exist_ok=True)
if d["dataset"] == "idx":  # 4096 random images at the resolution, 10 classes
    r, n = d["resolution"], 4096
    with open(os.path.join(out, "train-images-idx3-ubyte"), "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, r, r)))
        f.write(rng.integers(0, 256, n * r * r, dtype=np.uint8).tobytes())
    with open(os.path.join(out, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
else:  # CIFAR-10 binary batches: 5 x 1024 records of (label, 3x32x32)
    for i in range(1, 6):
        rec = rng.integers(0, 256, (1024, 3073), dtype=np.uint8)
        rec[:, 0] %= 10
        rec.tofile(os.path.join(out, f"data_batch_{i}.bin"))
cfg["data"]["path"] = out
json.dump(cfg, open(path, "w"), indent=2)
print(f"data: random stand-in in the {d['dataset']} format ({missing} is missing here)")
EOF
  ) || { echo "train.sh: $label: cannot prepare data" >&2; status=1; continue; }
  read -r batch precision < <("$python" -c 'import json, sys; c = json.load(open(sys.argv[1]))["train"]; print(c["batch_size"], {"no": "fp32"}.get(c["mixed_precision"], c["mixed_precision"]))' "$cfg_file")
  [ "$dry" = 0 ] || rm -f "$cfg_file"
  echo "## $label: batch $batch, $precision, $warmup warm-up + $steps timed steps${data_note:+; $data_note}" >&2
  [ "$dry" = 1 ] || "$python" -c 'import json, sys; a = sys.argv; print(json.dumps({"case": a[1], "meta": True, "batch": int(a[2]), "precision": a[3], "warmup": int(a[4]), "steps": int(a[5]), "data": a[6] or "config data", "device": a[7], "gpu": a[8]}))' \
    "$label" "$batch" "$precision" "$warmup" "$steps" "$data_note" "$device" "$gpu_name" >> "$results"

  # The variants. difftrain: run name, then --set words (every listed switch explicitly off in the
  # baseline, so that a changed default does not change the baseline).
  base=() on=()
  for s in "${switches[@]}"; do base+=("train.$s=false"); on+=("train.$s=true"); done
  dvariants=("baseline|${base[*]}")
  [ ${#switches[@]} -lt 2 ] || dvariants+=("all on|${on[*]}")
  for s in "${switches[@]}"; do
    sets=()
    for o in "${switches[@]}"; do [ "$o" = "$s" ] && sets+=("train.$o=true") || sets+=("train.$o=false"); done
    dvariants+=("+ $s|${sets[*]}")
  done
  [ ${#switches[@]} -gt 0 ] || dvariants=("baseline|")
  modes=(eager); [ "$compile" = 1 ] && modes+=(compile)
  [ "$reference" = 1 ] || modes=()
  # Run order: baseline, eager, all on, compile, then each switch alone.
  order=("d:${dvariants[0]}")
  [ ${#modes[@]} -lt 1 ] || order+=("r:eager")
  [ ${#dvariants[@]} -lt 2 ] || [ ${#switches[@]} -lt 2 ] || order+=("d:${dvariants[1]}")
  [ ${#modes[@]} -lt 2 ] || order+=("r:compile")
  for v in "${dvariants[@]:1}"; do [ "${v%%|*}" = "all on" ] || order+=("d:$v"); done

  dparams="" d_secs=0 e_secs=0
  for item in "${order[@]}"; do
    kind=${item%%:*} rest=${item#*:}
    if [ "$kind" = d ]; then
      vname=${rest%%|*}
      read -r -a vsets <<< "${rest#*|}"
      case $vname in
        baseline) variant="difftrain, switches off" tag=base rank=0 ;;
        "all on") variant="difftrain, all ${#switches[@]} on" tag=all rank=20 ;;
        *) variant="difftrain $vname" tag=${vname#+ } rank=1
           for i in "${!switches[@]}"; do [ "${switches[$i]}" != "$tag" ] || rank=$((i + 1)); done ;;
      esac
      [ ${#switches[@]} -gt 0 ] || variant=difftrain
      need=$((d_secs > 0 ? d_secs * 6 / 5 + 5 : 20))
      skip_if_short "$need" "$variant" "$label" "$rank" && continue
      args=(train --config "$dir/config.json" --set run.output_dir="$dir/runs" --set run.name="$tag")
      for s in "${vsets[@]}"; do args+=(--set "$s"); done
      echo "   $variant ..." >&2
      if [ "$dry" = 1 ]; then show "$bin" "${args[@]}"; continue; fi
      t0=$SECONDS
      run_cut "$dir/$tag.log" "$bin" "${args[@]}"
      secs=$((SECONDS - t0))
      [ "$vname" != baseline ] || d_secs=$secs
      cut_note=""
      case $rc in 0) ;; 75|124|137|143) cut_note="cut after ${secs} s (${stopped:-budget})" ;; esac
      if [ "$rc" = 0 ] || [ -n "$cut_note" ]; then
        if "$python" - "$dir/$tag.log" "$dir/runs/$tag" "$label" "$variant" "$batch" "$cut_note" "$secs" "$rank" >> "$results" 2> "$dir/$tag.parse" <<'EOF'
import glob, json, re, sys
log, run, case, variant, batch, note, secs, rank = sys.argv[1:9]
batch = int(batch)
text = open(log, errors="replace").read()
m = re.search(r"model: UNet2DModel, (\d+) parameters", text)
params = int(m.group(1)) if m else None
lines = []
for path in glob.glob(f"{run}/metrics.jsonl"):
    lines = [json.loads(l) for l in open(path) if l.strip()]
points = [r for r in lines if "train/img_per_s" in r]
if len(points) >= 2:  # metrics.jsonl: (step, img/s, ...) per logged interval
    intervals = [(p["step"] - q["step"], p) for q, p in zip(points, points[1:])]
else:  # the console log, as before metrics.jsonl existed
    found = [(int(s), {"train/img_per_s": float(r)}) for s, r in re.findall(r"step (\d+)/\d+ \|.*?\| ([0-9.]+) img/s", text)]
    intervals = [(s - q, p) for (q, _), (s, p) in zip(found, found[1:])]
if not intervals:
    sys.exit(f"fewer than two logged intervals in {run}/metrics.jsonl and {log}")
images = seconds = 0.0
mfu_time = tflops_time = 0.0
have_mfu = have_tflops = True
for n_steps, p in intervals:  # the first interval (the warm-up) is not among them
    s = n_steps * batch / p["train/img_per_s"]
    images += n_steps * batch
    seconds += s
    if p.get("train/mfu") is None: have_mfu = False
    else: mfu_time += p["train/mfu"] * s
    if p.get("train/tflops") is None: have_tflops = False
    else: tflops_time += p["train/tflops"] * s
mfu = mfu_time / seconds if have_mfu else None
if mfu is not None and mfu > 1.5:  # a percentage, not a fraction (MFU cannot exceed 1)
    mfu /= 100
peak = None
for r in lines:
    peak = r.get("system/gpu_mem_peak_gb", peak)
print(json.dumps({"case": case, "variant": variant, "rank": int(rank), "impl": "difftrain", "status": "ok", "params": params,
                  "img_per_s": images / seconds, "ms_per_step": seconds * 1000 / (images / batch),
                  "mfu": mfu, "tflops": tflops_time / seconds if have_tflops else None, "peak_mem_gb": peak,
                  "timed_steps": int(images / batch), "note": note, "wall_s": int(secs)}))
EOF
        then
          [ -n "$dparams" ] || dparams=$("$python" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["params"] or "")' "$results")
        else
          echo "   $variant: $(tail -1 "$dir/$tag.parse")" >&2
          if [ -n "$cut_note" ]; then  # cut before a second logged interval: no figure, no failure
            row "$label" "$variant" "$rank" "not timed: $cut_note, before its first timed interval ended"
          else
            status=1; row "$label" "$variant" "$rank" "failed: $(tail -1 "$dir/$tag.parse")"
          fi
        fi
      else
        why=$(grep -E '\[(error|critical)\]|terminate|what\(\)' "$dir/$tag.log" | tail -1 | sed 's/^\[[^]]*\] \[[a-z]*\] //' | cut -c1-300)
        echo "   $variant failed (exit $rc): ${why:-see the log}" >&2; tail -5 "$dir/$tag.log" >&2; status=1
        row "$label" "$variant" "$rank" "failed (exit $rc): ${why:-see the log}"
      fi
      [ "$keep" = 1 ] || rm -rf "$dir/runs/$tag"  # checkpoints: 4 copies of the parameters each
    else
      mode=$rest
      cmode=none; [ "$mode" = eager ] || cmode=$compile_mode
      variant="PyTorch eager" rank=30; [ "$mode" = eager ] || variant="PyTorch torch.compile ($cmode)" rank=31
      if [ "$mode" = eager ]; then need=$((d_secs > 0 ? d_secs + 15 : 25)); else need=$((e_secs > 0 ? e_secs + 45 : 75)); fi
      skip_if_short "$need" "$variant" "$label" "$rank" && continue
      if [ "$precision" = auto ]; then  # the reference runs what difftrain's auto resolved to here
        precision=fp32
        grep -qs "train.mixed_precision = auto: bf16" "$dir"/*.log && precision=bf16
        [ "$dry" = 1 ] && precision="<auto as difftrain resolved it>"
        echo "   (auto resolved to $precision)" >&2
      fi
      args=(scripts/bench/reference_train.py --config "$dir/config.json" --compile "$cmode" --device "$device"
            --steps "$steps" --warmup "$warmup" --threads "$threads" --precision "$precision")
      [ "$dry" = 0 ] || args+=(--expect-params "<difftrain's count>")
      [ -z "$dparams" ] || args+=(--expect-params "$dparams")
      echo "   $variant ..." >&2
      if [ "$dry" = 1 ]; then show "$python" "${args[@]}"; continue; fi
      t0=$SECONDS
      run_cut "$dir/pytorch-$mode.log" "$python" "${args[@]}"
      secs=$((SECONDS - t0))
      [ "$mode" != eager ] || e_secs=$secs
      last=$(tail -1 "$dir/pytorch-$mode.log")
      if [[ $last == '{'* ]] && { [ "$rc" = 0 ] || [ "$rc" = 124 ] || [ "$rc" = 143 ]; }; then
        "$python" - "$last" "$label" "$variant" "$rank" "${stopped:-budget}" "$secs" >> "$results" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
case, variant, rank, why, secs = sys.argv[2:7]
if r.get("compile") not in (None, "none"):
    variant = f"PyTorch torch.compile ({r['compile']})"  # auto resolved
r.update(case=case, variant=variant, rank=int(rank), status="ok", wall_s=int(secs),
         note=f"cut after {secs} s at {r['steps']} timed steps ({why})" if r.get("cut") else "")
print(json.dumps(r))
EOF
      else
        why=$(grep -v '^\s*$' "$dir/pytorch-$mode.log" | tail -1 | cut -c1-300)
        [ "$rc" != 124 ] || why="timed out after $secs s (${stopped:-budget}) before the timed steps"
        echo "   $variant failed (exit $rc): $why" >&2; tail -5 "$dir/pytorch-$mode.log" >&2
        # the budget cutting the warm-up (compilation) is not a failure of the code
        [ "$rc" = 124 ] || [ "$rc" = 3 ] || status=1
        if [ "$rc" = 124 ] || [ "$rc" = 3 ]; then row "$label" "$variant" "$rank" "not timed: $why"
        else row "$label" "$variant" "$rank" "failed (exit $rc): $why"; fi
      fi
    fi
  done
done
[ "$dry" = 0 ] || { echo "(dry run: nothing ran)" >&2; exit 0; }

echo >&2
echo "# $((SECONDS - start_s)) s in all" >&2
[ -z "$results_out" ] || cp "$results" "$results_out"
"$python" - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
dash = "—"

def pct(x):
    return dash if x is None else f"{100 * x:.1f}%"

for case in dict.fromkeys(r["case"] for r in rows):
    meta = next((r for r in rows if r["case"] == case and r.get("meta")), {})
    mine = [r for r in rows if r["case"] == case and not r.get("meta")]
    ok = [r for r in mine if r.get("status") == "ok"]
    params = next((r["params"] for r in ok if r.get("params")), None)
    eager = next((r for r in ok if r.get("impl") == "pytorch" and r.get("compile", "none") == "none"), None)
    comp = next((r for r in ok if r.get("impl") == "pytorch" and r.get("compile", "none") != "none"), None)
    head = f"`{case}`"
    if params:
        head += f", {params / 1e6:.1f}M parameters"
    if meta:
        prec = meta["precision"]
        if prec == "auto" and (eager or comp):
            prec = f"auto ({(eager or comp)['precision']})"
        head += f", batch {meta['batch']}, {prec}, {meta['warmup']} warm-up + {meta['steps']} timed steps"
        head += f", {meta['gpu'] or meta['device']}"
    print(f"{head}:\n")
    print("| variant | img/s | ms/step | MFU | peak GiB | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    dagger = False
    for r in sorted(mine, key=lambda r: r["rank"]):
        if r.get("status") != "ok":
            print(f"| {r['variant']} | {dash} | {dash} | {dash} | {dash} | {dash} | {dash} |")
            notes.append(f"{r['variant']}: {r['status']}")
            continue
        mfu = pct(r.get("mfu"))
        if r.get("impl") == "difftrain" and r.get("mfu") is None and eager and eager.get("flops_per_image") and eager.get("peak_tflops"):
            mfu = pct(eager["flops_per_image"] * r["img_per_s"] / 1e12 / eager["peak_tflops"]) + " †"
            dagger = True
        ratio = lambda base: f"{r['img_per_s'] / base['img_per_s']:.2f}×" if base else dash
        peak = dash if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.2f}"
        print(f"| {r['variant']} | {r['img_per_s']:,.1f} | {r['ms_per_step']:,.2f} | {mfu} | {peak} | {ratio(eager)} | {ratio(comp)} |")
        if r.get("note"):
            notes.append(f"{r['variant']}: {r['note']}")
    ref = eager or comp
    if ref and ref.get("flops_per_image"):
        notes.append(f"FLOPs: {ref['flops_per_image'] / 1e9:.2f} GFLOP per image forward + backward (FlopCounterMode on the "
                     f"diffusers model; matmuls, convolutions, attention)"
                     + (f"; MFU against {ref['peak_tflops']:g} TFLOP/s ({ref['peak_source']})" if ref.get("peak_tflops") else "; no peak known: no MFU"))
    if dagger:
        notes.append("†: difftrain logged no train/mfu; computed from the FLOP count above and difftrain's img/s")
    if comp and comp.get("compile_s") is not None:
        notes.append(f"{comp['variant']}: {comp['compile_s']:.0f} s of compilation in the warm-up (first step "
                     f"{comp['first_step_s']:.0f} s; not timed)")
    if meta.get("data", "config data") != "config data":
        notes.append(f"difftrain read a {meta['data'].removeprefix('data: ')}; the reference uses random batches on the device")
    if any(r.get("impl") == "difftrain" and r.get("peak_mem_gb") is not None for r in ok):
        notes.append("peak GiB: difftrain's since its start (warm-up included), the reference's after its warm-up")
    if notes:
        print()
        for n in notes:
            print(f"- {n}")
    print()
EOF
exit $status

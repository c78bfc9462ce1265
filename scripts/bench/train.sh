#!/usr/bin/env bash
# Training speed: difftrain against the same model and step in Python PyTorch
# (scripts/bench/reference_train.py: eager, and torch.compile with --compile), one case after the
# other on the same machine in the same call; prints a Markdown table for docs/PERFORMANCE.md.
#
#   scripts/bench/train.sh [options] [BUILD_DIR] [CASE ...]
#
# BUILD_DIR (a directory with the difftrain binary, as scripts/gpu-check.sh passes it to every
# benchmark) is the same as --build.
# A CASE is one quoted string: a config file, then --set overrides as key=value words:
#   'configs/quickstart.json model.block_out_channels=[64,128,256]'
# Without cases: on the CPU the quickstart model and a mid-size one (block_out_channels
# [64,128,256]); on CUDA configs/cifar10_ddpm.json (35.7M parameters, batch 128, bf16) and the same
# network at 64x64 (batch 64).
#
# Options:
#   --device cpu|cuda   default: cuda when torch sees a GPU, else cpu
#   --steps N           timed steps (default: cpu 15, cuda 100)
#   --warmup N          untimed steps first; difftrain logs every N steps and its first interval
#                       is skipped (default: cpu 5, cuda 20)
#   --threads N         CPU threads for both sides (default 0: every core)
#   --compile           also time torch.compile of the model (on the CPU it needs a C++ compiler
#                       and minutes of compilation)
#   --stream            difftrain reads through its streaming loader instead of data.preload=true
#   --build DIR         where the difftrain binary is (default: build)
#   --keep              keep the work directory (configs, logs, run directories)
#
# Both sides get the same resolved config (`difftrain config print` of the case): difftrain trains
# on the config's data (preloaded onto the device unless --stream; when data.path is missing, a
# random stand-in in the same file format is written, and the table says so); the reference
# uses random batches already on the device. The CPU runs in fp32 (train.mixed_precision=no)
# unless a case sets it; with train.mixed_precision=auto the reference runs what difftrain resolved it
# to (the log says). Exit status 1 when a run fails or the parameter counts differ.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3  # machines without the project venv (the GPU machine)
build=build device="" steps="" warmup="" threads=0 compile=0 stream=0 keep=0
cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --compile) compile=1; shift ;;
    --stream) stream=1; shift ;;
    --build) build=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "train.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
    *) if [ -d "$1" ] && [ -x "$1/difftrain" ]; then build=$1; else cases+=("$1"); fi; shift ;;
  esac
done
bin=$build/difftrain
[ -x "$bin" ] || { echo "train.sh: no $bin (make build, or --build DIR)" >&2; exit 1; }
if [ -z "$device" ]; then
  device=$("$python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
reference=1
if ! "$python" -c 'import diffusers' 2>/dev/null; then
  echo "train.sh: $python cannot import diffusers: only difftrain is timed (pip install diffusers==0.42.1)" >&2
  reference=0
fi
if [ "$device" = cuda ]; then
  steps=${steps:-100} warmup=${warmup:-20}
  [ ${#cases[@]} -gt 0 ] || cases=('configs/cifar10_ddpm.json'
                                   'configs/cifar10_ddpm.json model.sample_size=64 data.resolution=64 train.batch_size=64')
else
  steps=${steps:-15} warmup=${warmup:-5}
  [ ${#cases[@]} -gt 0 ] || cases=('configs/quickstart.json'
                                   'configs/quickstart.json model.block_out_channels=[64,128,256]')
fi
if [ "$warmup" -lt 1 ] || [ "$steps" -lt 1 ]; then echo "train.sh: --warmup and --steps must be >= 1" >&2; exit 1; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/difftrain-bench.XXXXXX")
if [ "$keep" = 1 ]; then echo "# work directory: $work" >&2; else trap 'rm -rf "$work"' EXIT; fi
results=$work/results.jsonl
: > "$results"
status=0

# Settings of the benchmark itself; a case's own overrides come after them and win.
bench_sets=(run.device="$device" run.num_threads="$threads" train.max_steps=$((warmup + steps)) train.lr_warmup_steps=0
            logging.log_every="$warmup" logging.sample_every=0 logging.progress=false checkpoint.every=100000000 checkpoint.keep_every=0
            sampling.num_final_samples=0 sampling.num_samples=1 sampling.batch_size=1 sampling.num_inference_steps=1)
[ "$stream" = 1 ] || bench_sets+=(data.preload=true)
[ "$device" = cuda ] || bench_sets+=(train.mixed_precision=no)

echo "# $(date -u '+%F %H:%M UTC') | $(uname -n) | $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) | $(
  "$python" -c 'import torch; print("torch", torch.__version__)') | $(
  "$bin" --version 2>&1 | head -1)" >&2
[ "$device" != cuda ] || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true

n=0
for spec in "${cases[@]}"; do
  n=$((n + 1))
  read -r -a words <<< "$spec"
  config=${words[0]}
  case_sets=("${words[@]:1}")
  label="$(basename "$config" .json)${case_sets[*]:+ ${case_sets[*]}}"
  dir=$work/case$n
  mkdir -p "$dir"
  set_args=()
  for s in "${bench_sets[@]}" "${case_sets[@]}"; do set_args+=(--set "$s"); done
  if ! "$bin" config print --config "$config" "${set_args[@]}" > "$dir/config.json" 2> "$dir/config.err"; then
    echo "train.sh: $label: $(cat "$dir/config.err")" >&2; status=1; continue
  fi
  # The config's data, or a random stand-in in its file format when it is not on this machine.
  data_note=$("$python" - "$dir/config.json" "$dir/data" <<'EOF'
import json, os, sys
import numpy as np
path, out = sys.argv[1], sys.argv[2]
cfg = json.load(open(path))
d = cfg["data"]
present = {"idx": ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"],
           "cifar10": ["data_batch_1.bin"]}.get(d["dataset"])
if present is None or any(os.path.exists(os.path.join(d["path"], f)) for f in present):
    sys.exit(0)
rng = np.random.default_rng(0)
missing = d["path"]
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
  batch=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["train"]["batch_size"])' "$dir/config.json")
  precision=$("$python" -c 'import json, sys; print({"no": "fp32"}.get(m := json.load(open(sys.argv[1]))["train"]["mixed_precision"], m))' "$dir/config.json")
  echo "## $label: batch $batch, $precision, $warmup warm-up + $steps timed steps${data_note:+; $data_note}" >&2

  # difftrain: img/s of the console intervals after the first (warm-up) one.
  echo "   difftrain ..." >&2
  if "$bin" train --config "$dir/config.json" --set run.output_dir="$dir/runs" > "$dir/difftrain.log" 2>&1; then
    "$python" - "$dir/difftrain.log" "$dir/runs" "$label" "$batch" "$device" "$data_note" > "$dir/difftrain.json" <<'EOF' || status=1
import glob, json, re, sys
log, runs, label, batch, device, note = sys.argv[1:7]
batch = int(batch)
text = open(log).read()
params = int(re.search(r"model: UNet2DModel, (\d+) parameters", text).group(1))
points = [(int(s), float(r)) for s, r in re.findall(r"step (\d+)/\d+ \|.*?\| ([0-9.]+) img/s", text)]
if len(points) < 2:
    sys.exit(f"train.sh: {label}: fewer than two logged intervals in {log}")
images = seconds = 0.0
for (prev, _), (step, rate) in zip(points, points[1:]):  # the first interval is the warm-up
    images += (step - prev) * batch
    seconds += (step - prev) * batch / rate
peak = None
for path in glob.glob(f"{runs}/*/metrics.jsonl"):
    for line in open(path):
        peak = json.loads(line).get("system/gpu_mem_peak_gb", peak)
print(json.dumps({"case": label, "impl": "difftrain", "mode": "C++", "device": device, "params": params,
                  "img_per_s": images / seconds, "ms_per_step": seconds * 1000 / (images / batch),
                  "peak_mem_gb": peak, "data": note or "config data"}))
EOF
    cat "$dir/difftrain.json" >> "$results"
    dparams=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["params"])' "$dir/difftrain.json" 2>/dev/null || echo "")
  else
    echo "train.sh: $label: difftrain failed (exit $?); the log:" >&2; tail -5 "$dir/difftrain.log" >&2; status=1; dparams=""
  fi

  if [ "$precision" = auto ]; then  # the reference runs what difftrain's auto resolved to here
    precision=fp32
    grep -q "train.mixed_precision = auto: bf16" "$dir/difftrain.log" && precision=bf16
    echo "   (auto resolved to $precision)" >&2
  fi
  modes=(eager); [ "$compile" = 1 ] && modes+=(compile)
  [ "$reference" = 1 ] || modes=()
  for mode in "${modes[@]}"; do
    echo "   pytorch $mode ..." >&2
    if "$python" scripts/bench/reference_train.py --config "$dir/config.json" --mode "$mode" --device "$device" \
         --steps "$steps" --warmup "$warmup" --threads "$threads" --precision "$precision" \
         ${dparams:+--expect-params "$dparams"} > "$dir/pytorch-$mode.log" 2>&1; then
      tail -1 "$dir/pytorch-$mode.log" | "$python" -c 'import json, sys; r = json.loads(sys.stdin.read()); r["case"] = sys.argv[1]; print(json.dumps(r))' "$label" >> "$results"
    else
      echo "train.sh: $label: pytorch $mode failed; the log:" >&2; tail -5 "$dir/pytorch-$mode.log" >&2; status=1
    fi
  done
done

echo >&2
"$python" - "$results" "$device" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cuda = sys.argv[2] == "cuda"
head = "| config | implementation | img/s | ms/step | vs PyTorch eager |" + (" peak GiB |" if cuda else "")
print(head)
print("|---" * head.count(" |") + "|")
for case in dict.fromkeys(r["case"] for r in rows):
    mine = [r for r in rows if r["case"] == case]
    eager = next((r["img_per_s"] for r in mine if r["impl"] == "pytorch" and r["mode"] == "eager"), None)
    for r in mine:
        name = "difftrain" if r["impl"] == "difftrain" else f"PyTorch {r['mode']}"
        ratio = f"{r['img_per_s'] / eager:.2f}×" if eager else "-"
        cells = [f"`{case}` ({r['params']:,} params)", name, f"{r['img_per_s']:,.1f}", f"{r['ms_per_step']:,.1f}", ratio]
        if cuda:
            cells.append("-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.2f}")
        print("| " + " | ".join(cells) + " |")
for r in rows:
    if r["impl"] == "difftrain" and r.get("data", "config data") != "config data":
        print(f"\n`{r['case']}`: difftrain read a {r['data'].removeprefix('data: ')}.")
EOF
exit $status

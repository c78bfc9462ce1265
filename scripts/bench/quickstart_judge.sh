#!/usr/bin/env bash
# FID and KID of a Fashion-MNIST run's samples on the Fashion-MNIST judge (docs/EVALUATION.md), as one JSON line.
#   scripts/bench/quickstart_judge.sh RUN_DIR [N]
# Scores RUN_DIR/samples/final (the first N images when N is given) against the 10,000 test images
# of the run's dataset; a run without samples/final gets N (default 1000) images generated now from
# its latest checkpoint (the run's sampling.* settings). The judge is built once by
# tests/fid/make_fmnist_judge.py into build/judge/fmnist_judge.pt (rebuilt when that script is
# newer), and the test split's statistics are cached next to it, so RUN_DIR is only read.
# Environment: DIFFTRAIN (default build/difftrain), PYTHON (default .venv/bin/python),
# JUDGE_DIR (default build/judge), THREADS (CPU threads, default 1).
# The numbers are comparable only with other numbers from the same judge file, never with Inception FIDs.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 RUN_DIR [N]" >&2; exit 1; }
run=$(cd "$1" && pwd)
n=${2:-}
difftrain=${DIFFTRAIN:-$root/build/difftrain}
python=${PYTHON:-$root/.venv/bin/python}
judge_dir=${JUDGE_DIR:-$root/build/judge}
threads=${THREADS:-1}
judge=$judge_dir/fmnist_judge.pt
[ -f "$run/config.json" ] || { echo "$run/config.json: not a difftrain run directory" >&2; exit 1; }

# The run's dataset must be Fashion-MNIST-shaped: IDX, 1 channel, 28x28.
data_path=$("$python" - "$run/config.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["data"]
if d["dataset"] != "idx" or d["channels"] != 1 or d["resolution"] != 28:
    sys.exit(f"the run's data is {d['dataset']}, {d['channels']} channel(s), {d['resolution']}x{d['resolution']}; "
             "the Fashion-MNIST judge needs idx, 1 channel, 28x28")
print(d["path"])
PY
)

mkdir -p "$judge_dir"
if [ ! -f "$judge" ] || [ "$root/tests/fid/make_fmnist_judge.py" -nt "$judge" ]; then
  echo "building the judge: $judge" >&2
  "$python" "$root/tests/fid/make_fmnist_judge.py" "$judge" --data "$data_path" >&2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
final=$run/samples/final
if [ -d "$final" ]; then
  samples=$final
  if [ -n "$n" ]; then  # the first N of the folder, as links
    mkdir "$tmp/samples"
    count=0
    for f in $(ls "$final" | grep -E '^[0-9]+\.png$' | sort | head -n "$n"); do ln -s "$final/$f" "$tmp/samples/$f"; count=$((count + 1)); done
    [ "$count" -eq "$n" ] || { echo "$final holds only $count images, asked for $n" >&2; exit 1; }
    samples=$tmp/samples
  fi
  source_args=(--samples "$samples")
else
  echo "no $final: generating ${n:-1000} images from the latest checkpoint" >&2
  source_args=(--run "$run" --checkpoint latest -n "${n:-1000}")
fi

"$difftrain" eval --feature-net "$judge" "${source_args[@]}" \
  --config "$run/config.json" --set data.split=test --stats-cache "$judge_dir/fmnist_test_stats.safetensors" \
  --threads "$threads" --feature-batch-size 500 --out "$tmp/result.json" >/dev/null

"$python" - "$tmp/result.json" "${judge%.pt}.json" "$run" <<'PY'
import json, sys
r, j = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(json.dumps({"run": sys.argv[3], "fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"],
                  "num_generated": r["num_generated"], "num_reference": r["num_reference"],
                  "reference": r["reference"], "judge": r["feature_net"], "judge_sha256": r["feature_net_sha256"],
                  "judge_test_accuracy": j["test_accuracy"]}))
PY

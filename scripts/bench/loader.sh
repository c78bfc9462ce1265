#!/usr/bin/env bash
# Loader throughput: difftrain's modes and PyTorch's DataLoader on the same data, in one run.
#   scripts/bench/loader.sh [BUILD_DIR] [BATCHES] [TRAIN_STEPS]
# 1. Fashion-MNIST IDX (in memory): difftrain Loader vs a PyTorch Dataset/DataLoader.
# 2. The same images as WebDataset shards on disk (`difftrain data pack`, 60 shards of 1000):
#    difftrain streaming with 0/1/2 workers (from the directory, and from the shard index with
#    4 shard streams) vs a DataLoader over the `webdataset` package.
# 3. Whether the stream keeps training fed: the quickstart trained TRAIN_STEPS (default 100)
#    steps from the shards (2 workers) and from preloaded IDX; train/img_per_s of each.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
batches=${2:-200}
train_steps=${3:-100}
python=${PYTHON:-$root/.venv/bin/python}
data=/usr/share/datasets/fashion-mnist
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$root"
echo "# $(date -u +%F) $(nproc) cores; $("$python" -c 'import torch; print("torch", torch.__version__)')"
echo "## IDX in memory"
"$build/bench/bench_loader" configs/quickstart.json "$batches"
"$python" scripts/bench/loader_baseline.py "$data" "$batches" 28

echo "## WebDataset shards on disk"
"$build/difftrain" data pack --from idx --path "$data" --out "$tmp/shards" --shard-size 1000 >/dev/null
du -sh "$tmp/shards" | sed 's/^/# shards: /'
"$build/bench/bench_loader" configs/quickstart.json "$batches" data.dataset=webdataset "data.path=$tmp/shards" \
  data.preload=false
echo "# the same through the shard index (no header scan at open), 4 shard streams"
"$build/bench/bench_loader" configs/quickstart.json "$batches" data.dataset=webdataset \
  "data.path=$tmp/shards/shard-index.json" data.preload=false data.shard_streams=4
"$python" scripts/bench/loader_wds_baseline.py "$tmp/shards" 28 "$batches"

echo "## Training the quickstart for $train_steps steps: train/img_per_s over the last $((train_steps / 2))"
for source in idx webdataset; do
  args=(--set "train.max_steps=$train_steps" --set "logging.log_every=$((train_steps / 2))" --set logging.sample_every=0
        --set checkpoint.every=1000000 --set sampling.num_final_samples=0 --set "run.output_dir=$tmp/runs" --set "run.name=$source")
  [ "$source" = webdataset ] && args+=(--set data.dataset=webdataset --set "data.path=$tmp/shards" --set data.preload=false
                                       --set data.num_workers=2)
  "$build/difftrain" train --config configs/quickstart.json "${args[@]}" >/dev/null 2>&1
  "$python" -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; r=[x for x in rows if 'train/img_per_s' in x][-1]; print(json.dumps({'train_from': sys.argv[2], 'step': r.get('step'), 'img_per_s': round(r['train/img_per_s'], 1)}))" \
    "$tmp/runs/$source/metrics.jsonl" "$source"
done

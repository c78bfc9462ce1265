#!/usr/bin/env bash
# The runtime image's own check (the `smoke` stage of docker/Dockerfile), as its user, in its
# working directory: the quickstart config trains 20 steps straight, and 10 steps then
# `--resume latest` to 20; both runs' step-20 checkpoints must agree to the bit (weights, EMA,
# optimizer, generators, loader position). --device cuda must be refused where there is no GPU.
set -euo pipefail
config=/opt/difftrain/configs/quickstart.json
common=(--config "$config" --device cpu --set run.output_dir=/tmp/smoke --set train.lr_schedule=constant
        --set logging.log_every=5 --set logging.sample_every=0 --set sampling.num_final_samples=0 --set checkpoint.every=10)
difftrain --version
difftrain env
difftrain train "${common[@]}" --set run.name=straight --set train.max_steps=20
difftrain train "${common[@]}" --set run.name=halves --set train.max_steps=10
difftrain train "${common[@]}" --set run.name=halves --set train.max_steps=20 --resume latest 2>&1 | tee /tmp/smoke/resume.log
grep -q "resumed from /tmp/smoke/halves/checkpoints/step_00000010 at step 10" /tmp/smoke/resume.log
for f in model ema optimizer rng; do
  cmp "/tmp/smoke/straight/checkpoints/step_00000020/$f.safetensors" "/tmp/smoke/halves/checkpoints/step_00000020/$f.safetensors"
done
cmp /tmp/smoke/straight/checkpoints/step_00000020/state.json /tmp/smoke/halves/checkpoints/step_00000020/state.json
echo "smoke: 20 steps straight == 10 steps + --resume latest to 20 (model, EMA, optimizer, rng, state)"
if [ "${SMOKE_EXPECT_CUDA:-0}" = 0 ]; then
  rc=0; difftrain train --config "$config" --device cuda --dry-run > /tmp/smoke/cuda.log 2>&1 || rc=$?
  cat /tmp/smoke/cuda.log
  [ "$rc" -ne 0 ] && grep -q "cuda" /tmp/smoke/cuda.log || { echo "smoke: --device cuda was not refused" >&2; exit 1; }
fi
rm -rf /tmp/smoke

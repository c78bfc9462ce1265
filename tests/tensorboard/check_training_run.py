#!/usr/bin/env python3
"""Checks a training run directory with the real TensorBoard (tests/e2e/test_train.cpp).

    check_training_run.py RUN_DIR HISTOGRAM_EVERY

EventAccumulator (everything kept) loads RUN_DIR after the purge of orphaned steps. Then:
- every value of metrics.jsonl is the TensorBoard scalar of the same tag at the same step
  (float32), and the two hold the same steps: one history, no duplicates from a resume;
- the "samples" images are at the steps of samples/step_XXXXXXXX.png and decode to their pixels;
- the resolved config is a text at step 0;
- weight and gradient histograms are at multiples of HISTOGRAM_EVERY, with counts = element count.
Prints a summary; exits 1 on any mismatch.
"""
import glob
import io
import json
import math
import os
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

run_dir, hist_every = sys.argv[1], int(sys.argv[2])
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
acc.Reload()
tags = acc.Tags()

lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
jsonl_steps = [line["step"] for line in lines]
check(jsonl_steps == sorted(set(jsonl_steps)), f"metrics.jsonl steps are not one increasing history: {jsonl_steps}")
scalar_points = 0
for tag in sorted({k for line in lines for k in line} - {"step", "wall_time"}):
    expected = {line["step"]: line[tag] for line in lines if tag in line}
    check(tag in tags["scalars"], f"scalar {tag} missing from TensorBoard")
    if tag not in tags["scalars"]:
        continue
    got = {e.step: e.value for e in acc.Scalars(tag)}
    check(sorted(got) == sorted(expected), f"{tag}: TensorBoard steps {sorted(got)} != metrics.jsonl steps {sorted(expected)}")
    for step, value in expected.items():
        if value is None or step not in got:
            continue
        scalar_points += 1
        check(math.isclose(got[step], np.float32(value), rel_tol=1e-6, abs_tol=1e-30), f"{tag}@{step}: {got[step]} != {value}")
for tag in ["train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/epoch", "train/loss_q0"]:
    check(tag in tags["scalars"], f"expected scalar {tag}")

pngs = sorted(glob.glob(os.path.join(run_dir, "samples", "step_*.png")))
png_steps = [int(os.path.basename(p)[5:13]) for p in pngs]
images = acc.Images("samples") if "samples" in tags["images"] else []
check([im.step for im in images] == png_steps, f"image steps {[im.step for im in images]} != sample files {png_steps}")
for im, path in zip(images, pngs):
    a = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)))
    b = np.asarray(Image.open(path))
    check(a.shape == b.shape and (a == b).all(), f"image at step {im.step} differs from {path}")

texts = [t for t in tags["tensors"] if t.startswith("config")]
check(len(texts) == 1 and [e.step for e in acc.Tensors(texts[0])] == [0], f"config text at step 0: {texts}")

hist_tags = tags["histograms"]
if hist_every > 0:
    check(any(t.startswith("weights/") for t in hist_tags) and any(t.startswith("grads/") for t in hist_tags),
          f"weight and gradient histograms expected, got {hist_tags}")
for tag in hist_tags:
    for h in acc.Histograms(tag):
        check(h.step % hist_every == 0, f"histogram {tag} at step {h.step}")
        check(sum(h.histogram_value.bucket) == h.histogram_value.num, f"histogram {tag}@{h.step}: bucket counts != num")

print(f"{scalar_points} scalar points, {len(images)} images, {len(hist_tags)} histogram tags, {len(texts)} texts checked")
for f in failures:
    print("MISMATCH:", f)
sys.exit(1 if failures else 0)

#!/usr/bin/env python3
"""Checks a run directory written by tests/test_tensorboard.cpp with the real TensorBoard.

    check_events.py RUN_DIR EXPECTED_JSON

EXPECTED_JSON holds "ops", every call made on difftrain's writers in order ({"op": "open",
"purge_step"}, "scalar", "image", "histogram", "text"), and "expect", what TensorBoard must show
once the orphaned steps of a resume are purged: scalars as [step, value] per tag, and the steps
of each image, histogram and text tag (their data is that of the last op with that tag and step).

1. EventAccumulator (size_guidance 0: keep everything) loads RUN_DIR; every scalar, image
   (PNG decoded), histogram (against torch.utils.tensorboard.summary.make_histogram with the
   'tensorflow' bins) and text must come back at the right steps with the right values.
2. The same ops replayed through torch.utils.tensorboard.SummaryWriter; each Event difftrain wrote
   must equal SummaryWriter's field by field, but for wall_time, source_metadata.writer, the PNG
   bytes (compared as pixels; difftrain keeps gray as one channel where SummaryWriter makes RGB) and
   histogram sums (summation order: compared to 1e-9).
Prints a summary; exits 1 on any mismatch.
"""
import glob
import io
import json
import math
import os
import sys
import tempfile

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

failures = []
checked = {"scalars": 0, "images": 0, "histograms": 0, "texts": 0, "events": 0}


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def png_pixels(data):
    """HWC uint8 array of a PNG, gray as H x W x 1."""
    a = np.asarray(Image.open(io.BytesIO(data)))
    return a[:, :, None] if a.ndim == 2 else a


def last_op(ops, kind, tag, step):
    found = [o for o in ops if o["op"] == kind and o["tag"] == tag and o["step"] == step]
    return found[-1] if found else None


def check_accumulator(run_dir, ops, expect, default_bins):
    acc = ea.EventAccumulator(run_dir, size_guidance={k: 0 for k in (
        ea.COMPRESSED_HISTOGRAMS, ea.IMAGES, ea.AUDIO, ea.SCALARS, ea.HISTOGRAMS, ea.TENSORS)})
    acc.Reload()
    tags = acc.Tags()

    for tag, points in expect["scalars"].items():
        if not check(tag in tags["scalars"], f"scalar tag {tag} missing (have {tags['scalars']})"):
            continue
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(s, float(np.float32(v))) for s, v in points]  # simple_value is a float32
        check(got == want, f"scalars {tag}: got {got}, want {want}")
        checked["scalars"] += len(got)

    for tag, steps in expect["images"].items():
        if not check(tag in tags["images"], f"image tag {tag} missing (have {tags['images']})"):
            continue
        events = acc.Images(tag)
        check([e.step for e in events] == steps, f"images {tag}: steps {[e.step for e in events]}, want {steps}")
        for e in events:
            op = last_op(ops, "image", tag, e.step)
            if not check(op is not None, f"image {tag} at step {e.step} was never written"):
                continue
            c, h, w = op["channels"], op["height"], op["width"]
            want = np.array(op["pixels"], dtype=np.uint8).reshape(c, h, w).transpose(1, 2, 0)
            got = png_pixels(e.encoded_image_string)
            check((e.height, e.width) == (h, w), f"image {tag}@{e.step}: {e.height}x{e.width}, want {h}x{w}")
            check(got.shape == want.shape and np.array_equal(got, want), f"image {tag}@{e.step}: pixels differ")
            checked["images"] += 1

    for tag, steps in expect["histograms"].items():
        if not check(tag in tags["histograms"], f"histogram tag {tag} missing (have {tags['histograms']})"):
            continue
        events = acc.Histograms(tag)
        check([e.step for e in events] == steps, f"histograms {tag}: steps {[e.step for e in events]}, want {steps}")
        for e in events:
            op = last_op(ops, "histogram", tag, e.step)
            if not check(op is not None, f"histogram {tag} at step {e.step} was never written"):
                continue
            want = make_histogram(np.array(op["values"], dtype=np.float32).astype(float), default_bins)
            got = e.histogram_value
            check(list(got.bucket_limit) == list(want.bucket_limit), f"histogram {tag}@{e.step}: bucket_limit differs")
            check(list(got.bucket) == list(want.bucket), f"histogram {tag}@{e.step}: bucket differs "
                  f"({list(got.bucket)[:8]}... vs {list(want.bucket)[:8]}...)")
            check((got.min, got.max, got.num) == (want.min, want.max, want.num),
                  f"histogram {tag}@{e.step}: min/max/num {(got.min, got.max, got.num)} vs {(want.min, want.max, want.num)}")
            check(math.isclose(got.sum, want.sum, rel_tol=1e-9, abs_tol=1e-9)
                  and math.isclose(got.sum_squares, want.sum_squares, rel_tol=1e-9),
                  f"histogram {tag}@{e.step}: sum/sum_squares {(got.sum, got.sum_squares)} vs {(want.sum, want.sum_squares)}")
            check(sum(got.bucket) == got.num, f"histogram {tag}@{e.step}: bucket counts do not sum to num")
            checked["histograms"] += 1

    text_tags = acc.PluginTagToContent("text")
    for tag, steps in expect["texts"].items():
        full = tag + "/text_summary"
        if not check(full in text_tags and full in tags["tensors"], f"text tag {full} missing (text plugin: {list(text_tags)})"):
            continue
        events = acc.Tensors(full)
        check([e.step for e in events] == steps, f"text {tag}: steps {[e.step for e in events]}, want {steps}")
        for e in events:
            op = last_op(ops, "text", tag, e.step)
            got = [s.decode() for s in e.tensor_proto.string_val]
            check(op is not None and got == [op["text"]], f"text {tag}@{e.step}: {got!r}")
            checked["texts"] += 1


def replay(ops, log_root):
    """The ops through SummaryWriter, one log dir per "open" so file order is unambiguous."""
    writer = None
    for i, op in enumerate(ops):
        if op["op"] == "open":
            if writer:
                writer.close()
            writer = SummaryWriter(os.path.join(log_root, f"{i:04d}"), purge_step=op["purge_step"])
        elif op["op"] == "scalar":
            writer.add_scalar(op["tag"], op["value"], op["step"])
        elif op["op"] == "image":
            px = np.array(op["pixels"], dtype=np.uint8).reshape(op["channels"], op["height"], op["width"])
            writer.add_image(op["tag"], px, op["step"], dataformats="CHW")
        elif op["op"] == "histogram":
            writer.add_histogram(op["tag"], np.array(op["values"], dtype=np.float32), op["step"])
        elif op["op"] == "text":
            writer.add_text(op["tag"], op["text"], op["step"])
    writer.close()
    return writer.default_bins


def events_of(files):
    out = []
    for f in files:
        evs = list(LegacyEventFileLoader(f).Load())
        for k, e in enumerate(evs):
            # SummaryWriter(purge_step=) adds Event{step, file_version} after the file's first
            # Event, before the SessionLog: a duplicate of the first, left out of the comparison.
            if k > 0 and e.HasField("file_version"):
                continue
            out.append(e)
    return out


def compare_with_summary_writer(ours_files, theirs_files):
    ours, theirs = events_of(ours_files), events_of(theirs_files)
    check(len(ours) == len(theirs), f"{len(ours)} events from difftrain, {len(theirs)} from SummaryWriter")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        check(a.wall_time > 1e9 and a.wall_time != int(a.wall_time), f"event {k}: wall_time {a.wall_time}")
        a.ClearField("wall_time")
        b.ClearField("wall_time")
        if a.HasField("file_version"):
            check(a.source_metadata.writer == "difftrain", f"event {k}: writer {a.source_metadata.writer!r}")
            a.source_metadata.writer = b.source_metadata.writer
        for va, vb in zip(a.summary.value, b.summary.value):
            if va.HasField("image") and vb.HasField("image"):
                pa, pb = png_pixels(va.image.encoded_image_string), png_pixels(vb.image.encoded_image_string)
                if pa.shape[2] == 1 and pb.shape[2] == 3:  # SummaryWriter repeats gray to RGB
                    check(va.image.colorspace == 1, f"event {k}: gray image colorspace {va.image.colorspace}")
                    pa = np.repeat(pa, 3, axis=2)
                    va.image.colorspace = vb.image.colorspace
                check(np.array_equal(pa, pb), f"event {k}: image pixels differ from SummaryWriter's")
                va.image.encoded_image_string = vb.image.encoded_image_string
            if va.HasField("histo") and vb.HasField("histo"):
                for f in ("sum", "sum_squares"):
                    x, y = getattr(va.histo, f), getattr(vb.histo, f)
                    check(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), f"event {k}: histo.{f} {x} vs {y}")
                    setattr(va.histo, f, y)
        if not check(a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True),
                     f"event {k} differs from SummaryWriter's:\n--- difftrain\n{a}--- SummaryWriter\n{b}"):
            continue
        checked["events"] += 1


def main():
    run_dir, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    ops, expect = expected["ops"], expected["expect"]
    ours = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
    check(len(ours) == sum(o["op"] == "open" for o in ops), f"event files: {ours}")
    with tempfile.TemporaryDirectory() as tmp:
        default_bins = replay(ops, tmp)
        theirs = [f for d in sorted(os.listdir(tmp)) for f in sorted(glob.glob(os.path.join(tmp, d, "events.out.tfevents.*")))]
        check_accumulator(run_dir, ops, expect, default_bins)
        compare_with_summary_writer(ours, theirs)
    print("checked with tensorboard's EventAccumulator:", ", ".join(f"{v} {k}" for k, v in checked.items() if k != "events"))
    print(f"checked against torch.utils.tensorboard.SummaryWriter: {checked['events']} events equal")
    for f in failures:
        print("MISMATCH:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Sums a profiler trace by op type: where the time of a training step goes.

    profile_ops.py TRACE.json [--steps N] [--top K]

TRACE is a Chrome trace as torch.profiler's export_chrome_trace and difftrain's
logging.profile_start write it (LibTorch's Kineto profiler in both). Each ATen op's self time is
its duration minus that of the ops nested in it on the same thread, so nothing is counted twice
(aten::conv2d -> aten::convolution -> aten::mkldnn_convolution counts once, in the innermost).
--steps divides by the number of traced steps. With CUDA kernels in the trace, their device
time is summed by kernel name too. Prints Markdown tables for docs/PERFORMANCE.md.
"""
import argparse
import json
from collections import defaultdict

# Op types of a training step: the first group whose patterns an op name contains.
OP_TYPES = [
    ("convolution (fwd + bwd)", ("convolution", "conv2d", "mkldnn_conv", "conv_depthwise", "slow_conv")),
    ("GEMM (linear, attention)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "scaled_dot_product",
                                  "_efficient_attention", "_flash_attention")),
    ("GroupNorm (fwd + bwd)", ("group_norm",)),
    ("SiLU (fwd + bwd)", ("silu",)),
    ("softmax", ("softmax",)),
    ("AdamW", ("adam",)),
    ("EMA, clip (foreach)", ("_foreach", "norm")),
    ("upsample, pad, cat", ("upsample", "pad", "interpolate", "aten::cat")),
    ("elementwise (add, mul, copy, ...)", ("add", "mul", "sub", "div", "copy", "fill", "zero", "clone", "aten::to",
                                          "pow", "sum", "mean", "mse", "exp", "sin", "cos", "where", "randn", "randint",
                                          "normal", "uniform", "index", "sqrt", "neg", "lerp", "empty", "ones")),
]


def op_type(name):
    lower = name.lower()
    for label, patterns in OP_TYPES:
        if any(p in lower for p in patterns):
            return label
    return "other"


def self_times(events):
    """{op name: (self µs, calls)} over ATen ops, nesting resolved per thread."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e["name"].startswith("aten::"):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals = defaultdict(lambda: [0.0, 0])
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, child time]
        def close(frame):
            end, name, child, dur = frame
            totals[name][0] += dur - child
            totals[name][1] += 1
            if stack:
                stack[-1][2] += dur
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]:
                close(stack.pop())
            stack.append([e["ts"] + e["dur"], e["name"], 0.0, e["dur"]])
        while stack:
            close(stack.pop())
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="traced steps (divides every figure)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    n = max(1, args.steps)
    ops = self_times(events)
    by_type = defaultdict(float)
    for name, (us, _) in ops.items():
        by_type[op_type(name)] += us
    total = sum(by_type.values())
    print(f"Self CPU time of ATen ops per step ({total / 1000 / n:.1f} ms in all):\n")
    print("| op type | ms/step | share |\n|---|---|---|")
    for label, us in sorted(by_type.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {us / 1000 / n:.1f} | {100 * us / total:.1f}% |")
    print("\n| ATen op | calls/step | self ms/step |\n|---|---|---|")
    for name, (us, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| `{name}` | {calls / n:.0f} | {us / 1000 / n:.1f} |")
    kernels = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            kernels[e["name"]] += e["dur"]
    if kernels:
        ktotal = sum(kernels.values())
        print(f"\nCUDA kernel time per step: {ktotal / 1000 / n:.2f} ms\n")
        print("| kernel | ms/step | share |\n|---|---|---|")
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"| `{name[:90]}` | {us / 1000 / n:.2f} | {100 * us / ktotal:.1f}% |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""FLOPs per image of diffusers' UNet2DModel, forward and backward, as torch.utils.flop_counter counts them.

    python flop_count.py CASES.json

CASES.json is a list of {"name", "model" (our model.* keys, which are UNet2DModel's arguments),
"batch", "height", "width"}. Prints one JSON object on stdout: for each case, "forward" and
"backward" (FLOPs per image: the batch's count divided by the batch) and "ops" (the counts per
aten op, per image, forward and backward), for the C++ test (tests/test_flops.cpp) to compare
with difftrain::model_flops. Runs on the CPU in fp32; FLOP counts depend on shapes only.

FlopCounterMode counts 2 x the multiply-accumulates of mm/addmm/bmm/baddbmm and convolutions
(forward; backward: grad-input when the input needs it, grad-weight always), and the
scaled_dot_product_attention kernels by its own formulas (two bmm forward; five backward, the
score matrix recomputed). flop_counter.py lists SDPA's CUDA kernels (flash, efficient, cuDNN)
but not the CPU one (_scaled_dot_product_flash_attention_for_cpu), which it would count as 0;
the same two formulas are registered for it here, so that this CPU run counts what a GPU run
counts. Nothing else (GroupNorm, SiLU, softmax, elementwise) is counted, by FlopCounterMode
or by us.
"""
import json
import sys

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
}


def diffusers_unet(model):  # our null class is one more embedding row (as tests/reference/make_reference.py)
    kw = dict(model)
    if kw.get("num_class_embeds") is not None:
        kw["num_class_embeds"] += 1
    return UNet2DModel(**kw)


def per_image(counter, batch):
    ops = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    for op, n in ops.items():
        assert n % batch == 0, f"{op}: {n} FLOPs is not a multiple of the batch {batch}"
    return counter.get_total_flops() // batch, {op: n // batch for op, n in ops.items()}


def count(case):
    torch.manual_seed(0)
    model = case["model"]
    unet = diffusers_unet(model).train()
    b = case["batch"]
    sample = torch.randn(b, model["in_channels"], case["height"], case["width"])
    timesteps = torch.randint(0, 1000, (b,))
    labels = torch.randint(0, model["num_class_embeds"], (b,)) if model.get("num_class_embeds") else None
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fwd:
        out = unet(sample, timesteps, class_labels=labels).sample
        loss = (out - torch.randn_like(out)).pow(2).mean()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as bwd:
        loss.backward()
    forward, fwd_ops = per_image(fwd, b)
    backward, bwd_ops = per_image(bwd, b)
    return {"forward": forward, "backward": backward, "ops": {"forward": fwd_ops, "backward": bwd_ops}}


def main():
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    print(json.dumps({case["name"]: count(case) for case in cases}, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The training step in PyTorch and diffusers, for tests/test_train_step.cpp (issue 18, part 5).

    python train_step_reference.py IN_DIR OUT_FILE

IN_DIR holds, written by the C++ test from difftrain:
  config.json    difftrain's resolved config (model.* are UNet2DModel's arguments)
  weights.safetensors  the initial weights by diffusers name
  batches.safetensors  "x0": (steps * k, B, C, H, W), the loader's batches in order
  seed.json      {"seed": the trainer's generator seed (rng.h: stream_seed(run.seed, SeedPurpose::global_batch))}

Runs train.max_steps optimizer steps of gradient_accumulation_steps micro-batches each, the way
diffusers' train_unconditional.py and its min-SNR variant do, with nothing from difftrain:
  t, ε drawn from a torch.Generator seeded with the trainer's seed (torch.randn, torch.randint:
  the same CPU Mersenne Twister and the same draws as the C++ at::randn / at::randint)
  x_t = DDPMScheduler.add_noise(x0, ε, t); ε-prediction by UNet2DModel
  loss = mean over the batch of min(SNR, γ)/SNR · MSE(output, ε) (compute_snr, Hang et al. 2023), / k
  clip_grad_norm_; torch.optim.AdamW (decay on tensors of dim >= 2 only); the LR from
  diffusers.optimization.get_scheduler; diffusers.training_utils.EMAModel.

Twice: in float32 and in float64 (the same inputs), so the test can hold difftrain's float32 to
the reference's float32 error against float64. Writes OUT_FILE (safetensors): "loss32"/"loss64"
(steps,), "model32.<name>", "model64.<name>", "ema32.<name>", "ema64.<name>".
@generated outputs only; this script is the generator.
"""
import json
import os
import sys

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file


def run(cfg, weights, x0_all, seed, dtype):
    m, d, tr, e = cfg["model"], cfg["diffusion"], cfg["train"], cfg["ema"]
    kw = dict(m)
    if kw.get("num_class_embeds") is not None:
        kw["num_class_embeds"] += 1  # our null class is one more embedding row
    unet = UNet2DModel(**kw)
    unet.load_state_dict({k: v for k, v in weights.items()}, strict=True)
    unet.to(dtype).train()
    assert m.get("num_class_embeds") is None, "the reference loop is unconditional"
    assert d["prediction_type"] == "epsilon" and d["beta_schedule"] == "linear"
    scheduler = DDPMScheduler(num_train_timesteps=d["num_train_timesteps"], beta_start=d["beta_start"],
                              beta_end=d["beta_end"], beta_schedule=d["beta_schedule"])
    params = list(unet.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tr["learning_rate"], betas=(tr["adam_beta1"], tr["adam_beta2"]), eps=tr["adam_epsilon"])
    lr_sched = get_scheduler(tr["lr_schedule"], optimizer=opt, num_warmup_steps=tr["lr_warmup_steps"],
                             num_training_steps=tr["max_steps"])
    ema = EMAModel(params, decay=e["decay"], min_decay=e["min_decay"], update_after_step=e["update_after_step"],
                   use_ema_warmup=e["use_ema_warmup"], inv_gamma=e["inv_gamma"], power=e["power"])
    gen = torch.Generator().manual_seed(seed)
    k, T, gamma = tr["gradient_accumulation_steps"], d["num_train_timesteps"], d["snr_gamma"]
    losses = []
    for step in range(tr["max_steps"]):
        total = 0.0
        for micro in range(k):
            x0 = x0_all[step * k + micro]
            noise = torch.randn(x0.shape, generator=gen)             # ε, drawn in float32 as difftrain does
            t = torch.randint(0, T, (x0.shape[0],), generator=gen)   # t ~ U{0..T-1}
            x_t = scheduler.add_noise(x0.to(dtype), noise.to(dtype), t)
            out = unet(x_t, t).sample
            mse = ((out - noise.to(dtype)) ** 2).mean(dim=[1, 2, 3])
            snr = compute_snr(scheduler, t).to(dtype)
            w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
            loss = (mse * w).mean() / k
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, tr["max_grad_norm"])
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(params)
        losses.append(total)
    names = [n for n, _ in unet.named_parameters()]
    out = {f"model.{n}": p.detach().clone() for n, p in unet.named_parameters()}
    out.update({f"ema.{n}": s.detach().clone() for n, s in zip(names, ema.shadow_params)})
    return torch.tensor(losses, dtype=torch.float64), out


def main():
    in_dir, out_file = sys.argv[1], sys.argv[2]
    torch.use_deterministic_algorithms(True)
    with open(os.path.join(in_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(in_dir, "seed.json")) as f:
        seed = json.load(f)["seed"]
    weights = load_file(os.path.join(in_dir, "weights.safetensors"))
    x0_all = load_file(os.path.join(in_dir, "batches.safetensors"))["x0"]
    result = {}
    for dtype, tag in ((torch.float32, "32"), (torch.float64, "64")):
        losses, tensors = run(cfg, weights, x0_all, seed, dtype)
        result["loss" + tag] = losses
        result.update({k.replace(".", tag + ".", 1): v.contiguous() for k, v in tensors.items()})
    save_file(result, out_file, metadata={"generated_by": "tests/reference/train_step_reference.py", "mark": "@generated"})


if __name__ == "__main__":
    main()

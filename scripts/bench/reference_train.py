#!/usr/bin/env python3
"""The difftrain training step in Python PyTorch, for side-by-side speed comparison (the baseline
of docs/PERFORMANCE.md's training figures; scripts/bench/train.sh runs both in one call).

    reference_train.py --config configs/quickstart.json [--set key.path=value ...]
                       [--compile none|default|reduce-overhead|max-autotune|auto] [--device cpu|cuda]
                       [--steps N] [--warmup N] [--batch-size B] [--threads N]
                       [--precision config|fp32|bf16|fp16] [--channels-last] [--cudnn-benchmark]
                       [--allow-tf32] [--peak-tflops X] [--no-flops] [--data synthetic|real]
                       [--expect-params N] [--profile TRACE.json]

It reads a difftrain config (a file as written, or the resolved one from `difftrain config print`;
missing keys take difftrain's defaults, mirrored below), builds diffusers' UNet2DModel from
model.* (difftrain's num_class_embeds = K is diffusers' K + 1: the extra row is the learned null
class) and DDPMScheduler from diffusion.*, and times the step difftrain's Trainer::train_step
takes (src/train_step.cpp):

    t ~ U{0..T-1}, noise ~ N(0, I)  ->  add_noise  ->  UNet(x_t, t[, y with class dropout])
    ->  MSE to the prediction-type target (min-SNR weights if diffusion.snr_gamma)  ->  backward
    ->  clip_grad_norm_(foreach)  ->  fused AdamW (weight decay on dim >= 2 only)  ->  LR schedule
    ->  EMA with torch._foreach ops (diffusers' EMAModel math)

--compile MODE: torch.compile(unet, mode=MODE) -- the UNet module only (its forward, and through
AOTAutograd its backward), as diffusers' training scripts do; noise, loss, clipping, the fused
AdamW and the foreach EMA stay eager (they are already multi-tensor kernels). auto: reduce-overhead
(CUDA graphs) on CUDA for models under 10M parameters (launch-bound, like the quickstart's 1.1M),
default otherwise. Compilation happens in the warm-up steps, which are not timed; the JSON line
reports it apart (first_step_s, compile_s). The old spelling --mode compile [--compile-mode M]
still works.

Autocast: train.mixed_precision on CUDA (bf16, or fp16 with a GradScaler); fp32 on the CPU unless
--precision says otherwise. Data: a pool of random batches already on the device (synthetic,
the default), or --data real: the config's IDX / CIFAR-10 files loaded onto the device once and
indexed with on-device random indices. The timed loop has no host synchronisation: loss and
gradient norm are summed on the device and read once, after the last step. On CUDA the timed loop
is measured with CUDA events (and the wall clock, which agree when nothing syncs), and the peak
memory (torch.cuda.max_memory_allocated) is reset after the warm-up.

MFU: one forward + backward at the benchmark's batch, precision and memory format is counted
with torch.utils.flop_counter.FlopCounterMode before the warm-up (matmuls, convolutions and
attention; elementwise ops are not counted); achieved TFLOP/s = FLOPs per image x img/s, MFU =
that / the peak: --peak-tflops, else the dense tensor-core peak of the GPU named by
torch.cuda.get_device_name() in the training dtype (PEAK_TFLOPS below, from NVIDIA's datasheets),
else none (and none on a CPU without --peak-tflops).

SIGTERM (as `timeout` sends) during the timed steps ends them early: the figures of the steps done
are printed, with "cut": true. Exit status 3 when it arrives during the warm-up.

Prints one JSON line: mode, device, img_per_s, ms_per_step, mfu, tflops, flops_per_image,
peak_mem_gb (GiB, CUDA), compile_s, params, torch, ...
"""
import argparse
import copy
import gzip
import json
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

# difftrain's defaults (include/difftrain/config.h), for configs that leave keys out.
DEFAULTS = {
    "model": dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=1,
                  down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                  up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], attention_head_dim=None,
                  add_attention=True, norm_num_groups=8, norm_eps=1e-5, dropout=0.0, flip_sin_to_cos=True, freq_shift=0,
                  resnet_time_scale_shift="default", num_class_embeds=None),
    "diffusion": dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon", variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                      timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False, snr_gamma=None),
    "data": dict(dataset="idx", path="", split="train", resolution=28, channels=1, random_flip=False),
    "train": dict(batch_size=64, gradient_accumulation_steps=1, max_steps=1600, learning_rate=1e-3, lr_schedule="cosine",
                  lr_warmup_steps=100, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                  max_grad_norm=1.0, mixed_precision="auto", class_dropout_prob=0.1),
    "ema": dict(enabled=True, decay=0.999, min_decay=0.0, update_after_step=0, use_ema_warmup=True, inv_gamma=1.0,
                power=0.75, update_every=1),
    "run": dict(name="run", seed=0),
}


def load_config(path, overrides):
    with open(path) as f:
        raw = json.load(f)
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in raw.items():
        cfg.setdefault(section, {}).update(values)
    for item in overrides:  # --set key.path=value, the value as JSON when it parses (as difftrain's --set)
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            sys.exit(f"--set {item}: expected section.key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        section, name = key.split(".", 1)
        cfg.setdefault(section, {})[name] = value
    return cfg


def build_unet(model_cfg):
    from diffusers import UNet2DModel
    import inspect
    allowed = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(model_cfg) - allowed)
    if unknown:
        sys.exit(f"model.{unknown[0]}: not a UNet2DModel argument")
    kw = dict(model_cfg)
    if kw.get("num_class_embeds") is not None:
        kw["num_class_embeds"] += 1  # difftrain's K classes + the learned null class
    return UNet2DModel(**kw)


def lr_lambda(schedule, warmup, total):  # src/optim.cpp lr_lambda (diffusers get_scheduler's shapes)
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine, num_cycles 0.5
    return f


class ForeachEMA:
    """diffusers.training_utils.EMAModel(foreach=True): get_decay and the _foreach_sub_ update."""

    def __init__(self, params, cfg):
        self.shadow = [p.detach().clone() for p in params]
        self.cfg = cfg
        self.optimization_step = 0

    def get_decay(self, optimization_step):
        c = self.cfg
        step = max(0, optimization_step - c["update_after_step"] - 1)
        if step <= 0:
            return 0.0
        d = 1 - (1 + step / c["inv_gamma"]) ** -c["power"] if c["use_ema_warmup"] else (1 + step) / (10 + step)
        return max(min(d, c["decay"]), c["min_decay"])

    @torch.no_grad()
    def step(self, params):
        self.optimization_step += 1
        if self.optimization_step % self.cfg["update_every"] != 0:
            return
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        torch._foreach_sub_(self.shadow, torch._foreach_sub(self.shadow, params), alpha=one_minus_decay)


def read_real_data(data_cfg, device):
    """The config's IDX or CIFAR-10 training split as a (N, C, H, W) float tensor in [-1, 1] on the device."""
    import numpy as np
    root, kind = data_cfg["path"], data_cfg["dataset"]
    if kind == "idx":
        def first(*names):
            for n in names:
                if os.path.exists(os.path.join(root, n)):
                    return os.path.join(root, n)
            sys.exit(f"data.path {root}: none of {names}")
        path = first("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
        raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
        n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
        pixels = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 1, h, w)
    elif kind == "cifar10":
        parts = [np.fromfile(os.path.join(root, f"data_batch_{i}.bin"), dtype=np.uint8).reshape(-1, 3073) for i in range(1, 6)]
        pixels = np.concatenate(parts)[:, 1:].reshape(-1, 3, 32, 32)
    else:
        sys.exit(f"--data real: data.dataset {kind} is not supported here (idx, cifar10); use --data synthetic")
    x = torch.from_numpy(pixels.copy()).to(device).float()
    res = data_cfg["resolution"]
    if x.shape[-1] != res or x.shape[-2] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=res < x.shape[-1], align_corners=False)
    return (x / 127.5 - 1.0).clamp_(-1, 1).contiguous()


# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s of one GPU, by the training dtype: NVIDIA's
# datasheets list the sparse figure for the tensor-core dtypes; dense is half of it.
#   H100 / H200 SXM: "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core GPU" datasheets:
#     BF16/FP16 1,979 (sparse) -> 989.4, TF32 989 (sparse) -> 494.7, FP32 67 (66.9)
#   H100 NVL / H200 NVL: BF16/FP16 1,671 -> 835.5, TF32 835 -> 417.5, FP32 60
#   H100 PCIe: BF16/FP16 1,513 -> 756.5, TF32 756 -> 378, FP32 51.2
#   A100 (SXM and PCIe): BF16/FP16 312 dense, TF32 156, FP32 19.5 ("NVIDIA A100 Tensor Core GPU")
# The first entry whose words all occur in torch.cuda.get_device_name() wins (NVL before SXM).
PEAK_TFLOPS = [
    (("H200", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100", "PCIe"), {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (("H200",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("H100",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops_of(device_name, dtype_key):
    for words, peaks in PEAK_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return peaks[dtype_key]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune", "auto"], default=None,
                    help="torch.compile the UNet module in this mode (auto: reduce-overhead on CUDA under 10M "
                         "parameters, else default); default none (eager)")
    ap.add_argument("--mode", choices=["eager", "compile"], default=None, help="old spelling: compile = --compile default")
    ap.add_argument("--compile-mode", default=None, help="old spelling, with --mode compile")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only, for checks)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, cuDNN)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = all cores (as difftrain's run.num_threads)")
    ap.add_argument("--precision", choices=["config", "fp32", "bf16", "fp16"], default="config",
                    help="config: train.mixed_precision on CUDA, fp32 on the CPU")
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last (NHWC) memory")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--allow-tf32", action="store_true",
                    help="TF32 matmuls (torch.backends.cuda.matmul.allow_tf32; cuDNN convolutions use TF32 by "
                         "PyTorch's default anyway); the MFU peak becomes the TF32 one in fp32")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for the MFU (default: looked up by the GPU's name and the dtype; none on a CPU)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and MFU)")
    ap.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    ap.add_argument("--expect-params", type=int, default=None, help="fail unless the model has this many parameters")
    ap.add_argument("--profile", metavar="FILE", default=None,
                    help="trace the timed steps with torch.profiler into FILE (Chrome trace; sum it with profile_ops.py)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    compile_mode = args.compile
    if compile_mode is None:
        compile_mode = (args.compile_mode or "default") if args.mode == "compile" else "none"
    elif args.mode == "eager" and compile_mode != "none":
        sys.exit("--mode eager contradicts --compile " + compile_mode)

    # SIGTERM (timeout's signal) ends the timed steps early; the figures so far are printed.
    stop = {"term": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))

    cfg = load_config(args.config, args.set)
    mc, dc, tc, ec, data_cfg = cfg["model"], cfg["diffusion"], cfg["train"], cfg["ema"], cfg["data"]
    if tc.get("gradient_accumulation_steps", 1) != 1:
        sys.exit("train.gradient_accumulation_steps != 1 is not modelled here")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads if args.threads > 0 else os.cpu_count())
    torch.manual_seed(cfg["run"].get("seed", 0))
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    precision = args.precision
    if precision == "config":
        # auto: bf16 on GPUs with bf16 tensor cores (compute capability 8.0+), as difftrain resolves it
        auto = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
        precision = {"no": "fp32", "auto": auto, "bf16": "bf16", "fp16": "fp16"}[tc["mixed_precision"]] if device.type == "cuda" else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    from diffusers import DDPMScheduler, __version__ as diffusers_version
    model = build_unet(mc).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    if args.expect_params is not None and n_params != args.expect_params:
        sys.exit(f"parameter count {n_params} != expected {args.expect_params}: the models differ")
    if compile_mode == "auto":  # launch-bound small models gain most from CUDA graphs
        compile_mode = "reduce-overhead" if device.type == "cuda" and n_params < 10_000_000 else "default"
    scheduler = DDPMScheduler(**{k: v for k, v in dc.items() if k != "snr_gamma"})
    T = scheduler.config.num_train_timesteps
    acp = scheduler.alphas_cumprod.to(device)
    snr_gamma = dc.get("snr_gamma")

    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(  # fused: one kernel for all tensors (CUDA and CPU)
        [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc["learning_rate"], betas=(tc["adam_beta1"], tc["adam_beta2"]), eps=tc["adam_epsilon"], fused=True)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc["lr_schedule"], tc["lr_warmup_steps"], tc["max_steps"]))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ema = ForeachEMA(params, ec) if ec.get("enabled", True) else None
    compiled = compile_mode != "none"
    forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode,
                            backend=args.compile_backend) if compiled else model
    # CUDA graphs (reduce-overhead, max-autotune): each step starts a new generation of graph outputs.
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None

    B = args.batch_size or tc["batch_size"]
    C, R = mc["in_channels"], mc["sample_size"]
    K = mc.get("num_class_embeds")
    if args.data == "real":
        dataset = read_real_data(data_cfg, device)  # (N, C, H, W)
        pool = None
    else:  # 8 distinct batches of (B, C, H, W)
        pool = [(torch.rand(B, C, R, R, device=device) * 2 - 1).contiguous(memory_format=memory_format) for _ in range(8)]
    flip = bool(data_cfg.get("random_flip")) and args.data == "real"
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device)

    def batch(i):
        if pool is not None:
            return pool[i % len(pool)]
        idx = torch.randint(dataset.shape[0], (B,), device=device)
        x = dataset.index_select(0, idx)
        if flip:
            x = torch.where(torch.rand(B, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        return x.contiguous(memory_format=memory_format)

    def loss_of(i, net):  # the forward half of the step: data, noise, UNet, loss
        x0 = batch(i)                                                    # (B, C, H, W) in [-1, 1]
        noise = torch.randn_like(x0)                                     # ε ~ N(0, I)
        t = torch.randint(0, T, (B,), device=device)                     # t ~ U{0..T-1}
        labels = None
        if K is not None:                                                # null class K with p = class_dropout_prob
            labels = torch.randint(0, K, (B,), device=device)
            labels = torch.where(torch.rand(B, device=device) < tc["class_dropout_prob"], K, labels)
        x_t = scheduler.add_noise(x0, noise, t)                          # Ho et al. eq. 4
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net(x_t, t, class_labels=labels, return_dict=False)[0]
        if dc["prediction_type"] == "epsilon":
            target = noise
        elif dc["prediction_type"] == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        if snr_gamma is None:
            return F.mse_loss(out.float(), target.float())
        snr = acp[t] / (1 - acp[t])                                      # min-SNR-γ (Hang et al. 2023)
        w = snr.clamp(max=snr_gamma)
        w = w / snr if dc["prediction_type"] == "epsilon" else w / (snr + 1) if dc["prediction_type"] == "v_prediction" else w
        return ((out.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()

    def train_step(i):
        if mark_step:
            mark_step()
        loss = loss_of(i, forward)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        if tc["max_grad_norm"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"], foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if scaler:
            scaler.step(optimizer)  # reads found_inf on the host: fp16 syncs here, as torch.amp does
            scaler.update()
        else:
            optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=False)
        if ema:
            ema.step(params)
        loss_sum.add_(loss.detach())
        norm_sum.add_(norm.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # FLOPs of one forward + backward, on the eager model (the compiled one computes the same).
    flops_per_image = None
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            loss_of(0, model).backward()
        flops_per_image = counter.get_total_flops() / B
        for p in params:
            p.grad = None
        sync()
    dtype_key = {"fp32": "tf32" if args.allow_tf32 else "fp32", "bf16": "bf16", "fp16": "fp16"}[precision]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops
    peak_source = "--peak-tflops" if peak else None
    if peak is None and device.type == "cuda":
        peak = peak_tflops_of(device_name, dtype_key)
        peak_source = f"{device_name}, {dtype_key} dense, datasheet" if peak else None

    w0 = time.perf_counter()
    first_step_s = None
    for i in range(args.warmup):
        train_step(i)
        if i == 0:
            sync()
            first_step_s = time.perf_counter() - w0
        if stop["term"]:
            print(f"SIGTERM during warm-up step {i + 1}/{args.warmup}: no timed steps", file=sys.stderr, flush=True)
            sys.exit(3)
    sync()
    warmup_s = time.perf_counter() - w0
    loss_sum.zero_()
    norm_sum.zero_()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        ev_start, ev_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    profiler = None
    if args.profile:
        from torch.profiler import profile, ProfilerActivity
        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
        profiler.__enter__()
    start = time.perf_counter()
    if device.type == "cuda":
        ev_start.record()
    done = 0
    for i in range(args.warmup, args.warmup + args.steps):
        train_step(i)
        done += 1
        if stop["term"]:
            break
    if device.type == "cuda":
        ev_end.record()
    sync()
    wall_s = time.perf_counter() - start
    secs = ev_start.elapsed_time(ev_end) / 1000 if device.type == "cuda" else wall_s
    if profiler:
        profiler.__exit__(None, None, None)
        profiler.export_chrome_trace(args.profile)
    mean_loss = loss_sum.item() / done  # the one host read of the timed steps
    img_per_s = done * B / secs
    tflops = flops_per_image * img_per_s / 1e12 if flops_per_image else None
    mode_name = "eager" if not compiled else f"compile({compile_mode})"
    if compiled and args.compile_backend != "inductor":
        mode_name += f"[{args.compile_backend}]"
    print(json.dumps({
        "impl": "pytorch", "mode": mode_name, "compile": compile_mode, "compiled": "unet" if compiled else None,
        "device": args.device, "device_name": device_name, "config": os.path.basename(args.config), "batch_size": B,
        "img_per_s": round(img_per_s, 2), "ms_per_step": round(secs * 1000 / done, 3),
        "wall_ms_per_step": round(wall_s * 1000 / done, 3),
        "flops_per_image": flops_per_image, "tflops": round(tflops, 3) if tflops is not None else None,
        "peak_tflops": peak, "peak_source": peak_source,
        "mfu": round(tflops / peak, 5) if tflops is not None and peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "params": n_params, "precision": precision, "channels_last": args.channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "data": args.data, "steps": done, "warmup": args.warmup, "cut": done < args.steps,
        "first_step_s": round(first_step_s, 2) if first_step_s is not None else None,
        "warmup_s": round(warmup_s, 2),
        # what the warm-up cost beyond as many steady steps: compilation (and CUDA graph capture) when compiled
        "compile_s": round(max(0.0, warmup_s - args.warmup * secs / done), 2) if compiled else None,
        "threads": torch.get_num_threads(), "loss": round(mean_loss, 5),
        "grad_norm": round(norm_sum.item() / done, 4), "torch": torch.__version__,
        "diffusers": diffusers_version,
    }), flush=True)


if __name__ == "__main__":
    main()

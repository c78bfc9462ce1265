// Typed run configuration: every section is a struct whose fields carry their defaults, and
// whose visit() is the schema (key, meaning, allowed values). JSON reading, writing, --set
// overrides, range checks and docs/CONFIG.md are all generated from visit(), so they cannot drift.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "difftrain/enums.h"
#include "difftrain/errors.h"

namespace difftrain {

// ---------------------------------------------------------------------------------------------
// What a field allows, beyond its type. Numeric bounds apply to numbers and to list elements.
struct Allowed {
  std::optional<double> min;     // inclusive unless min_open
  bool min_open = false;
  std::optional<double> max;     // inclusive unless max_open
  bool max_open = false;
  bool non_empty = false;        // strings and lists
  std::string_view note = {};    // free-form rule checked in validate(), shown in the docs
};

// ---------------------------------------------------------------------------------------------
// Sections. Each field: default, then a visit() line with its key, meaning and units.

struct RunConfig {
  std::string name = "quickstart";
  std::string output_dir = "runs";
  int64_t seed = 0;
  std::string device = "auto";
  int num_threads = 0;
  double peak_tflops = 0.0;

  template <class V> void visit(V& v) {
    v("name", name, "Run name; the run directory is `<output_dir>/<name>`.",
      {.non_empty = true, .note = "letters, digits, '.', '_', '-'"});
    v("output_dir", output_dir, "Directory that holds run directories.", {.non_empty = true});
    v("seed", seed, "Global seed; per-rank seeds are derived from it.", {.min = 0});
    v("device", device, "Where to train. 'auto' picks CUDA when usable and says so; 'cuda' fails when CUDA is not usable.",
      {.note = "auto | cpu | cuda | cuda:N"});
    v("num_threads", num_threads, "CPU threads for intra-op parallelism; 0 = all cores.", {.min = 0, .max = 4096});
    v("peak_tflops", peak_tflops,
      "Peak dense TFLOP/s of one device in the training dtype, the denominator of train/mfu; 0 = look the GPU up in the "
      "table `difftrain env` prints (no MFU where it is not listed, and none on a CPU). May change on resume.",
      {.min = 0});
  }
  bool operator==(const RunConfig&) const = default;
};

// diffusers UNet2DModel arguments, same names and meanings.
struct ModelConfig {
  int sample_size = 28;
  int in_channels = 1;
  int out_channels = 1;
  std::vector<int> block_out_channels = {32, 64, 64};
  int layers_per_block = 1;
  std::vector<BlockType> down_block_types = {BlockType::DownBlock2D, BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  std::vector<BlockType> up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D, BlockType::UpBlock2D};
  std::optional<int> attention_head_dim = std::nullopt;
  bool add_attention = true;
  int norm_num_groups = 8;
  double norm_eps = 1e-5;
  double dropout = 0.0;
  bool flip_sin_to_cos = true;
  int freq_shift = 0;
  TimeScaleShift resnet_time_scale_shift = TimeScaleShift::default_;
  std::optional<int> num_class_embeds = std::nullopt;

  template <class V> void visit(V& v) {
    v("sample_size", sample_size, "Input height and width in pixels.", {.min = 1});
    v("in_channels", in_channels, "Channels of the input image.", {.min = 1});
    v("out_channels", out_channels, "Channels of the model output.", {.min = 1});
    v("block_out_channels", block_out_channels, "Output channels of each resolution level, highest resolution first.",
      {.min = 1, .non_empty = true});
    v("layers_per_block", layers_per_block, "ResNet blocks per down block (up blocks get one more).", {.min = 1, .max = 16});
    v("down_block_types", down_block_types, "One per level, highest resolution first.", {.non_empty = true,
      .note = "DownBlock2D | AttnDownBlock2D"});
    v("up_block_types", up_block_types, "One per level, lowest resolution first.", {.non_empty = true,
      .note = "UpBlock2D | AttnUpBlock2D"});
    v("attention_head_dim", attention_head_dim, "Channels per attention head; null = one head over all channels.",
      {.min = 1});
    v("add_attention", add_attention, "Self-attention in the mid block.");
    v("norm_num_groups", norm_num_groups, "GroupNorm groups; divides every block's channels.", {.min = 1});
    v("norm_eps", norm_eps, "GroupNorm epsilon.", {.min = 0, .min_open = true, .max = 1});
    v("dropout", dropout, "Dropout probability inside ResNet blocks.", {.min = 0, .max = 1, .max_open = true});
    v("flip_sin_to_cos", flip_sin_to_cos, "Timestep embedding order: cos first when true (diffusers default).");
    v("freq_shift", freq_shift, "Timestep embedding frequency shift (downscale_freq_shift).", {.min = 0, .max = 1});
    v("resnet_time_scale_shift", resnet_time_scale_shift,
      "How the time embedding enters ResNet blocks: added ('default') or as FiLM scale and shift.");
    v("num_class_embeds", num_class_embeds,
      "Classes for class conditioning (a learned null class is added for guidance); null = unconditional.", {.min = 1});
  }
  bool operator==(const ModelConfig&) const = default;
};

// diffusers DDPMScheduler arguments plus the loss weighting.
struct DiffusionConfig {
  Formulation formulation = Formulation::ddpm;
  int num_train_timesteps = 1000;
  double beta_start = 1e-4;
  double beta_end = 0.02;
  BetaSchedule beta_schedule = BetaSchedule::linear;
  PredictionType prediction_type = PredictionType::epsilon;
  VarianceType variance_type = VarianceType::fixed_small;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  TimestepSpacing timestep_spacing = TimestepSpacing::leading;
  int steps_offset = 0;
  bool rescale_betas_zero_snr = false;
  std::optional<double> snr_gamma = std::nullopt;
  // EDM (Karras et al. 2022, Table 1, "Ours")
  double sigma_min = 0.002;
  double sigma_max = 80.0;
  double sigma_data = 0.5;
  double rho = 7.0;
  double p_mean = -1.2;
  double p_std = 1.2;

  template <class V> void visit(V& v) {
    v("formulation", formulation,
      "ddpm: the discrete-time DDPM of Ho et al. 2020 (diffusers' DDPMScheduler; the keys up to snr_gamma); edm: the "
      "preconditioned denoiser, σ sampling and loss of Karras et al. 2022 (EDM; the sigma_* to p_std keys).");
    v("num_train_timesteps", num_train_timesteps, "Diffusion steps T.", {.min = 1, .max = 100000});
    v("beta_start", beta_start, "β at t = 0.", {.min = 0, .min_open = true, .max = 1, .max_open = true});
    v("beta_end", beta_end, "β at t = T-1.", {.min = 0, .min_open = true, .max = 1, .max_open = true});
    v("beta_schedule", beta_schedule, "How β grows from beta_start to beta_end (squaredcos_cap_v2: Nichol & Dhariwal cosine).");
    v("prediction_type", prediction_type, "What the model predicts: noise ε, velocity v, or the clean sample x₀.");
    v("variance_type", variance_type, "Reverse-process variance: β̃ₜ (small) or βₜ (large), Ho et al. §3.2.");
    v("clip_sample", clip_sample, "Clip the predicted x₀ to ±clip_sample_range while sampling.");
    v("clip_sample_range", clip_sample_range, "Bound for clip_sample.", {.min = 0, .min_open = true});
    v("timestep_spacing", timestep_spacing, "How inference timesteps are spread (Lin et al. 2023, Table 2).");
    v("steps_offset", steps_offset, "Added to every 'leading' inference timestep (Stable Diffusion uses 1).", {.min = 0, .max = 1000});
    v("rescale_betas_zero_snr", rescale_betas_zero_snr, "Rescale β to zero terminal SNR (Lin et al. 2023, Alg. 1).");
    v("snr_gamma", snr_gamma, "Min-SNR-γ loss weighting (Hang et al. 2023); null = plain MSE.", {.min = 0, .min_open = true});
    v("sigma_min", sigma_min, "EDM: the lowest noise level σ of the sampling schedule.", {.min = 0, .min_open = true});
    v("sigma_max", sigma_max, "EDM: the highest noise level σ; sampling starts from N(0, σ_max² I).",
      {.min = 0, .min_open = true, .max = 1e6});
    v("sigma_data", sigma_data, "EDM: the standard deviation of the data (in [-1, 1] units) the preconditioning assumes.",
      {.min = 0, .min_open = true});
    v("rho", rho, "EDM: ρ of the sampling schedule σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ (eq. 5).",
      {.min = 0, .min_open = true, .max = 100});
    v("p_mean", p_mean, "EDM: mean of ln σ while training, ln σ ~ N(p_mean, p_std²).", {.min = -20, .max = 20});
    v("p_std", p_std, "EDM: standard deviation of ln σ while training.", {.min = 0, .min_open = true, .max = 20});
  }
  bool operator==(const DiffusionConfig&) const = default;
};

struct DataConfig {
  DatasetKind dataset = DatasetKind::idx;
  std::string path = "/usr/share/datasets/fashion-mnist";
  Split split = Split::train;
  int resolution = 28;
  int channels = 1;
  ResizeMode resize = ResizeMode::bilinear;
  CropMode crop = CropMode::center;
  bool random_flip = false;
  bool allow_upscale = true;
  bool jpeg_dct_scaling = true;
  BadImagePolicy on_bad_image = BadImagePolicy::fail;
  int64_t subset = 0;
  std::vector<int> class_filter = {};
  int num_workers = 2;
  int prefetch = 4;
  bool preload = false;
  int64_t shuffle_buffer = 1000;
  std::string label_field = "";
  int64_t shard_streams = 0;

  template <class V> void visit(V& v) {
    v("dataset", dataset,
      "Reader: IDX (MNIST format, gzip or raw), CIFAR-10 binary batches, a folder of PNG/JPEG, or WebDataset tar shards.");
    v("path", path,
      "Dataset directory; for webdataset a directory of .tar shards, a brace pattern (train-{000000..000127}.tar) or a "
      "file listing shards.",
      {.non_empty = true});
    v("split", split, "Which split of an IDX or CIFAR-10 dataset to read.");
    v("resolution", resolution, "Training resolution in pixels (square).", {.min = 1, .max = 4096});
    v("channels", channels, "Channels after conversion: 1 (grayscale) or 3 (RGB).", {.note = "1 | 3"});
    v("resize", resize, "Resampling used to reach the resolution before cropping.");
    v("crop", crop, "Crop to a square: center, or random per sample.");
    v("random_flip", random_flip, "Random horizontal flip.");
    v("allow_upscale", allow_upscale, "Allow images smaller than the resolution to be scaled up (else an error).");
    v("jpeg_dct_scaling", jpeg_dct_scaling,
      "Decode a large JPEG at the smallest DCT-domain scale n/8 (libjpeg-turbo) whose shorter side is still >= the "
      "resolution, then resize as usual: several times faster; false = decode at full size (PIL's pixels without draft).");
    v("on_bad_image", on_bad_image,
      "Bad files in an image folder (all checked at start: empty, not PNG/JPEG, truncated, too "
      "small without allow_upscale; or failing to decode later), or in webdataset shards (a damaged tar: read up to the "
      "damage; an undecodable image): stop with an error naming them, or leave them out and log them.");
    v("subset", subset, "Use only the first N items; 0 = all.", {.min = 0});
    v("class_filter", class_filter, "Keep only these labels; empty = all.", {.min = 0});
    v("num_workers", num_workers, "Decode/augment threads.", {.min = 0, .max = 256});
    v("prefetch", prefetch, "Batches queued ahead per worker.", {.min = 1, .max = 1024});
    v("preload", preload, "Keep the whole dataset on the device as uint8, resized and center-cropped once; flip and "
      "normalise there.");
    v("shuffle_buffer", shuffle_buffer,
      "webdataset: samples in the shuffle buffer through which each epoch streams its shards (in an order of seed and "
      "epoch); 1 = shard order.",
      {.min = 1, .max = 10'000'000});
    v("label_field", label_field,
      "webdataset: take labels from this integer field of each sample's .json; empty = from its .cls.");
    v("shard_streams", shard_streams,
      "webdataset: 0 = deal samples to the ranks (every rank reads every shard); V > 0 = deal each epoch's shards to V "
      "streams, each rank reading only its V/world_size streams' shards (the world size must divide V; each stream is cut "
      "to the shortest a stream can get, so with unequal shards or V not dividing their number some samples wait for "
      "another epoch).",
      {.min = 0, .max = 1'000'000});
  }
  bool operator==(const DataConfig&) const = default;
};

struct TrainConfig {
  int batch_size = 64;
  int gradient_accumulation_steps = 1;
  int64_t max_steps = 1600;
  double learning_rate = 1e-3;
  LrSchedule lr_schedule = LrSchedule::cosine;
  int64_t lr_warmup_steps = 100;
  LrScaling scale_lr = LrScaling::none;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  MixedPrecision mixed_precision = MixedPrecision::auto_;
  double class_dropout_prob = 0.1;
  int max_nonfinite_steps = 10;
  OptimizerImpl optimizer_impl = OptimizerImpl::auto_;
  // How the step is executed, not what it computes: these may change on resume.
  bool cuda_graph = false;
  bool channels_last = false;
  bool fused_groupnorm_silu = false;
  bool cudnn_benchmark = false;
  bool allow_tf32 = false;

  template <class V> void visit(V& v) {
    v("batch_size", batch_size, "Images per micro-batch on each rank.", {.min = 1});
    v("gradient_accumulation_steps", gradient_accumulation_steps, "Micro-batches per optimizer step.", {.min = 1});
    v("max_steps", max_steps, "Optimizer steps to train.", {.min = 1});
    v("learning_rate", learning_rate, "Peak learning rate (after warmup and scale_lr).", {.min = 0, .min_open = true});
    v("lr_schedule", lr_schedule, "Learning-rate decay after warmup.");
    v("lr_warmup_steps", lr_warmup_steps,
      "Linear warmup steps from 0 to learning_rate. Left at its default, it is capped at "
      "max_steps; set above max_steps, the learning rate never reaches its peak (a warning).",
      {.min = 0});
    v("scale_lr", scale_lr, "Scale learning_rate by the effective batch / batch_size: not at all, linearly, or by its square root.");
    v("adam_beta1", adam_beta1, "AdamW β₁.", {.min = 0, .max = 1, .max_open = true});
    v("adam_beta2", adam_beta2, "AdamW β₂.", {.min = 0, .max = 1, .max_open = true});
    v("adam_epsilon", adam_epsilon, "AdamW ε.", {.min = 0, .min_open = true});
    v("weight_decay", weight_decay, "Decoupled weight decay (not applied to biases and norms).", {.min = 0});
    v("max_grad_norm", max_grad_norm, "Clip the global gradient L2 norm to this; 0 = no clipping.", {.min = 0});
    v("mixed_precision", mixed_precision,
      "Autocast dtype: no (fp32), bf16 (on a CPU: with AVX512-BF16 or AMX and LibTorch's AVX-512 "
      "kernels), fp16 with dynamic loss scaling (CUDA only), or auto: bf16 where the hardware has it "
      "natively (GPUs of compute capability 8.0+, CPUs as for bf16), fp32 elsewhere; the log says "
      "which and why.");
    v("class_dropout_prob", class_dropout_prob, "Probability of training on the null class (classifier-free guidance).",
      {.min = 0, .max = 1});
    v("max_nonfinite_steps", max_nonfinite_steps, "Stop after this many non-finite losses or gradients in a row (each such "
      "step is skipped).", {.min = 1});
    v("optimizer_impl", optimizer_impl, "AdamW kernels: fused (one kernel for all tensors), foreach (multi-tensor ops) or a "
      "per-tensor loop; auto = fused. All three compute the same update.");
    v("cuda_graph", cuda_graph,
      "CUDA only: capture the micro-step (forward + backward) and the optimizer step (unscale, clip, AdamW, EMA) as two "
      "CUDA graphs after 3 eager warm-up steps and replay them, the all-reduce between them; removes the per-op launch "
      "cost. The same numbers as eager steps. Off until the GPU benchmark (docs/PERFORMANCE.md) decides.");
    v("channels_last", channels_last,
      "Keep the model and its inputs in channels-last (NHWC) memory, as cuDNN's tensor-core convolutions prefer. Off until "
      "the GPU benchmark decides.");
    v("fused_groupnorm_silu", fused_groupnorm_silu,
      "Each GroupNorm followed by SiLU (the ResNet blocks' norm1, norm2 except under scale_shift, and conv_norm_out) as one "
      "op: CUDA kernels that read bf16 or fp32 and accumulate in fp32, NCHW or channels-last; on a CPU the same arithmetic "
      "in ATen ops. The same function and parameters. Off until the GPU benchmark decides.");
    v("cudnn_benchmark", cudnn_benchmark,
      "CUDA only: let cuDNN time its convolution algorithms on the first step of each shape and keep the fastest "
      "(torch.backends.cudnn.benchmark). Off until the GPU benchmark decides.");
    v("allow_tf32", allow_tf32,
      "CUDA only: float32 matmuls and convolutions on tensor cores in TF32 (10-bit mantissa); matters for mixed_precision = "
      "no. Off: full float32, as PyTorch's default for matmuls.");
  }
  bool operator==(const TrainConfig&) const = default;
};

// diffusers EMAModel arguments, same names and meanings.
struct EmaConfig {
  bool enabled = true;
  double decay = 0.999;
  double min_decay = 0.0;
  int64_t update_after_step = 0;
  bool use_ema_warmup = true;
  double inv_gamma = 1.0;
  double power = 0.75;
  int update_every = 1;

  template <class V> void visit(V& v) {
    v("enabled", enabled, "Keep an exponential moving average of the weights.");
    v("decay", decay, "Maximum EMA decay.", {.min = 0, .max = 1, .max_open = true});
    v("min_decay", min_decay, "Minimum EMA decay.", {.min = 0, .max = 1, .max_open = true});
    v("update_after_step", update_after_step, "Start averaging after this many optimizer steps.", {.min = 0});
    v("use_ema_warmup", use_ema_warmup,
      "Warm the decay up as 1 - (1 + step/inv_gamma)^-power; otherwise (1 + step)/(10 + step).");
    v("inv_gamma", inv_gamma, "Warmup inverse multiplicative factor.", {.min = 0, .min_open = true});
    v("power", power, "Warmup exponential factor (2/3 suits long runs, 3/4 short ones).", {.min = 0, .min_open = true});
    v("update_every", update_every, "Update the EMA every N optimizer steps.", {.min = 1});
  }
  bool operator==(const EmaConfig&) const = default;
};

struct LoggingConfig {
  LogLevel level = LogLevel::info;
  int64_t log_every = 50;
  int64_t sample_every = 400;
  int64_t histogram_every = 0;
  bool tensorboard = true;
  bool jsonl = true;
  bool progress = true;
  bool prometheus = false;
  int64_t profile_start = 0;
  int64_t profile_steps = 5;

  template <class V> void visit(V& v) {
    v("level", level, "Console and train.log level on rank 0 (other ranks log warnings and errors).");
    v("log_every", log_every, "Steps between scalar logs (the only host syncs of the loop).", {.min = 1});
    v("sample_every", sample_every, "Steps between sample grids; 0 = never.", {.min = 0});
    v("histogram_every", histogram_every, "Steps between weight/gradient histograms; 0 = never.", {.min = 0});
    v("tensorboard", tensorboard, "Write TensorBoard event files.");
    v("jsonl", jsonl, "Write metrics.jsonl.");
    v("progress", progress, "Live progress line on an interactive console.");
    v("prometheus", prometheus, "Write metrics.prom for node_exporter's textfile collector.");
    v("profile_start", profile_start,
      "Trace steps profile_start .. profile_start + profile_steps - 1 with LibTorch's "
      "profiler into profile/ (Chrome trace JSON, as torch.profiler writes it; rank 0); 0 = never.",
      {.min = 0});
    v("profile_steps", profile_steps, "Steps in the profiler trace.", {.min = 1, .max = 1000});
  }
  bool operator==(const LoggingConfig&) const = default;
};

struct CheckpointConfig {
  int64_t every = 400;
  int keep_last = 3;
  int64_t keep_every = 0;
  std::string resume = "";

  template <class V> void visit(V& v) {
    v("every", every, "Steps between checkpoints.", {.min = 1});
    v("keep_last", keep_last, "Rotating checkpoints kept.", {.min = 1});
    v("keep_every", keep_every, "Also keep every checkpoint whose step is a multiple of this; 0 = none.", {.min = 0});
    v("resume", resume, "Resume from a checkpoint: '' = start fresh, 'latest' = newest good one in the run, or a path.",
      {.note = "'' | latest | PATH"});
  }
  bool operator==(const CheckpointConfig&) const = default;
};

struct DistributedConfig {
  DistBackend backend = DistBackend::auto_;
  int timeout_s = 600;
  int bucket_size_mb = 25;

  template <class V> void visit(V& v) {
    v("backend", backend, "c10d backend; auto = NCCL on CUDA, Gloo on CPU.");
    v("timeout_s", timeout_s, "Collective timeout: a dead or hung peer fails every rank after this long.", {.min = 1});
    v("bucket_size_mb", bucket_size_mb, "Gradient all-reduce bucket size in MiB.", {.min = 1, .max = 4096});
  }
  bool operator==(const DistributedConfig&) const = default;
};

struct SamplingConfig {
  Sampler sampler = Sampler::unipc_multistep;
  int num_inference_steps = 25;
  double eta = 0.0;
  int solver_order = 2;
  bool use_karras_sigmas = false;
  int num_samples = 64;
  int batch_size = 125;
  double guidance_scale = 1.0;
  bool use_ema = true;
  int64_t seed = 0;
  int num_final_samples = 1000;
  double s_churn = 0.0;
  double s_tmin = 0.0;
  std::optional<double> s_tmax = std::nullopt;
  double s_noise = 1.0;

  template <class V> void visit(V& v) {
    v("sampler", sampler,
      "Sampler for grids and `difftrain sample`. DDPM models, as diffusers names its scheduler: DDPMScheduler, "
      "DDIMScheduler, DPMSolverMultistepScheduler (DPM-Solver++), UniPCMultistepScheduler, EulerAncestralDiscreteScheduler. "
      "EDM models: heun (Karras et al. 2022, Algorithm 1; Algorithm 2 with s_churn > 0) or euler (diffusers' "
      "EDMEulerScheduler). With diffusion.formulation = edm and no sampler given, heun.");
    v("num_inference_steps", num_inference_steps,
      "Denoising steps; a network evaluation each, but heun's 2N - 1 (18 steps: 35 evaluations).", {.min = 1});
    v("eta", eta, "DDIM η: 0 = deterministic, 1 = DDPM-like variance.", {.min = 0, .max = 1});
    v("solver_order", solver_order,
      "Order of dpm_solver_multistep and unipc_multistep (diffusers' solver_order); 2 for "
      "unconditional and class-guided sampling, 3 for unguided sampling with few steps.",
      {.min = 1, .max = 3});
    v("use_karras_sigmas", use_karras_sigmas,
      "dpm_solver_multistep and unipc_multistep: step through the σ schedule of "
      "Karras et al. 2022 (eq. 5, ρ = 7) instead of the timestep spacing.",
      {.note = "only with those two samplers"});
    v("num_samples", num_samples, "Images per grid.", {.min = 1, .max = 4096});
    v("batch_size", batch_size, "Images generated at once.", {.min = 1});
    v("guidance_scale", guidance_scale, "Classifier-free guidance scale; 1 = no guidance.", {.min = 0});
    v("use_ema", use_ema, "Sample with the EMA weights.");
    v("seed", seed, "Seed of the sampling noise (grids are comparable across steps).", {.min = 0});
    v("num_final_samples", num_final_samples, "Images written one PNG each to samples/final/ when training ends (for "
      "scoring); 0 = none.", {.min = 0, .max = 1000000});
    v("s_churn", s_churn,
      "heun / euler: S_churn of Karras et al. Algorithm 2, the noise added back per step "
      "(γ = min(S_churn/N, √2 - 1)); 0 = the deterministic sampler.",
      {.min = 0});
    v("s_tmin", s_tmin, "heun / euler: noise is added back only at σ in [s_tmin, s_tmax].", {.min = 0});
    v("s_tmax", s_tmax, "heun / euler: upper end of that range; null = no bound.", {.min = 0});
    v("s_noise", s_noise, "heun / euler: S_noise, the standard deviation of the noise added back, over √(σ̂² - σ²).",
      {.min = 0, .min_open = true, .max = 2});
  }
  bool operator==(const SamplingConfig&) const = default;
};

// heun and euler sample EDM models (diffusion.formulation = edm); the others DDPM ones.
inline bool is_edm_sampler(Sampler s) { return s == Sampler::heun || s == Sampler::euler; }

struct Config {
  RunConfig run;
  ModelConfig model;
  DiffusionConfig diffusion;
  DataConfig data;
  TrainConfig train;
  EmaConfig ema;
  LoggingConfig logging;
  CheckpointConfig checkpoint;
  DistributedConfig distributed;
  SamplingConfig sampling;

  template <class V> void visit(V& v) {
    v.section("run", run, "Run identity and placement.");
    v.section("model", model, "UNet2D architecture (diffusers UNet2DModel names).");
    v.section("diffusion", diffusion, "Noise schedule and loss (diffusers DDPMScheduler names).");
    v.section("data", data, "Dataset and augmentation.");
    v.section("train", train, "Optimisation.");
    v.section("ema", ema, "Exponential moving average of the weights (diffusers EMAModel names).");
    v.section("logging", logging, "Logs, TensorBoard, metrics.");
    v.section("checkpoint", checkpoint, "Checkpoints and resume.");
    v.section("distributed", distributed, "Data-parallel training over c10d.");
    v.section("sampling", sampling, "Sample grids during training and `difftrain sample` defaults.");
  }
  bool operator==(const Config&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Errors: each message starts with the JSON path it concerns ("model.block_out_channels[2]: ...").
class ConfigError : public UsageError {  // exit code 1
 public:
  explicit ConfigError(std::vector<std::string> messages, std::string context = {});
  const std::vector<std::string>& messages() const { return messages_; }

 private:
  std::vector<std::string> messages_;
};

// Defaults < JSON file < --set overrides ("key.path=value", typed by the field it sets).
// Throws ConfigError listing every problem found; a returned Config has passed validate().
// `notes`, when given, receives what to log: a default adjusted to the run, a value that is valid but doubtful.
Config load_config(const std::string& json_path, const std::vector<std::string>& overrides = {},
                   std::vector<std::string>* notes = nullptr);
Config config_from_json(const nlohmann::ordered_json& j, const std::string& origin = "config",
                        std::vector<std::string>* notes = nullptr);
nlohmann::ordered_json config_to_json(const Config& cfg);  // every key, in declaration order
std::string config_to_string(const Config& cfg);   // pretty JSON, what runs/<name>/config.json holds
void apply_override(nlohmann::ordered_json& doc, const std::string& assignment);

// Value and cross-field checks; returns messages (empty when valid).
std::vector<std::string> validate(const Config& cfg);

// The Markdown reference that docs/CONFIG.md holds.
std::string config_reference_markdown();

// "did you mean" helper, exposed for tests.
size_t edit_distance(std::string_view a, std::string_view b);

}  // namespace difftrain

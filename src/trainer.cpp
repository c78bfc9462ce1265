#include "difftrain/trainer.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include <ATen/Context.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/autograd/autograd.h>
#include <nlohmann/json.hpp>

#include "difftrain/checkpoint.h"
#include "difftrain/distributed.h"
#include "difftrain/errors.h"
#include "difftrain/flops.h"
#include "difftrain/log.h"
#include "difftrain/metrics.h"
#include "difftrain/profiler.h"
#include "difftrain/run.h"
#include "difftrain/sampling.h"
#include "difftrain/signals.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_graph.h"
#include "cuda/cuda_memory.h"
#include "cuda/cuda_probe.h"
#endif

namespace difftrain {

namespace fs = std::filesystem;

at::Tensor diffusion_loss(const at::Tensor& model_output, const at::Tensor& target, const at::Tensor& weights) {
  const auto mse = (model_output.to(at::kFloat) - target.to(at::kFloat)).pow(2).mean({1, 2, 3});  // (B)
  return mse * weights;
}

uint64_t global_batch_seed(uint64_t seed) { return derive_seed(seed, uint64_t{1} << 32); }  // a stream beyond any rank

uint64_t derive_seed(uint64_t seed, uint64_t stream) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (stream + 1);  // splitmix64 (Steele et al. 2014)
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) & ((uint64_t{1} << 63) - 1);  // a non-negative int64, as torch seeds are
}

namespace {

NamedTensors named_parameters(UNet2DModel& m) {
  NamedTensors out;
  for (const auto& item : m->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

void load_named(UNet2DModel& m, const std::map<std::string, at::Tensor>& tensors, const std::string& what) {
  c10::NoGradGuard no_grad;
  for (auto& [name, p] : named_parameters(m)) {
    const auto it = tensors.find(name);
    if (it == tensors.end()) throw CheckpointError(fmt::format("{}: no tensor {}", what, name));
    if (it->second.sizes() != p.sizes())
      throw CheckpointError(fmt::format("{}: {} has shape [{}], the model has [{}]", what, name,
                                        fmt::join(it->second.sizes(), ", "), fmt::join(p.sizes(), ", ")));
    p.copy_(it->second);
  }
}

// The device's default generator (a handle sharing its state).
at::Generator default_generator(const c10::Device& device) { return at::globalContext().defaultGenerator(device); }

at::Tensor generator_state(at::Generator g) {
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_generator_state(at::Generator& g, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

}  // namespace

// On CUDA: device time per step, and with train.cuda_graph the loop's stream and the two graphs.
struct Trainer::CudaState {
#ifdef DIFFTRAIN_WITH_CUDA
  cuda::StepTimer timer;
  std::unique_ptr<cuda::StreamScope> stream;
  std::unique_ptr<cuda::Graph> micro, optimizer;
#endif
  bool graphed = false;     // train.cuda_graph
  bool captured = false;    // replaying from now on
  int64_t eager_steps = 0;  // warm-up steps run so far
};

Trainer::Trainer(const Config& cfg, std::shared_ptr<Dataset> dataset, TrainerOptions opts)
    : cfg_(cfg),
      opts_(std::move(opts)),
      dataset_(std::move(dataset)),
      schedule_(SchedulerConfig::from(cfg.diffusion)),
      generator_(at::globalContext().defaultGenerator(opts_.device).clone()) {
  const auto& tc = cfg_.train;
  if (opts_.process_group) {
    rank_ = opts_.process_group->world().rank, world_size_ = opts_.process_group->world().world_size;
    TORCH_CHECK(opts_.process_group->device() == opts_.device, "the process group communicates on ",
                opts_.process_group->device(), " but training runs on ", opts_.device);
  }
  std::string precision_reason;
  autocast_ = autocast_dtype(tc.mixed_precision, opts_.device, &precision_reason);
  if (tc.mixed_precision == MixedPrecision::auto_ && rank_ == 0) log_info("{}", precision_reason);
  if (tc.cuda_graph && !opts_.device.is_cuda())
    throw UsageError(
        fmt::format("train.cuda_graph = true needs a CUDA device, and this run is on {} (run.device = \"{}\"); "
                    "set train.cuda_graph=false or run on a GPU",
                    opts_.device.str(), cfg_.run.device));
  capturable_ = tc.cuda_graph || opts_.capturable_state;
  if (tc.channels_last) memory_format_ = at::MemoryFormat::ChannelsLast;

  // The same initial weights on every rank: the model is built from the global seed.
  default_generator(c10::Device(c10::kCPU)).set_current_seed(static_cast<uint64_t>(cfg_.run.seed));
  model_ = UNet2DModel(cfg_.model);
  model_->set_fused_groupnorm_silu(tc.fused_groupnorm_silu);
  model_->to(opts_.device);
  model_->set_memory_format(memory_format_);
  model_->train();
  for (auto& [name, p] : named_parameters(model_)) params_.push_back(p);
  // Per-rank streams: dropout (the device's default generator) and t, ε, class dropout (ours).
  const uint64_t rank_seed = derive_seed(static_cast<uint64_t>(cfg_.run.seed), static_cast<uint64_t>(rank_));
  default_generator(opts_.device).set_current_seed(rank_seed);
  if (!opts_.device.is_cpu()) default_generator(c10::Device(c10::kCPU)).set_current_seed(rank_seed);
  // t, ε and class dropout are drawn for the whole global batch from one stream shared by every
  // rank, each rank taking its own rows: the result does not depend on how the batch is split.
  generator_.set_current_seed(global_batch_seed(static_cast<uint64_t>(cfg_.run.seed)));

  if (!opts_.init_weights.empty()) {
    load_named(model_, opts_.init_weights, opts_.init_source);
    log_info("initial weights from {}", opts_.init_source);
  }

  if (cfg_.ema.enabled) {
    ema_model_ = UNet2DModel(cfg_.model);
    ema_model_->set_fused_groupnorm_silu(tc.fused_groupnorm_silu);
    ema_model_->to(opts_.device);
    ema_model_->set_memory_format(memory_format_);
    ema_model_->eval();
    std::vector<at::Tensor> shadow;
    {
      c10::NoGradGuard no_grad;
      size_t i = 0;
      for (auto& p : ema_model_->parameters()) p.requires_grad_(false).copy_(params_[i++]), shadow.push_back(p);
    }
    ema_ = std::make_unique<EMAModel>(std::move(shadow), cfg_.ema, capturable_);
  }

  // scale_lr: the effective batch over the per-rank micro-batch (diffusers' --scale_lr is linear).
  const double batch_ratio = static_cast<double>(tc.gradient_accumulation_steps * world_size_);
  base_lr_ = tc.learning_rate * (tc.scale_lr == LrScaling::linear ? batch_ratio
                                 : tc.scale_lr == LrScaling::sqrt ? std::sqrt(batch_ratio)
                                                                  : 1.0);
  AdamWOptions ao;
  ao.beta1 = tc.adam_beta1, ao.beta2 = tc.adam_beta2, ao.eps = tc.adam_epsilon, ao.weight_decay = tc.weight_decay;
  ao.impl = tc.optimizer_impl;
  optimizer_ = std::make_unique<AdamW>(named_parameters(model_), ao);
  if (capturable_) lr_t_ = at::zeros({}, at::TensorOptions().dtype(optimizer_->lr_dtype()).device(opts_.device));
  if (tc.mixed_precision == MixedPrecision::fp16) scaler_ = std::make_unique<GradScaler>(GradScalerOptions{}, opts_.device);

  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(opts_.device);
  loss_sum_ = at::zeros({}, fopts), grad_norm_sum_ = at::zeros({}, fopts);
  nonfinite_streak_ = at::zeros({}, fopts), max_streak_ = at::zeros({}, fopts), skipped_ = at::zeros({}, fopts);
  quartile_sum_ = at::zeros({4}, fopts), quartile_count_ = at::zeros({4}, fopts);

  // Resume, then the loader from the resumed position.
  const fs::path ckpt_dir = opts_.run_dir / "checkpoints";
  if (rank_ == 0) {
    if (const int n = remove_interrupted_saves(ckpt_dir); n > 0)
      log_warn("removed {} incomplete checkpoint save(s) in {} (a run stopped while saving)", n, ckpt_dir.string());
  }
  std::optional<fs::path> resume_path;
  const auto& resume = cfg_.checkpoint.resume;
  if (resume == "latest" && rank_ == 0) {
    std::vector<std::string> skipped;
    resume_path = find_latest_checkpoint(ckpt_dir, &skipped);
    for (const auto& s : skipped) log_warn("skipping checkpoint {}", s);
    if (!resume_path && !skipped.empty())
      throw CheckpointError(fmt::format("--resume latest: none of the {} checkpoints in {} is usable (see above)", skipped.size(),
                                        ckpt_dir.string()));
    if (!resume_path) log_info("--resume latest: no checkpoint in {} yet; starting from step 0", ckpt_dir.string());
  } else if (!resume.empty() && resume != "latest") {
    resume_path = fs::path(resume);
  } else if (resume.empty() && rank_ == 0) {
    // Training from scratch over a run that has checkpoints would replace them step by step.
    if (const auto existing = list_checkpoints(ckpt_dir); !existing.empty())
      throw UsageError(fmt::format("{} already holds checkpoints (newest: {}); continue it with --resume latest, or start a "
                                   "new run with --set run.name=<new name>. Nothing was changed.",
                                   opts_.run_dir.string(), existing.front().second.filename().string()));
  }
  if (opts_.process_group && resume == "latest") {  // rank 0 chose; every rank loads the same one
    const auto chosen = opts_.process_group->share_from_rank0("resume_path", resume_path ? resume_path->string() : "");
    resume_path = chosen.empty() ? std::nullopt : std::optional<fs::path>(chosen);
  }
  if (resume_path) resume_from(*resume_path);
  if (opts_.process_group) broadcast_weights();

  LoaderOptions lo;
  lo.batch_size = tc.batch_size;
  lo.seed = static_cast<uint64_t>(cfg_.run.seed);  // the same permutation on every rank, sharded by rank
  lo.rank = rank_, lo.world_size = world_size_;
  lo.num_workers = cfg_.data.num_workers;
  lo.prefetch = cfg_.data.prefetch;
  lo.preload = cfg_.data.preload;
  lo.device = opts_.device;
  lo.augment = AugmentOptions::from(cfg_.data);
  loader_ = std::make_unique<Loader>(dataset_, lo, resume_loader_state_);

  if (rank_ == 0) {
    MetricsOptions mo;
    mo.tensorboard = cfg_.logging.tensorboard, mo.jsonl = cfg_.logging.jsonl, mo.prometheus = cfg_.logging.prometheus;
    mo.run_name = cfg_.run.name;
    // Points up to the checkpoint step were logged before it was saved; later ones are orphans.
    metrics_ = std::make_unique<MetricsLogger>(opts_.run_dir, mo, resume_path ? std::optional<int64_t>(step_ + 1) : std::nullopt);
    if (!resume_path) metrics_->text("config", 0, "```json\n" + config_to_string(cfg_) + "\n```");
    for (auto& [name, p] : named_parameters(model_))
      if (name == "conv_in.weight" || name == "time_embedding.linear_1.weight" || name == "mid_block.attentions.0.to_q.weight" ||
          name == "conv_out.weight")
        histogram_params_.emplace_back(name, p);
    live_progress_ = cfg_.logging.progress && ::isatty(STDERR_FILENO);
    if (const int64_t first = cfg_.logging.profile_start; first > 0) {
      const int64_t last = first + cfg_.logging.profile_steps - 1;
      profiler_ = std::make_unique<StepProfiler>(
          first, cfg_.logging.profile_steps, opts_.run_dir / "profile" / fmt::format("steps_{}-{}.pt.trace.json", first, last),
          opts_.device.is_cuda());
    }
  }
  configure_backends();
  if (opts_.device.is_cuda()) {
    cuda_ = std::make_unique<CudaState>();
    cuda_->graphed = tc.cuda_graph;
#ifdef DIFFTRAIN_WITH_CUDA
    if (tc.cuda_graph) cuda_->stream = std::make_unique<cuda::StreamScope>(opts_.device.index() < 0 ? 0 : opts_.device.index());
#endif
  }
}

Trainer::~Trainer() {
  cuda_.reset();  // first: the default stream then waits for the loop's stream before anything is freed
}

void Trainer::configure_backends() {
  const auto& tc = cfg_.train;
  auto& ctx = at::globalContext();
  if (opts_.device.is_cuda()) {
    ctx.setBenchmarkCuDNN(tc.cudnn_benchmark);
    // torch 2.9+: one precision API per process (mixing it with setAllowTF32CuBLAS raises).
    const auto p = tc.allow_tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
    ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, p);
    ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, p);
  } else if ((tc.cudnn_benchmark || tc.allow_tf32) && rank_ == 0) {
    log_warn("train.cudnn_benchmark and train.allow_tf32 act on CUDA only; this run is on {}", opts_.device.str());
  }
  if (rank_ != 0) return;
  // The attention kernel scaled_dot_product_attention picks for each attention shape of the model
  // in the training dtype (at::_fused_sdp_choice, as SDPA itself asks), said once.
  static constexpr const char* kBackends[] = {"math", "flash_attention", "efficient_attention", "cudnn_attention",
                                              "overrideable"};
  std::vector<std::string> seen;
  const auto dtype = autocast_.value_or(at::kFloat);
  const auto& m = cfg_.model;
  for (const auto& layer : attention_layers(m, m.sample_size, m.sample_size)) {
    const int64_t channels = layer.channels, heads = m.attention_head_dim ? channels / *m.attention_head_dim : 1,
                  tokens = layer.height * layer.width;
    const auto q =
        at::empty({tc.batch_size, heads, tokens, channels / heads}, at::TensorOptions().dtype(dtype).device(opts_.device));
    const auto choice = at::_fused_sdp_choice(q, q, q);
    const std::string text = fmt::format("{} for {} head(s) x {} tokens x {} dims",
                                         choice >= 0 && choice < 5 ? kBackends[choice] : "?", heads, tokens, channels / heads);
    if (std::find(seen.begin(), seen.end(), text) == seen.end()) seen.push_back(text);
  }
  if (!seen.empty()) log_info("attention (scaled_dot_product_attention, {}): {}", c10::toString(dtype), fmt::join(seen, "; "));
}

void Trainer::broadcast_weights() {
  std::vector<at::Tensor> tensors;
  {
    c10::NoGradGuard no_grad;
    for (auto& p : params_) tensors.push_back(p.detach());
    if (ema_)
      for (const auto& s : ema_->shadow()) tensors.push_back(s);
  }
  opts_.process_group->broadcast(tensors, 0);
}

void Trainer::resume_from(const fs::path& path) {
  const Checkpoint ckpt = load_checkpoint(path);
  Config saved;
  try {
    saved = config_from_json(nlohmann::ordered_json::parse(ckpt.config), (path / "config.json").string());
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("checkpoint {}: its config.json cannot be read: {}", path.string(), e.what()));
  }
  if (const auto changes = run_identity_changes(saved, cfg_); !changes.empty())
    throw UsageError(fmt::format("cannot resume from {}: the config changes the model, the data or the optimisation (only "
                                 "run.device, run.num_threads, run.peak_tflops, train.max_steps, the train.* speed switches, "
                                 "checkpoint.resume, distributed.timeout_s and logging.* may change on resume). Changed:{}", path.string(), changes));
  auto part = [&](const std::string& stem) -> std::map<std::string, at::Tensor> {
    const auto it = ckpt.tensors.find(stem);
    if (it == ckpt.tensors.end()) throw CheckpointError(fmt::format("checkpoint {} has no {}.safetensors", path.string(), stem));
    return {it->second.begin(), it->second.end()};
  };
  load_named(model_, part("model"), (path / "model.safetensors").string());
  if (ema_) {
    load_named(ema_model_, part("ema"), (path / "ema.safetensors").string());
    ema_->set_optimization_step(ckpt.state.at("ema_optimization_step").get<int64_t>());
  }
  const auto optim = part("optimizer");
  optimizer_->load_state_dict(optim);
  if (scaler_) scaler_->load_state_dict(optim);
  const auto rng = part("rng");
  const auto types = rng_state_devices(ckpt);
  auto state_of = [&](const std::string& name) -> const at::Tensor& {
    const auto it = rng.find(name);
    if (it == rng.end())
      throw CheckpointError(fmt::format("checkpoint {}: rng.safetensors has no {} state", path.string(), name));
    return it->second;
  };
  auto restore = [&](at::Generator g, const std::string& name) {
    try {
      set_generator_state(g, state_of(name));
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("checkpoint {}: the {} generator state does not fit the {} generator: {}", path.string(),
                                        name, g.device().str(), e.what_without_backtrace()));
    }
  };
  const std::string here = c10::DeviceTypeName(opts_.device.type(), /*lower_case=*/true);
  const std::string there =
      types.count("trainer") ? types.at("trainer") : "cpu";  // the trainer's generator lives on the run's device
  auto cpu = default_generator(c10::Device(c10::kCPU));
  if (there == here) {
    restore(generator_, "trainer");
    restore(cpu, "cpu");
    if (!opts_.device.is_cpu()) restore(default_generator(opts_.device), "device");
  } else {
    // A generator's state belongs to its device type (the CPU's Mersenne Twister, 5056 bytes;
    // CUDA's Philox seed and offset, 16 bytes), so the t/ε stream and the dropout stream restart
    // from seeds derived from run.seed, the rank and the step: deterministic, not bit-exact.
    const auto seed = static_cast<uint64_t>(cfg_.run.seed), step = static_cast<uint64_t>(ckpt.step);
    generator_.set_current_seed(derive_seed(global_batch_seed(seed), step));
    default_generator(opts_.device).set_current_seed(derive_seed(derive_seed(seed, static_cast<uint64_t>(rank_)), step));
    if (!opts_.device.is_cpu()) restore(cpu, "cpu");  // a CPU state carries over; on a CPU run it is the dropout stream, reseeded
    if (rank_ == 0)
      log_warn(
          "checkpoint {} was written on {} and this run is on {}: generator states do not carry over between device "
          "types, so the timestep/noise stream and the dropout stream are reseeded from run.seed and step {}. The run "
          "continues deterministically, but not bit-identically to one that stayed on {}.",
          path.string(), there, here, ckpt.step, there);
  }
  step_ = ckpt.step;
  resume_loader_state_ = LoaderState{ckpt.state.at("loader").at("epoch").get<int64_t>(), ckpt.state.at("loader").at("batch").get<int64_t>()};
  log_info("resumed from {} at step {} (loader epoch {}, batch {})", path.string(), step_, resume_loader_state_.epoch,
           resume_loader_state_.batch);
}

void Trainer::train_step() {
  const auto& tc = cfg_.train;
  const auto host_start = std::chrono::steady_clock::now();
#ifdef DIFFTRAIN_WITH_CUDA
  if (cuda_) cuda_->timer.begin();
#endif
  const bool replay = cuda_ && cuda_->captured;
  for (int64_t micro = 0; micro < tc.gradient_accumulation_steps; ++micro) {
    const Batch batch = loader_->next();
    if (!capturable_) {
      micro_step(batch.images, batch.labels);
      continue;
    }
    stage_batch(batch);
#ifdef DIFFTRAIN_WITH_CUDA
    if (replay) {
      cuda_->micro->replay();
      continue;
    }
#endif
    micro_step(x0_static_, labels_static_);
  }
  // The mean gradient over ranks, once per optimizer step (never per micro-batch), between the graphs.
  if (opts_.process_group) {
    std::vector<at::Tensor> grads;
    for (auto& p : params_) grads.push_back(p.grad());
    opts_.process_group->allreduce_mean(grads, int64_t{cfg_.distributed.bucket_size_mb} << 20);
  }
  const double lr = base_lr_ * lr_lambda(tc.lr_schedule, step_, tc.lr_warmup_steps, tc.max_steps);
  if (capturable_) lr_t_.fill_(lr);  // outside any graph: the graph reads the tensor
#ifdef DIFFTRAIN_WITH_CUDA
  if (replay) {
    // A graph cannot branch on the host: the histogram shows the gradients before clipping.
    if (capture_grads_) keep_histogram_grads(/*unscale=*/true);
    cuda_->optimizer->replay();
  }
#endif
  if (!replay) optimizer_step(lr, capture_grads_);
#ifdef DIFFTRAIN_WITH_CUDA
  if (cuda_) cuda_->timer.end();
#endif
  interval_host_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - host_start).count();
  ++step_;
  ++interval_steps_;
  if (cuda_ && cuda_->graphed && !cuda_->captured && ++cuda_->eager_steps >= kWarmupSteps) capture_graphs();
}

void Trainer::micro_step(const at::Tensor& x0, const at::Tensor& class_labels) {
  const auto& tc = cfg_.train;
  const int64_t k = tc.gradient_accumulation_steps;
  const int64_t T = schedule_.config().num_train_timesteps;
  const auto& dev = opts_.device;
  const int64_t B = x0.size(0);  // x0: (B, C, H, W) in [-1, 1]
  // Drawn for the global batch (world x B), this rank's rows taken: rank r's sample j is row
  // j * world + r, as DistributedSampler interleaves the ranks' shares of the global batch.
  const int64_t W = world_size_;
  auto shape = x0.sizes().vec();
  shape[0] = B * W;
  auto mine = [&](const at::Tensor& global) { return W == 1 ? global : global.slice(0, rank_, B * W, W); };
  const bool conditional = cfg_.model.num_class_embeds.has_value();
  at::Tensor noise, t, drop_u;
  if (capturable_) {
    // Static buffers drawn in place, in the order and with the ops at::randn/randint/rand use
    // (empty + normal_/random_/uniform_): the same numbers as the plain path below.
    if (!noise_static_.defined()) {
      noise_static_ = at::empty(shape, x0.options());
      t_static_ = at::empty({B * W}, at::TensorOptions().dtype(at::kLong).device(dev));
      if (conditional) drop_static_ = at::empty({B * W}, x0.options());
    }
    noise = mine(noise_static_.normal_(0, 1, generator_));
    t = mine(t_static_.random_(0, T, generator_));
    if (conditional) drop_u = mine(drop_static_.uniform_(0, 1, generator_));
  } else {
    noise = mine(at::randn(shape, generator_, x0.options()));                                         // ε ~ N(0, I)
    t = mine(at::randint(T, {B * W}, generator_, at::TensorOptions().dtype(at::kLong).device(dev)));  // t ~ U{0..T-1}
    if (conditional) drop_u = mine(at::rand({B * W}, generator_, x0.options()));
  }
  at::Tensor labels;
  if (conditional)  // classifier-free guidance training: the null class with p = class_dropout_prob
    labels = at::where(drop_u < tc.class_dropout_prob, model_->null_class(), class_labels);
  auto x_t = schedule_.add_noise(x0, noise, t);  // Ho et al. eq. 4
  if (memory_format_ != at::MemoryFormat::Contiguous) x_t = x_t.contiguous(memory_format_);
  at::Tensor out;
  {
    AutocastScope autocast(dev.type(), autocast_);
    out = model_->forward(x_t, t, labels);
  }
  const auto per_sample =
      diffusion_loss(out, schedule_.training_target(x0, noise, t), schedule_.loss_weights(t, cfg_.diffusion.snr_gamma));  // (B)
  const auto loss = per_sample.mean() / static_cast<double>(k);
  (scaler_ ? scaler_->scale(loss) : loss).backward();
  c10::NoGradGuard no_grad;
  loss_sum_.add_(loss.detach());
  const auto q = (t * 4).div(T, "floor");  // timestep quartile, as improved-diffusion logs it
  quartile_sum_.index_add_(0, q, per_sample.detach());
  quartile_count_.index_add_(0, q, at::ones_like(per_sample));
}

void Trainer::optimizer_step(double lr, bool keep_grads) {
  const auto& tc = cfg_.train;
  std::vector<at::Tensor> grads;
  for (auto& p : params_) grads.push_back(p.grad());
  const auto found_inf = scaler_ ? scaler_->unscale_(grads) : at::Tensor();
  const auto grad_norm = clip_grad_norm_(grads, tc.max_grad_norm, optimizer_->impl() != OptimizerImpl::loop);
  // A non-finite gradient skips the step (fp16 overflow, or a real NaN elsewhere).
  const auto nonfinite = scaler_ ? found_inf : at::isfinite(grad_norm).logical_not().to(at::kFloat);
  if (capturable_) optimizer_->step(lr_t_, nonfinite);
  else optimizer_->step(lr, nonfinite);
  if (scaler_) scaler_->update(found_inf);
  if (keep_grads) keep_histogram_grads(/*unscale=*/false);  // unscale_ above already did
  optimizer_->zero_grad();
  if (ema_) ema_->step(params_);
  c10::NoGradGuard no_grad;
  if (!scaler_) nonfinite_streak_.add_(nonfinite).mul_(nonfinite);  // consecutive non-finite steps
  max_streak_.copy_(at::maximum(max_streak_, nonfinite_streak_));
  skipped_.add_(nonfinite);
  grad_norm_sum_.add_(at::where(at::isfinite(grad_norm), grad_norm, 0.0));
}

void Trainer::keep_histogram_grads(bool unscale) {
  histogram_grads_.clear();
  for (const auto& [name, p] : histogram_params_) {
    auto g = p.grad().detach().clone();
    histogram_grads_.emplace_back(name, unscale && scaler_ ? g.div_(scaler_->scale_tensor()) : g);
  }
}

void Trainer::stage_batch(const Batch& batch) {
  if (!x0_static_.defined()) {
    x0_static_ = at::empty_like(batch.images, at::MemoryFormat::Contiguous);
    if (batch.labels.defined()) labels_static_ = at::empty_like(batch.labels);
  }
  TORCH_CHECK(batch.images.sizes() == x0_static_.sizes(), "a batch of shape ", batch.images.sizes(),
              " where the captured step expects ", x0_static_.sizes());
  x0_static_.copy_(batch.images, /*non_blocking=*/true);
  if (labels_static_.defined()) labels_static_.copy_(batch.labels, /*non_blocking=*/true);
}

void Trainer::capture_graphs() {
#ifdef DIFFTRAIN_WITH_CUDA
  // Warm-up steps ran eagerly on the graphs' stream (cuDNN and cuBLAS handles, workspaces, the
  // allocator's blocks); .grad exists, so backward accumulates into it in place when replayed.
  // Capture records without running: the next step is the first replay.
  // The device's default generator (dropout) is registered by capture_begin in torch 2.11, and
  // named here too, so that a LibTorch that stops doing so keeps dropout's draws advancing.
  cuda_->micro = std::make_unique<cuda::Graph>(std::vector<at::Generator>{generator_, default_generator(opts_.device)});
  cuda_->micro->capture([&] { micro_step(x0_static_, labels_static_); });
  cuda_->optimizer = std::make_unique<cuda::Graph>(std::vector<at::Generator>{}, cuda_->micro.get());
  cuda_->optimizer->capture([&] { optimizer_step(0.0, /*keep_grads=*/false); });
  cuda_->captured = true;
  if (rank_ == 0) {
    progress_clear();
    log_info("train.cuda_graph: captured the micro-step and the optimizer step after {} eager steps; replaying from step {}",
             kWarmupSteps, step_ + 1);
  }
#endif
}

void Trainer::check_nonfinite() const {
  const double streak = max_streak_.item<double>();
  if (streak >= cfg_.train.max_nonfinite_steps) {
    const auto latest = find_latest_checkpoint(opts_.run_dir / "checkpoints");
    throw RuntimeError(fmt::format(
        "{} training steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps = {}), by step {}; each "
        "was skipped, and training stops here. {}. Lower train.learning_rate, set train.max_grad_norm, or check the data.",
        static_cast<int64_t>(streak), cfg_.train.max_nonfinite_steps, step_,
        latest ? "The last good checkpoint is " + latest->string() : std::string("No checkpoint was written yet")));
  }
}

fs::path Trainer::save_checkpoint_now() {
  check_nonfinite();  // never checkpoint a run that is failing
  Checkpoint ckpt;
  ckpt.step = step_;
  ckpt.config = config_to_string(cfg_);
  ckpt.tensors["model"] = named_parameters(model_);
  if (ema_) {
    ckpt.tensors["ema"] = named_parameters(ema_model_);
    ckpt.state["ema_optimization_step"] = ema_->optimization_step();
  }
  auto optim = optimizer_->state_dict();
  if (scaler_)
    for (auto& kv : scaler_->state_dict()) optim.push_back(kv);
  ckpt.tensors["optimizer"] = std::move(optim);
  NamedTensors rng = {{"trainer", generator_state(generator_)},
                      {"cpu", generator_state(default_generator(c10::Device(c10::kCPU)))}};
  const std::string device_type = c10::DeviceTypeName(opts_.device.type(), /*lower_case=*/true);
  ckpt.metadata["rng"] = {{"trainer", device_type}, {"cpu", "cpu"}};  // each state's device type (rng_state_devices)
  if (!opts_.device.is_cpu()) {
    rng.emplace_back("device", generator_state(default_generator(opts_.device)));
    ckpt.metadata["rng"]["device"] = device_type;
  }
  ckpt.tensors["rng"] = std::move(rng);
  const auto ls = loader_->state();
  ckpt.state["loader"] = {{"epoch", ls.epoch}, {"batch", ls.batch}};
  ckpt.state["seed"] = cfg_.run.seed;
  const auto dir = opts_.run_dir / "checkpoints";
  const auto path = save_checkpoint(dir, ckpt);
  for (const auto& gone : rotate_checkpoints(dir, cfg_.checkpoint.keep_last, cfg_.checkpoint.keep_every))
    log_debug("rotated out {}", gone.string());
  progress_clear();
  log_info("checkpoint {}", path.string());
  return path;
}

void Trainer::log_interval(bool final) {
  if (interval_steps_ == 0) return;
  check_nonfinite();
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - interval_start_).count();
  if (opts_.process_group) {  // the loss over every rank's samples, reduced where it lives (NCCL: on the GPU)
    opts_.process_group->allreduce_sum({loss_sum_, quartile_sum_, quartile_count_});
    loss_sum_.div_(static_cast<double>(world_size_));
  }
  const double loss = loss_sum_.item<double>() / static_cast<double>(interval_steps_);
  const double grad_norm = grad_norm_sum_.item<double>() / static_cast<double>(interval_steps_);
  const auto& tc = cfg_.train;
  const double lr = base_lr_ * lr_lambda(tc.lr_schedule, step_ - 1, tc.lr_warmup_steps, tc.max_steps);
  const double images = static_cast<double>(interval_steps_ * tc.batch_size * tc.gradient_accumulation_steps * world_size_);
  const double img_per_s = images / std::max(secs, 1e-9);
  const double elapsed = std::chrono::duration<double>(now - train_start_).count();
  const double eta = elapsed / static_cast<double>(step_ - start_step_) * static_cast<double>(tc.max_steps - step_);
  const auto skipped = static_cast<int64_t>(skipped_.item<double>());
  // Achieved model TFLOP/s per device: FLOPs per image (forward + backward, src/flops.cpp) times
  // this rank's images per second; MFU divides it by the device's peak (run.peak_tflops or the table).
  const double tflops = static_cast<double>(flops_.total()) * (img_per_s / static_cast<double>(world_size_)) / 1e12;
  const double mfu = peak_ ? tflops / peak_->tflops : 0.0;  // logged only with a peak

  std::vector<std::pair<std::string, double>> scalars = {
      {"train/loss", loss},           {"train/lr", lr},         {"train/grad_norm", grad_norm},
      {"train/img_per_s", img_per_s}, {"train/tflops", tflops}, {"train/epoch", static_cast<double>(loader_->state().epoch)}};
  if (peak_) scalars.emplace_back("train/mfu", mfu);
  // Host time issuing the steps against their span on the device (CUDA events around each step,
  // read after the sync above): a device span no longer than the host's means the GPU waited
  // for kernel launches (launch-bound: train.cuda_graph removes that wait).
  const auto steps = static_cast<double>(interval_steps_);
  scalars.emplace_back("train/host_ms_per_step", interval_host_seconds_ * 1e3 / steps);
#ifdef DIFFTRAIN_WITH_CUDA
  if (cuda_) scalars.emplace_back("train/device_ms_per_step", cuda_->timer.take_device_ms() / steps);
#endif
  interval_host_seconds_ = 0;
  if (ema_) scalars.emplace_back("train/ema_decay", ema_->cur_decay_value());
  if (scaler_) scalars.emplace_back("train/loss_scale", scaler_->scale_tensor().item<double>());
  scalars.emplace_back("train/skipped_steps", static_cast<double>(skipped));
  std::string memory;
#ifdef DIFFTRAIN_WITH_CUDA
  if (opts_.device.is_cuda()) {
    const auto m = cuda::memory_stats(opts_.device.index());
    constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
    scalars.emplace_back("system/gpu_mem_allocated_gb", static_cast<double>(m.allocated_bytes) / kGiB);
    scalars.emplace_back("system/gpu_mem_reserved_gb", static_cast<double>(m.reserved_bytes) / kGiB);
    scalars.emplace_back("system/gpu_mem_peak_gb", static_cast<double>(m.peak_allocated_bytes) / kGiB);
    memory = fmt::format(" | GPU {:.2f}/{:.2f} GiB", static_cast<double>(m.allocated_bytes) / kGiB,
                         static_cast<double>(m.reserved_bytes) / kGiB);
  }
#endif
  const auto qs = quartile_sum_.cpu(), qc = quartile_count_.cpu();
  for (int q = 0; q < 4; ++q)
    if (qc[q].item<double>() > 0) scalars.emplace_back(fmt::format("train/loss_q{}", q), qs[q].item<double>() / qc[q].item<double>());
  if (metrics_) metrics_->scalars(step_, scalars);

  progress_clear();
  log_info("step {}/{} | loss {:.4f} | lr {:.2e} | grad {:.3f} | {:.1f} img/s{} | {} | ETA {}{}{}", step_, tc.max_steps, loss, lr,
           grad_norm, img_per_s, peak_ ? fmt::format(" | MFU {:.1f}%", 100.0 * mfu) : std::string(), duration_text(elapsed),
           final ? "done" : duration_text(eta), memory, skipped > 0 ? fmt::format(" | skipped {} non-finite", skipped) : "");
  last_log_summary_ = fmt::format("loss {:.4f} | {:.0f} img/s{}", loss, img_per_s, memory);

  loss_sum_.zero_(), grad_norm_sum_.zero_(), quartile_sum_.zero_(), quartile_count_.zero_();
  interval_steps_ = 0;
  interval_start_ = std::chrono::steady_clock::now();
}

void Trainer::write_sample_grid() {
  auto opts = SamplingOptions::from(cfg_.sampling);
  auto& model = cfg_.sampling.use_ema ? sampling_model() : model_;
  const auto images = generate(model, schedule_.config(), opts, opts_.device);  // (N, C, H, W)
  const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(images.size(0)))));
  const auto grid = make_grid(to_uint8(images).cpu(), nrow);  // (C, H', W') uint8
  const fs::path path = opts_.run_dir / "samples" / (checkpoint_dir_name(step_) + ".png");
  write_png(path, grid);
  if (metrics_) metrics_->image("samples", step_, grid.const_data_ptr<uint8_t>(), grid.size(0), grid.size(1), grid.size(2));
  progress_clear();
  log_info("samples {}", path.string());
}

void Trainer::write_final_samples() {
  if (cfg_.sampling.num_final_samples <= 0) return;
  auto opts = SamplingOptions::from(cfg_.sampling);
  opts.num_samples = cfg_.sampling.num_final_samples;
  const fs::path dir = opts_.run_dir / "samples" / "final";
  const auto start = std::chrono::steady_clock::now();
  auto& model = cfg_.sampling.use_ema ? sampling_model() : model_;
  log_info("generating {} samples ({} {} steps, batches of {}) for {}", opts.num_samples, to_string(opts.sampler),
           opts.num_inference_steps, opts.batch_size, dir.string());
  save_sample_folder(dir, to_uint8(generate(model, schedule_.config(), opts, opts_.device)).cpu());
  log_info("{} samples ({} {} steps) in {} in {}", opts.num_samples, to_string(opts.sampler), opts.num_inference_steps,
           duration_text(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()), dir.string());
}

void Trainer::write_histograms() {
  if (!metrics_) return;
  auto add = [&](const std::string& tag, const at::Tensor& t) {
    const auto values = t.detach().to(at::kCPU, at::kFloat).contiguous();
    metrics_->histogram(tag, step_, {values.const_data_ptr<float>(), static_cast<size_t>(values.numel())});
  };
  for (const auto& [name, p] : histogram_params_) add("weights/" + name, p);
  for (const auto& [name, g] : histogram_grads_) add("grads/" + name, g);
  histogram_grads_.clear();
}

void Trainer::progress_tick() {
  if (!live_progress_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_progress_ < std::chrono::milliseconds(200) && step_ != cfg_.train.max_steps) return;
  last_progress_ = now;
  const double elapsed = std::chrono::duration<double>(now - train_start_).count();
  const double done = static_cast<double>(step_ - start_step_);
  const double eta = elapsed / std::max(done, 1.0) * static_cast<double>(cfg_.train.max_steps - step_);
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(kWidth * static_cast<double>(step_) / static_cast<double>(cfg_.train.max_steps));
  std::fprintf(stderr, "\r\033[K[%s%s] %lld/%lld | %.2f it/s | ETA %s | %s", std::string(static_cast<size_t>(filled), '#').c_str(),
               std::string(static_cast<size_t>(kWidth - filled), ' ').c_str(), static_cast<long long>(step_),
               static_cast<long long>(cfg_.train.max_steps), done / std::max(elapsed, 1e-9), duration_text(eta).c_str(),
               last_log_summary_.c_str());
  std::fflush(stderr);
}

void Trainer::progress_clear() {
  if (live_progress_) std::fputs("\r\033[K", stderr);
}

int Trainer::train() {
  const auto& tc = cfg_.train;
  const bool rank0 = rank_ == 0;
  if (step_ >= tc.max_steps) {
    log_info("already trained to step {} (train.max_steps = {}); nothing to do", step_, tc.max_steps);
    return kExitOk;
  }
  log_info("training {} -> {} steps: batch {} x {} accumulation x {} rank(s) = {} images per step, lr {:.2e} ({} schedule, "
           "{} warmup), AdamW {}, {}", step_, tc.max_steps, tc.batch_size, tc.gradient_accumulation_steps, world_size_,
           int64_t{tc.batch_size} * tc.gradient_accumulation_steps * world_size_, base_lr_, to_string(tc.lr_schedule),
           tc.lr_warmup_steps, to_string(optimizer_->impl()),
           autocast_ ? fmt::format("{} autocast", c10::toString(*autocast_)) : std::string("fp32"));
  std::vector<std::string> levers;
  for (const auto& [on, name] : {std::pair{tc.cuda_graph, "cuda_graph"},
                                 {tc.channels_last, "channels_last"},
                                 {tc.fused_groupnorm_silu, "fused_groupnorm_silu"},
                                 {tc.cudnn_benchmark, "cudnn_benchmark"},
                                 {tc.allow_tf32, "allow_tf32"}})
    if (on) levers.emplace_back(name);
  if (!levers.empty()) log_info("speed switches on: {}", fmt::join(levers, ", "));
  // FLOPs per image and the peak for MFU, said once. The peak precision is the step's matrix
  // arithmetic: the autocast dtype, else TF32 tensor cores when allowed, else fp32.
  flops_ = model_flops(cfg_.model);
  const PeakPrecision precision = autocast_ == c10::kBFloat16 ? PeakPrecision::bf16
                                  : autocast_ == c10::kHalf   ? PeakPrecision::fp16
                                  : tc.allow_tf32             ? PeakPrecision::tf32
                                                              : PeakPrecision::fp32;
  std::optional<std::string> gpu_name;
#ifdef DIFFTRAIN_WITH_CUDA
  if (opts_.device.is_cuda() && cfg_.run.peak_tflops <= 0) {
    const int index = opts_.device.has_index() ? opts_.device.index() : 0;
    for (const auto& g : cuda::probe().gpus)
      if (g.index == index) gpu_name = g.name;
  }
#endif
  peak_ = choose_peak(cfg_.run.peak_tflops, gpu_name, precision);
  log_info(
      "model FLOPs per image: {:.4g} GFLOP forward + {:.4g} backward = {:.4g} GFLOP per training image (counted as "
      "torch.utils.flop_counter does); {}",
      static_cast<double>(flops_.forward) / 1e9, static_cast<double>(flops_.backward) / 1e9,
      static_cast<double>(flops_.total()) / 1e9,
      peak_      ? fmt::format("train/mfu against a peak of {:g} TFLOP/s per device ({})", peak_->tflops, peak_->source)
      : gpu_name ? fmt::format("no train/mfu: {} has no {} entry in the peak table; set run.peak_tflops", *gpu_name,
                               to_string(precision))
                 : std::string("no train/mfu on this device unless run.peak_tflops is set"));
  start_step_ = step_;
  train_start_ = interval_start_ = std::chrono::steady_clock::now();
  const int64_t hist_every = cfg_.logging.histogram_every;
  while (step_ < tc.max_steps) {
    capture_grads_ = rank0 && hist_every > 0 && (step_ + 1) % hist_every == 0;
    if (profiler_) profiler_->before_step(step_ + 1);
    train_step();
    if (profiler_ && profiler_->after_step(step_)) {
      progress_clear();
      log_info("profiler trace of steps {}-{} written to {} (scripts/bench/profile_ops.py sums it by op type)",
               cfg_.logging.profile_start, step_, profiler_->path().string());
    }
    if (capture_grads_) write_histograms();
    progress_tick();
    const bool last = step_ == tc.max_steps;
    const int sig = stop_signal();
    bool stop = sig != 0;
    if (opts_.process_group) {  // every rank stops at the same step, whichever got the signal
      const auto at = opts_.process_group->stop_step(sig != 0, step_);
      stop = at && step_ >= *at;
    }
    if (step_ % cfg_.logging.log_every == 0 || last || stop) log_interval(last);
    if (rank0 && cfg_.logging.sample_every > 0 && step_ % cfg_.logging.sample_every == 0) write_sample_grid();
    if ((cfg_.checkpoint.every > 0 && step_ % cfg_.checkpoint.every == 0) || last || stop) {
      if (rank0) save_checkpoint_now();
      else check_nonfinite();
      if (opts_.process_group) opts_.process_group->barrier();  // no rank runs ahead of a checkpoint
    }
    if (stop) {
      progress_clear();
      log_warn("{} received: stopped after the checkpoint at step {}; resume with --resume latest",
               sig ? signal_name(sig) : "a stop request on another rank", step_);
      if (metrics_) metrics_->flush();
      return kExitStoppedAfterCheckpoint;
    }
  }
  if (rank0) {
    if (cfg_.logging.sample_every == 0 || step_ % cfg_.logging.sample_every != 0) write_sample_grid();
    write_final_samples();
    if (metrics_) metrics_->flush();
  }
  return kExitOk;
}

}  // namespace difftrain

// Building a Trainer's parts in the order their seeds require: the models and the per-rank
// random streams, the optimizer, the resume (run.h picks the checkpoint, train_state.h reads
// it), then the loader at the resumed position and rank 0's outputs.
#include <algorithm>
#include <cmath>

#include <ATen/Context.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "difftrain/distributed.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "difftrain/log.h"
#include "difftrain/metrics.h"
#include "difftrain/profiler.h"
#include "difftrain/rng.h"
#include "difftrain/run.h"
#include "difftrain/weights.h"
#include "trainer_impl.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {

at::Generator default_generator(const c10::Device& device) { return at::globalContext().defaultGenerator(device); }

}  // namespace

Trainer::Impl::Impl(const Config& cfg, std::shared_ptr<Dataset> dataset, TrainerOptions opts)
    : cfg_(cfg),
      opts_(std::move(opts)),
      dataset_(std::move(dataset)),
      schedule_(SchedulerConfig::from(cfg.diffusion)),
      generator_(default_generator(opts_.device).clone()),
      stats_(opts_.device) {
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

  build_models();
  build_optimizer();
  resume();
  open_outputs();
  configure_backends();
  if (opts_.device.is_cuda()) {
    cuda_ = std::make_unique<CudaStepState>();
    cuda_->graphed = tc.cuda_graph;
#ifdef DIFFTRAIN_WITH_CUDA
    if (tc.cuda_graph) cuda_->stream = std::make_unique<cuda::StreamScope>(opts_.device.index() < 0 ? 0 : opts_.device.index());
#endif
  }
}

Trainer::Impl::~Impl() {
  cuda_.reset();  // first: the default stream then waits for the loop's stream before anything is freed
}

void Trainer::Impl::build_models() {
  // Every stream comes from (run.seed, purpose, rank) (rng.h). The weights are drawn from the
  // init stream, the same on every rank; so is the EMA copy (then overwritten), before the
  // dropout streams are seeded, so that turning EMA on or off draws nothing from them.
  const auto seed = static_cast<uint64_t>(cfg_.run.seed);
  auto cpu = default_generator(c10::Device(c10::kCPU));
  cpu.set_current_seed(stream_seed(seed, SeedPurpose::init));
  auto make = [&] {
    UNet2DModel m(cfg_.model);
    m->set_fused_groupnorm_silu(cfg_.train.fused_groupnorm_silu);
    m->to(opts_.device);
    m->set_memory_format(memory_format_);
    return m;
  };
  model_ = make();
  model_->train();
  if (cfg_.ema.enabled) ema_model_ = make();
  for (auto& [name, p] : named_parameters(model_)) params_.push_back(p);
  if (!opts_.init_weights.empty()) {
    load_weights(model_, opts_.init_weights, opts_.init_source);
    log_info("initial weights from {}", opts_.init_source);
  }
  if (ema_model_) {
    ema_model_->eval();
    std::vector<at::Tensor> shadow;
    c10::NoGradGuard no_grad;
    size_t i = 0;
    for (auto& p : ema_model_->parameters()) p.requires_grad_(false).copy_(params_[i++]), shadow.push_back(p);
    ema_ = std::make_unique<EMAModel>(std::move(shadow), cfg_.ema, capturable_);
  }
  // Dropout draws from the device's default generator (and the CPU's, on a GPU run): per rank.
  const uint64_t dropout_seed = stream_seed(seed, SeedPurpose::dropout, rank_);
  default_generator(opts_.device).set_current_seed(dropout_seed);
  if (!opts_.device.is_cpu()) cpu.set_current_seed(dropout_seed);
  // t, ε and class dropout are drawn for the whole global batch from one stream shared by every
  // rank, each rank taking its own rows: the result does not depend on how the batch is split.
  generator_.set_current_seed(stream_seed(seed, SeedPurpose::global_batch));
}

void Trainer::Impl::build_optimizer() {
  const auto& tc = cfg_.train;
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
}

void Trainer::Impl::resume() {
  auto path = choose_resume(cfg_, opts_.run_dir, rank_);
  if (opts_.process_group && cfg_.checkpoint.resume == "latest") {  // rank 0 chose; every rank loads the same one
    const auto chosen = opts_.process_group->share_from_rank0("resume_path", path ? path->string() : "");
    path = chosen.empty() ? std::nullopt : std::optional<fs::path>(chosen);
  }
  if (path) {
    auto s = state();
    s.load(*path, cfg_);
    step_ = s.step, resume_loader_state_ = s.loader, resumed_ = true;
    log_info("resumed from {} at step {} (loader epoch {}, batch {})", path->string(), step_, resume_loader_state_.epoch,
             resume_loader_state_.batch);
  }
  if (!opts_.process_group) return;
  std::vector<at::Tensor> tensors;  // rank 0's model and EMA to every rank
  c10::NoGradGuard no_grad;
  for (auto& p : params_) tensors.push_back(p.detach());
  if (ema_)
    for (const auto& s : ema_->shadow()) tensors.push_back(s);
  opts_.process_group->broadcast(tensors, 0);
}

void Trainer::Impl::open_outputs() {
  LoaderOptions lo;
  lo.batch_size = cfg_.train.batch_size;
  lo.seed = static_cast<uint64_t>(cfg_.run.seed);  // the same permutation on every rank, sharded by rank
  lo.rank = rank_, lo.world_size = world_size_;
  lo.num_workers = cfg_.data.num_workers;
  lo.prefetch = cfg_.data.prefetch;
  lo.preload = cfg_.data.preload;
  lo.device = opts_.device;
  lo.augment = AugmentOptions::from(cfg_.data);
  loader_ = std::make_unique<Loader>(dataset_, lo, resume_loader_state_);
  if (rank_ != 0) return;

  const auto& lc = cfg_.logging;
  MetricsOptions mo;
  mo.tensorboard = lc.tensorboard, mo.jsonl = lc.jsonl, mo.prometheus = lc.prometheus;
  mo.run_name = cfg_.run.name;
  if (lc.prometheus) {  // difftrain_build_info
    const EnvReport env = collect_env();
    const int cuda = env.torch_cuda_compiled;
    std::string device_name = "cpu";
    if (opts_.device.is_cuda())
      for (const auto& g : env.cuda.gpus)
        if (g.index == opts_.device.index()) device_name = g.name;
    mo.build_info = {{"version", env.difftrain_version},
                     {"libtorch", env.torch_version_runtime},
                     {"cuda", env.torch_cuda_built ? fmt::format("{}.{}", cuda / 1000, cuda % 1000 / 10) : "none"},
                     {"device", opts_.device.str()},
                     {"device_name", device_name}};
  }
  // Points up to the checkpoint step were logged before it was saved; later ones are orphans.
  metrics_ = std::make_unique<MetricsLogger>(opts_.run_dir, mo, resumed_ ? std::optional<int64_t>(step_ + 1) : std::nullopt);
  if (!resumed_) metrics_->text("config", 0, "```json\n" + config_to_string(cfg_) + "\n```");
  for (auto& [name, p] : named_parameters(model_))
    if (name == "conv_in.weight" || name == "time_embedding.linear_1.weight" || name == "mid_block.attentions.0.to_q.weight" ||
        name == "conv_out.weight")
      histogram_params_.emplace_back(name, p);
  if (const int64_t first = lc.profile_start; first > 0) {
    const int64_t last = first + lc.profile_steps - 1;
    profiler_ = std::make_unique<StepProfiler>(first, lc.profile_steps,
                                               opts_.run_dir / "profile" / fmt::format("steps_{}-{}.pt.trace.json", first, last),
                                               opts_.device.is_cuda());
  }
}

void Trainer::Impl::configure_backends() {
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

TrainState Trainer::Impl::state() {
  TrainState s;
  s.model = &model_, s.ema_model = ema_ ? &ema_model_ : nullptr, s.ema = ema_.get();
  s.optimizer = optimizer_.get(), s.scaler = scaler_.get();
  s.generator = generator_, s.device = opts_.device, s.rank = rank_;
  s.step = step_, s.loader = loader_ ? loader_->state() : resume_loader_state_;
  return s;
}

Trainer::Trainer(const Config& cfg, std::shared_ptr<Dataset> dataset, TrainerOptions opts)
    : impl_(std::make_unique<Impl>(cfg, std::move(dataset), std::move(opts))) {}
Trainer::~Trainer() = default;

}  // namespace difftrain

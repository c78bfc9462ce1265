// The training step (Ho et al. 2020, Algorithm 1; or EDM's, Karras et al. 2022 §5): the micro-steps
// (draw the noise level and ε for the global batch, the noisy sample, forward, loss, backward), the gradient all-reduce, and the optimizer
// step (unscale, clip, AdamW, EMA, statistics); with train.cuda_graph, both halves captured
// after kWarmupSteps eager steps and replayed. No host sync anywhere in it.
#include <chrono>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/autograd.h>

#include "difftrain/distributed.h"
#include "difftrain/edm.h"
#include "difftrain/log.h"
#include "trainer_impl.h"

namespace difftrain {

void Trainer::Impl::train_step() {
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
    const auto start = std::chrono::steady_clock::now();
    opts_.process_group->allreduce_mean(grads, int64_t{cfg_.distributed.bucket_size_mb} << 20);
    interval_allreduce_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double lr = lr_at(step_);
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

void Trainer::Impl::micro_step(const at::Tensor& x0, const at::Tensor& class_labels) {
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
  const bool edm = cfg_.diffusion.formulation == Formulation::edm;
  // The noise level: DDPM's t ~ U{0..T-1}; EDM's z ~ N(0, 1) for ln σ = P_mean + P_std z.
  const auto level_options = edm ? x0.options() : at::TensorOptions().dtype(at::kLong).device(dev);
  at::Tensor noise, level, drop_u;
  if (capturable_) {
    // Static buffers drawn in place, in the order and with the ops at::randn/randint/rand use
    // (empty + normal_/random_/uniform_): the same numbers as the plain path below.
    if (!noise_static_.defined()) {
      noise_static_ = at::empty(shape, x0.options());
      t_static_ = at::empty({B * W}, level_options);
      if (conditional) drop_static_ = at::empty({B * W}, x0.options());
    }
    noise = mine(noise_static_.normal_(0, 1, generator_));
    level = mine(edm ? t_static_.normal_(0, 1, generator_) : t_static_.random_(0, T, generator_));
    if (conditional) drop_u = mine(drop_static_.uniform_(0, 1, generator_));
  } else {
    noise = mine(at::randn(shape, generator_, x0.options()));  // ε ~ N(0, I)
    level = mine(edm ? at::randn({B * W}, generator_, level_options) : at::randint(T, {B * W}, generator_, level_options));
    if (conditional) drop_u = mine(at::rand({B * W}, generator_, x0.options()));
  }
  at::Tensor labels;
  if (conditional)  // classifier-free guidance training: the null class with p = class_dropout_prob
    labels = at::where(drop_u < tc.class_dropout_prob, model_->null_class(), class_labels);
  at::Tensor model_input, timesteps, x_noisy, sigma;
  EDMPreconditioning c;
  const double sigma_data = cfg_.diffusion.sigma_data;
  if (edm) {
    sigma = edm_training_sigma(level, EDMConfig::from(cfg_.diffusion));  // (B)
    const auto s = sigma.view({B, 1, 1, 1});
    c = edm_preconditioning(s, sigma_data);
    x_noisy = x0 + noise * s;  // y + n, n ~ N(0, σ² I)
    model_input = x_noisy * c.c_in;
    timesteps = c.c_noise.view({B});  // c_noise = ¼ ln σ, the UNet's (float) timestep
  } else {
    model_input = schedule_.add_noise(x0, noise, level);  // x_t, Ho et al. eq. 4
    timesteps = level;
  }
  if (memory_format_ != at::MemoryFormat::Contiguous) model_input = model_input.contiguous(memory_format_);
  at::Tensor out;
  {
    AutocastScope autocast(dev.type(), autocast_);
    out = model_->forward(model_input, timesteps, labels);
  }
  at::Tensor per_sample, quartile;  // (B)
  if (edm) {
    // λ(σ) ‖D(y + n; σ) - y‖² with D = c_skip x + c_out F (Karras et al. eq. 2, 7 and Table 1).
    const auto denoised = c.c_skip * x_noisy + c.c_out * out.to(at::kFloat);
    per_sample = diffusion_loss(denoised, x0, edm_loss_weight(sigma, sigma_data));
    quartile = edm_sigma_quartile(level);
  } else {
    per_sample =
        diffusion_loss(out, schedule_.training_target(x0, noise, level), schedule_.loss_weights(level, cfg_.diffusion.snr_gamma));
    quartile = (level * 4).div(T, "floor");  // timestep quartile, as improved-diffusion logs it
  }
  const auto loss = per_sample.mean() / static_cast<double>(k);
  (scaler_ ? scaler_->scale(loss) : loss).backward();
  stats_.add_micro_batch(loss, per_sample, quartile);
}

void Trainer::Impl::optimizer_step(double lr, bool keep_grads) {
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
  stats_.add_step(grad_norm, nonfinite, /*streak=*/!scaler_);
}

void Trainer::Impl::keep_histogram_grads(bool unscale) {
  histogram_grads_.clear();
  for (const auto& [name, p] : histogram_params_) {
    auto g = p.grad().detach().clone();
    histogram_grads_.emplace_back(name, unscale && scaler_ ? g.div_(scaler_->scale_tensor()) : g);
  }
}

void Trainer::Impl::stage_batch(const Batch& batch) {
  if (!x0_static_.defined()) {
    x0_static_ = at::empty_like(batch.images, at::MemoryFormat::Contiguous);
    if (batch.labels.defined()) labels_static_ = at::empty_like(batch.labels);
  }
  TORCH_CHECK(batch.images.sizes() == x0_static_.sizes(), "a batch of shape ", batch.images.sizes(),
              " where the captured step expects ", x0_static_.sizes());
  x0_static_.copy_(batch.images, /*non_blocking=*/true);
  if (labels_static_.defined()) labels_static_.copy_(batch.labels, /*non_blocking=*/true);
}

void Trainer::Impl::capture_graphs() {
#ifdef DIFFTRAIN_WITH_CUDA
  // Warm-up steps ran eagerly on the graphs' stream (cuDNN and cuBLAS handles, workspaces, the
  // allocator's blocks); .grad exists, so backward accumulates into it in place when replayed.
  // Capture records without running: the next step is the first replay.
  // The device's default generator (dropout) is registered by capture_begin in torch 2.11, and
  // named here too, so that a LibTorch that stops doing so keeps dropout's draws advancing.
  cuda_->micro =
      std::make_unique<cuda::Graph>(std::vector<at::Generator>{generator_, at::globalContext().defaultGenerator(opts_.device)});
  cuda_->micro->capture([&] { micro_step(x0_static_, labels_static_); });
  cuda_->optimizer = std::make_unique<cuda::Graph>(std::vector<at::Generator>{}, cuda_->micro.get());
  cuda_->optimizer->capture([&] { optimizer_step(0.0, /*keep_grads=*/false); });
  cuda_->captured = true;
  if (rank_ == 0) {
    log_info("train.cuda_graph: captured the micro-step and the optimizer step after {} eager steps; replaying from step {}",
             kWarmupSteps, step_ + 1);
  }
#endif
}

double Trainer::Impl::lr_at(int64_t step) const {
  const auto& tc = cfg_.train;
  return base_lr_ * lr_lambda(tc.lr_schedule, step, tc.lr_warmup_steps, tc.max_steps);
}

}  // namespace difftrain

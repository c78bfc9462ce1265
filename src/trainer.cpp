// The loop: data -> step (micro-steps, gradient sync, optimizer, EMA; train_step.cpp) -> logs,
// sample grids and checkpoints at their intervals, with the divergence check and the stop
// signal between steps (construction: trainer_setup.cpp).
#include "difftrain/trainer.h"

#include <unistd.h>

#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "difftrain/checkpoint.h"
#include "difftrain/distributed.h"
#include "difftrain/errors.h"
#include "difftrain/log.h"
#include "difftrain/metrics.h"
#include "difftrain/profiler.h"
#include "difftrain/sampling.h"
#include "difftrain/signals.h"
#include "difftrain/unet.h"
#include "trainer_impl.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_memory.h"
#endif

namespace difftrain {

namespace fs = std::filesystem;

int Trainer::Impl::train() {
  const auto& tc = cfg_.train;
  const auto& lc = cfg_.logging;
  const bool rank0 = rank_ == 0;
  if (step_ >= tc.max_steps) {
    log_info("already trained to step {} (train.max_steps = {}); nothing to do", step_, tc.max_steps);
    return kExitOk;
  }
  log_start();
  progress_ = std::make_unique<ProgressLine>(rank0 && lc.progress && ::isatty(STDERR_FILENO), step_, tc.max_steps);
  interval_start_ = std::chrono::steady_clock::now();
  while (step_ < tc.max_steps) {
    capture_grads_ = rank0 && lc.histogram_every > 0 && (step_ + 1) % lc.histogram_every == 0;
    if (profiler_) profiler_->before_step(step_ + 1);
    train_step();  // micro-steps, gradient all-reduce, optimizer, EMA
    if (profiler_ && profiler_->after_step(step_))
      log_info("profiler trace of steps {}-{} written to {} (scripts/bench/profile_ops.py sums it by op type)", lc.profile_start,
               step_, profiler_->path().string());
    if (capture_grads_) write_histograms();
    progress_->tick(step_);
    const bool last = step_ == tc.max_steps;
    const int sig = stop_signal();
    bool stop = sig != 0;
    if (opts_.process_group) {  // every rank stops at the same step, whichever got the signal
      const auto at = opts_.process_group->stop_step(sig != 0, step_);
      stop = at && step_ >= *at;
    }
    if ((step_ % lc.log_every == 0 || last || stop) && interval_steps_ > 0) {
      check_nonfinite();  // a diverged run stops here, before it logs or saves anything more
      const auto interval_end = std::chrono::steady_clock::now();  // img/s without the reduction below
      if (opts_.process_group) stats_.all_reduce(*opts_.process_group);
      log_interval(last, interval_end);
    }
    if (rank0 && lc.sample_every > 0 && step_ % lc.sample_every == 0) write_sample_grid();
    if ((cfg_.checkpoint.every > 0 && step_ % cfg_.checkpoint.every == 0) || last || stop) {
      check_nonfinite();  // never checkpoint a run that is failing
      if (rank0) save_checkpoint();
      if (opts_.process_group) opts_.process_group->barrier();  // no rank runs ahead of a checkpoint
    }
    if (stop) {
      log_warn("{} received: stopped after the checkpoint at step {}; resume with --resume latest",
               sig ? signal_name(sig) : "a stop request on another rank", step_);
      if (metrics_) metrics_->flush();
      return kExitStoppedAfterCheckpoint;
    }
  }
  if (rank0) {
    if (lc.sample_every == 0 || step_ % lc.sample_every != 0) write_sample_grid();
    write_final_samples();
    if (metrics_) metrics_->flush();
  }
  return kExitOk;
}

void Trainer::Impl::log_start() {
  const auto& tc = cfg_.train;
  log_info(
      "training {} -> {} steps: batch {} x {} accumulation x {} rank(s) = {} images per step, lr {:.2e} ({} schedule, "
      "{} warmup), AdamW {}, {}",
      step_, tc.max_steps, tc.batch_size, tc.gradient_accumulation_steps, world_size_,
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
  const auto basis = mfu_basis(cfg_, opts_.device, autocast_);
  flops_ = basis.flops, peak_ = basis.peak;
  log_info("{}", basis.description);
}

void Trainer::Impl::log_interval(bool final, std::chrono::steady_clock::time_point end) {
  if (interval_steps_ == 0) return;
  const auto& tc = cfg_.train;
  const double secs = std::chrono::duration<double>(end - interval_start_).count();
  const auto st = stats_.take(interval_steps_);
  const double lr = lr_at(step_ - 1);
  const double images_per_step = static_cast<double>(tc.batch_size * tc.gradient_accumulation_steps * world_size_);
  const double img_per_s = static_cast<double>(interval_steps_) * images_per_step / std::max(secs, 1e-9);
  // Achieved model TFLOP/s per device: FLOPs per image (forward + backward, src/flops.cpp) times
  // this rank's images per second; MFU divides it by the device's peak (run.peak_tflops or the table).
  const double tflops = static_cast<double>(flops_.total()) * (img_per_s / static_cast<double>(world_size_)) / 1e12;
  const double mfu = peak_ ? tflops / peak_->tflops : 0.0;  // logged only with a peak
  std::vector<std::pair<std::string, double>> scalars = {
      {"train/loss", st.loss},        {"train/lr", lr},         {"train/grad_norm", st.grad_norm},
      {"train/img_per_s", img_per_s}, {"train/tflops", tflops}, {"train/epoch", static_cast<double>(loader_->state().epoch)}};
  if (peak_) scalars.emplace_back("train/mfu", mfu);
  // Host time issuing the steps against their span on the device (CUDA events around each step,
  // read after the sync above): a device span no longer than the host's means the GPU waited
  // for kernel launches (launch-bound: train.cuda_graph removes that wait).
  const auto steps = static_cast<double>(interval_steps_);
  scalars.emplace_back("train/host_ms_per_step", interval_host_seconds_ * 1e3 / steps);
  // Gloo waits for the collective, so this is its whole time; NCCL's is only the launch (its device
  // time is inside device_ms_per_step).
  if (opts_.process_group) scalars.emplace_back("train/allreduce_ms_per_step", interval_allreduce_seconds_ * 1e3 / steps);
#ifdef DIFFTRAIN_WITH_CUDA
  if (cuda_) scalars.emplace_back("train/device_ms_per_step", cuda_->timer.take_device_ms() / steps);
#endif
  if (ema_) scalars.emplace_back("train/ema_decay", ema_->cur_decay_value());
  if (scaler_) scalars.emplace_back("train/loss_scale", scaler_->scale_tensor().item<double>());
  scalars.emplace_back("train/skipped_steps", static_cast<double>(st.skipped));
  std::string memory;
#ifdef DIFFTRAIN_WITH_CUDA
  if (opts_.device.is_cuda()) memory = cuda::add_memory_scalars(opts_.device.index(), scalars);
#endif
  for (const auto& [q, loss] : st.loss_quartiles) scalars.emplace_back(fmt::format("train/loss_q{}", q), loss);
  if (metrics_) {  // Prometheus counters (metrics.prom), totals since step 0
    metrics_->set_counter("difftrain_steps_total", "Optimizer steps completed.", static_cast<double>(step_));
    metrics_->set_counter("difftrain_images_total", "Training images consumed on all ranks (steps x global batch).",
                          static_cast<double>(step_) * images_per_step);
    metrics_->set_counter("difftrain_skipped_steps_total",
                          "Optimizer steps skipped for a non-finite loss or gradient since the process started.",
                          static_cast<double>(st.skipped));
    metrics_->scalars(step_, scalars);
  }

  log_info("step {}/{} | loss {:.4f} | lr {:.2e} | grad {:.3f} | {:.1f} img/s{} | {} | ETA {}{}{}", step_, tc.max_steps, st.loss,
           lr, st.grad_norm, img_per_s, peak_ ? fmt::format(" | MFU {:.1f}%", 100.0 * mfu) : std::string(),
           duration_text(progress_->elapsed()), final ? "done" : duration_text(progress_->eta(step_)), memory,
           st.skipped > 0 ? fmt::format(" | skipped {} non-finite", st.skipped) : "");
  progress_->set_summary(fmt::format("loss {:.4f} | {:.0f} img/s{}", st.loss, img_per_s, memory));
  interval_steps_ = 0, interval_host_seconds_ = 0, interval_allreduce_seconds_ = 0;
  interval_start_ = std::chrono::steady_clock::now();
}

void Trainer::Impl::check_nonfinite() {
  const double streak = stats_.max_streak();
  if (streak < cfg_.train.max_nonfinite_steps) return;
  const auto latest = find_latest_checkpoint(opts_.run_dir / "checkpoints");
  throw RuntimeError(fmt::format(
      "{} training steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps = {}), by step {}; each "
      "was skipped, and training stops here. {}. Lower train.learning_rate, set train.max_grad_norm, or check the data.",
      static_cast<int64_t>(streak), cfg_.train.max_nonfinite_steps, step_,
      latest ? "The last good checkpoint is " + latest->string() : std::string("No checkpoint was written yet")));
}

fs::path Trainer::Impl::save_checkpoint() {
  const auto path = state().save(opts_.run_dir / "checkpoints", cfg_);
  log_info("checkpoint {}", path.string());
  return path;
}

void Trainer::Impl::write_sample_grid() {
  const auto opts = SamplingOptions::from(cfg_.sampling);
  auto& model = cfg_.sampling.use_ema && ema_ ? ema_model_ : model_;
  const fs::path path = opts_.run_dir / "samples" / (checkpoint_dir_name(step_) + ".png");
  const auto grid = save_sample_grid(path, to_uint8(generate(model, cfg_.diffusion, opts, opts_.device)));
  if (metrics_) metrics_->image("samples", step_, grid.const_data_ptr<uint8_t>(), grid.size(0), grid.size(1), grid.size(2));
  log_info("samples {} ({} {} steps, NFE {})", path.string(), to_string(opts.sampler), opts.num_inference_steps,
           sampler_nfe(opts));
}

void Trainer::Impl::write_final_samples() {
  if (cfg_.sampling.num_final_samples <= 0) return;
  auto opts = SamplingOptions::from(cfg_.sampling);
  opts.num_samples = cfg_.sampling.num_final_samples;
  const fs::path dir = opts_.run_dir / "samples" / "final";
  const ProgressLine clock(false, 0, 0);
  auto& model = cfg_.sampling.use_ema && ema_ ? ema_model_ : model_;
  log_info("generating {} samples ({} {} steps, {} network evaluations each, batches of {}) for {}", opts.num_samples,
           to_string(opts.sampler), opts.num_inference_steps, sampler_nfe(opts), opts.batch_size, dir.string());
  save_sample_folder(dir, to_uint8(generate(model, cfg_.diffusion, opts, opts_.device)).cpu());
  log_info("{} samples ({} {} steps, NFE {}) in {} in {}", opts.num_samples, to_string(opts.sampler), opts.num_inference_steps,
           sampler_nfe(opts), duration_text(clock.elapsed()), dir.string());
}

void Trainer::Impl::write_histograms() {
  if (!metrics_) return;
  auto add = [&](const std::string& tag, const at::Tensor& t) {
    const auto values = t.detach().to(at::kCPU, at::kFloat).contiguous();
    metrics_->histogram(tag, step_, {values.const_data_ptr<float>(), static_cast<size_t>(values.numel())});
  };
  for (const auto& [name, p] : histogram_params_) add("weights/" + name, p);
  for (const auto& [name, g] : histogram_grads_) add("grads/" + name, g);
  histogram_grads_.clear();
}

// ---------------------------------------------------------------------------------------------

int Trainer::train() { return impl_->train(); }
void Trainer::train_step() { impl_->train_step(); }
int64_t Trainer::step() const { return impl_->step_; }
int64_t Trainer::num_parameters() const { return count_parameters(*impl_->model_); }
UNet2DModel& Trainer::model() { return impl_->model_; }
UNet2DModel& Trainer::sampling_model() { return impl_->ema_ ? impl_->ema_model_ : impl_->model_; }
fs::path Trainer::save_checkpoint_now() {
  impl_->check_nonfinite();  // never checkpoint a run that is failing
  return impl_->save_checkpoint();
}

}  // namespace difftrain

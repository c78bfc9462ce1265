// The training loop (Ho et al. 2020, Algorithm 1, with the usual engineering): sample t and ε,
// x_t = add_noise(x₀, ε, t), regress the model output on the target of the prediction type,
// accumulate over micro-batches, clip, AdamW with an LR schedule, EMA; checkpoints, sample grids
// and logs at their intervals; exact resume; a checkpoint and kExitStopped on a stop signal.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <memory>
#include <optional>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "difftrain/amp.h"
#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/ema.h"
#include "difftrain/flops.h"
#include "difftrain/optim.h"
#include "difftrain/peak.h"
#include "difftrain/scheduler.h"
#include "difftrain/unet.h"

namespace difftrain {

class MetricsLogger;
class StepProfiler;
class ProcessGroup;

// Per-sample diffusion loss (B): w(t) · mean over (C, H, W) of (model_output - target)², in
// float32, target and w as NoiseSchedule::training_target and loss_weights give them.
at::Tensor diffusion_loss(const at::Tensor& model_output, const at::Tensor& target, const at::Tensor& weights);

// Per-rank seed from the global seed (splitmix64), so rank r's stream never overlaps rank 0's.
uint64_t derive_seed(uint64_t seed, uint64_t stream);
// The seed of the trainer's own generator, which draws t, ε and the class dropout for the global
// batch (every rank the same stream, each taking its rows), on the run's device.
uint64_t global_batch_seed(uint64_t seed);

struct TrainerOptions {
  std::filesystem::path run_dir;
  c10::Device device{c10::kCPU};
  ProcessGroup* process_group = nullptr;  // data parallel over its world; null = one process
  // Initial weights by diffusers name (`train --init-from`), for the model and its EMA copy; a
  // resume from a checkpoint takes precedence.
  std::map<std::string, at::Tensor> init_weights;
  std::string init_source;  // where they came from, for messages
  // The capturable step's state (the rate in a device tensor, the EMA counter and decay on the
  // device, static input buffers) without a CUDA graph, on any device: for tests that it computes
  // what the plain step computes. train.cuda_graph implies it.
  bool capturable_state = false;
};

class Trainer {
 public:
  // Builds the model, optimizer, EMA and loader; with checkpoint.resume set, loads that
  // checkpoint (refusing one whose run identity differs from the config).
  Trainer(const Config& cfg, std::shared_ptr<Dataset> dataset, TrainerOptions opts);
  ~Trainer();

  // Trains until train.max_steps; returns kExitOk, or kExitStopped after a stop signal and a
  // checkpoint. A run of non-finite steps longer than train.max_nonfinite_steps is a RuntimeError.
  int train();

  // One optimizer step: gradient_accumulation_steps micro-batches, clip, AdamW, EMA. No host sync.
  // With train.cuda_graph, the micro-step and the optimizer step are captured after kWarmupSteps
  // eager steps and replayed from then on (the all-reduce runs between the two graphs).
  void train_step();
  static constexpr int64_t kWarmupSteps = 3;

  int64_t step() const { return step_; }
  UNet2DModel& model() { return model_; }
  UNet2DModel& sampling_model() { return ema_ ? ema_model_ : model_; }
  std::filesystem::path save_checkpoint_now();  // returns its directory

 private:
  void resume_from(const std::filesystem::path& path);
  // The two halves of train_step(), each capturable as a CUDA graph: forward + backward of one
  // micro-batch (its gradients added to .grad), and unscale, clip, AdamW, EMA and the statistics
  // (`lr` is used unless the state is capturable, which reads lr_t_; `keep_grads` copies the
  // histogram layers' gradients before they are zeroed).
  void micro_step(const at::Tensor& x0, const at::Tensor& class_labels);
  void optimizer_step(double lr, bool keep_grads);
  void stage_batch(const Batch& batch);  // into the static input buffers
  void keep_histogram_grads(bool unscale);  // the histogram layers' gradients, for write_histograms()
  void capture_graphs();
  void configure_backends();  // cuDNN/TF32 switches, the SDPA backend in the log
  void broadcast_weights();  // rank 0's model and EMA to every rank
  void log_interval(bool final);
  void write_sample_grid();
  void write_final_samples();
  void check_nonfinite() const;
  void write_histograms();
  void progress_tick();   // the live line on a terminal
  void progress_clear();

  Config cfg_;
  TrainerOptions opts_;
  std::shared_ptr<Dataset> dataset_;
  std::unique_ptr<Loader> loader_;
  NoiseSchedule schedule_;
  UNet2DModel model_{nullptr}, ema_model_{nullptr};
  std::vector<at::Tensor> params_;  // the model's, in named_parameters() order
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<EMAModel> ema_;
  std::unique_ptr<GradScaler> scaler_;  // fp16 only
  std::unique_ptr<StepProfiler> profiler_;  // logging.profile_start > 0, rank 0
  std::optional<c10::ScalarType> autocast_;
  at::Generator generator_;             // t, ε and class dropout, on the device
  std::unique_ptr<MetricsLogger> metrics_;
  int64_t step_ = 0;
  int64_t rank_ = 0, world_size_ = 1;
  LoaderState resume_loader_state_;  // where the loader starts (a checkpoint's position)
  double base_lr_ = 0;

  // The capturable step (train.cuda_graph or TrainerOptions::capturable_state).
  bool capturable_ = false;
  at::Tensor lr_t_;                                                // the rate of the next optimizer step
  at::Tensor x0_static_, labels_static_;                           // the loader copies each batch here
  at::Tensor noise_static_, t_static_, drop_static_;               // drawn in place on every step
  struct CudaState;                                                // CUDA graphs, their stream, step timing
  std::unique_ptr<CudaState> cuda_;                                // on CUDA
  at::MemoryFormat memory_format_ = at::MemoryFormat::Contiguous;  // train.channels_last
  double interval_host_seconds_ = 0;                               // host time issuing this interval's steps

  // Accumulated on the device between log intervals (read there only).
  at::Tensor loss_sum_, grad_norm_sum_, nonfinite_streak_, max_streak_, skipped_, quartile_sum_, quartile_count_;
  int64_t interval_steps_ = 0;
  std::chrono::steady_clock::time_point interval_start_;
  std::chrono::steady_clock::time_point train_start_;
  int64_t start_step_ = 0;

  // Histograms: the layers shown, and their gradients kept from the step that logs them.
  std::vector<std::pair<std::string, at::Tensor>> histogram_params_, histogram_grads_;
  bool capture_grads_ = false;
  bool live_progress_ = false;
  std::chrono::steady_clock::time_point last_progress_;
  std::string last_log_summary_;  // loss and img/s of the last interval, for the live line
  ModelFlops flops_;              // per image, for train/tflops (set when training starts)
  std::optional<Peak> peak_;      // the denominator of train/mfu; none = no MFU
};

}  // namespace difftrain

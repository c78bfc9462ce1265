// The Trainer's parts, private to the library: trainer_setup.cpp builds them, trainer.cpp runs
// the loop, train_step.cpp is the step (and its CUDA graphs).
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "difftrain/amp.h"
#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/ema.h"
#include "difftrain/flops.h"
#include "difftrain/optim.h"
#include "difftrain/peak.h"
#include "difftrain/progress.h"
#include "difftrain/scheduler.h"
#include "difftrain/train_state.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"
#include "step_stats.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_graph.h"
#endif

namespace difftrain {

class MetricsLogger;
class StepProfiler;

// On CUDA: device time per step, and with train.cuda_graph the loop's stream and the two graphs.
struct CudaStepState {
#ifdef DIFFTRAIN_WITH_CUDA
  cuda::StepTimer timer;
  std::unique_ptr<cuda::StreamScope> stream;
  std::unique_ptr<cuda::Graph> micro, optimizer;
#endif
  bool graphed = false;     // train.cuda_graph
  bool captured = false;    // replaying from now on
  int64_t eager_steps = 0;  // warm-up steps run so far
};

struct Trainer::Impl {
  Impl(const Config& cfg, std::shared_ptr<Dataset> dataset, TrainerOptions opts);
  ~Impl();

  // Construction (trainer_setup.cpp), in this order.
  void build_models();        // the model and its EMA copy from the init stream, then the per-rank streams
  void build_optimizer();     // AdamW at the scaled rate, the loss scaler (fp16), the capturable rate
  void resume();              // the checkpoint choose_resume() picks, the same on every rank; rank 0's weights everywhere
  void open_outputs();        // the loader at the resumed position; metrics, histograms and profiler on rank 0
  void configure_backends();  // cuDNN/TF32 switches, the SDPA backend in the log
  TrainState state();         // handles to the parts a checkpoint holds

  // The loop (trainer.cpp).
  int train();
  void log_start();  // the run's shape, the speed switches, FLOPs per image and the MFU peak
  void log_interval(bool final, std::chrono::steady_clock::time_point end);  // the interval ends at `end`
  std::filesystem::path save_checkpoint();
  void write_sample_grid();
  void write_final_samples();
  void write_histograms();
  void check_nonfinite();  // RuntimeError after train.max_nonfinite_steps non-finite steps in a row

  // The step (train_step.cpp). micro_step and optimizer_step are the two halves, each
  // capturable as a CUDA graph: forward + backward of one micro-batch (its gradients added to
  // .grad), and unscale, clip, AdamW, EMA and the statistics (`lr` is used unless the state is
  // capturable, which reads lr_t_; `keep_grads` copies the histogram layers' gradients).
  void train_step();
  void micro_step(const at::Tensor& x0, const at::Tensor& class_labels);
  void optimizer_step(double lr, bool keep_grads);
  void stage_batch(const Batch& batch);     // into the static input buffers
  void keep_histogram_grads(bool unscale);  // the histogram layers' gradients, for write_histograms()
  void capture_graphs();
  double lr_at(int64_t step) const;  // the scheduled rate of optimizer step `step` (0-based)

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
  std::optional<c10::ScalarType> autocast_;
  at::Generator generator_;  // t, ε and class dropout, on the device
  int64_t step_ = 0;
  int64_t rank_ = 0, world_size_ = 1;
  LoaderState resume_loader_state_;  // where the loader starts (a checkpoint's position)
  bool resumed_ = false;
  double base_lr_ = 0;
  StepStats stats_;
  int64_t interval_steps_ = 0;
  double interval_host_seconds_ = 0;  // host time issuing this interval's steps
  double interval_allreduce_seconds_ = 0;  // host time in this interval's gradient all-reduces (Gloo: all of it)
  std::chrono::steady_clock::time_point interval_start_;

  // The capturable step (train.cuda_graph or TrainerOptions::capturable_state).
  bool capturable_ = false;
  at::Tensor lr_t_;                                                // the rate of the next optimizer step
  at::Tensor x0_static_, labels_static_;                           // the loader copies each batch here
  at::Tensor noise_static_, t_static_, drop_static_;               // drawn in place on every step
  std::unique_ptr<CudaStepState> cuda_;                            // on CUDA
  at::MemoryFormat memory_format_ = at::MemoryFormat::Contiguous;  // train.channels_last

  // Rank 0's outputs.
  std::unique_ptr<MetricsLogger> metrics_;
  std::unique_ptr<StepProfiler> profiler_;  // logging.profile_start > 0
  std::unique_ptr<ProgressLine> progress_;  // made when training starts
  // Histograms: the layers shown, and their gradients kept from the step that logs them.
  std::vector<std::pair<std::string, at::Tensor>> histogram_params_, histogram_grads_;
  bool capture_grads_ = false;
  ModelFlops flops_;          // per image, for train/tflops (set when training starts)
  std::optional<Peak> peak_;  // the denominator of train/mfu; none = no MFU
};

}  // namespace difftrain

// The training loop (Ho et al. 2020, Algorithm 1, with the usual engineering): sample t and ε,
// x_t = add_noise(x₀, ε, t), regress the model output on the target of the prediction type,
// accumulate over micro-batches, clip, AdamW with an LR schedule, EMA; checkpoints, sample grids
// and logs at their intervals; exact resume; a checkpoint and kExitStopped on a stop signal.
// This header is the narrow interface; the parts live behind it (src/trainer_impl.h).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace difftrain {

struct Config;       // config.h
class Dataset;       // data.h
class ProcessGroup;  // distributed.h
class UNet2DModel;   // unet.h

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
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // Trains until train.max_steps; returns kExitOk, or kExitStopped after a stop signal and a
  // checkpoint. A run of non-finite steps longer than train.max_nonfinite_steps is a RuntimeError.
  int train();

  // One optimizer step: gradient_accumulation_steps micro-batches, clip, AdamW, EMA. No host sync.
  // With train.cuda_graph, the micro-step and the optimizer step are captured after kWarmupSteps
  // eager steps and replayed from then on (the all-reduce runs between the two graphs).
  void train_step();
  static constexpr int64_t kWarmupSteps = 3;

  int64_t step() const;
  int64_t num_parameters() const;
  UNet2DModel& model();
  UNet2DModel& sampling_model();                // the EMA copy when ema.enabled
  std::filesystem::path save_checkpoint_now();  // returns its directory

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace difftrain

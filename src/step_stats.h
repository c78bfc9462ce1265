// The training statistics of one log interval, accumulated on the device by the step with no
// host sync, and read by the loop at log intervals only: the mean loss and its noise-level
// quartiles (DDPM: of the timestep, as improved-diffusion logs them; EDM: of ln σ's distribution), the mean gradient norm, the skipped steps, and the
// longest run of consecutive non-finite steps (train.max_nonfinite_steps).
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace difftrain {

class ProcessGroup;

class StepStats {
 public:
  explicit StepStats(const c10::Device& device);

  // One micro-batch: its loss as backpropagated (divided by the accumulation steps), and the
  // per-sample losses (B) with the quartile (B) int64 in 0..3 of each sample's noise level, 0 the least.
  void add_micro_batch(const at::Tensor& loss, const at::Tensor& per_sample, const at::Tensor& quartile);
  // One optimizer step: the gradient norm before clipping, and 1.0 when the step was skipped
  // as non-finite. `streak`: count consecutive non-finite steps (fp16's overflows back off the
  // loss scale instead, and are not a failing run).
  void add_step(const at::Tensor& grad_norm, const at::Tensor& nonfinite, bool streak);

  // The loss (a mean over ranks) and the quartile sums over every rank's samples: a collective,
  // reduced where the numbers live (NCCL: on the GPU).
  void all_reduce(ProcessGroup& group);

  struct Interval {
    double loss = 0, grad_norm = 0;                      // means per optimizer step
    int64_t skipped = 0;                                 // non-finite steps since the start of the run
    std::vector<std::pair<int, double>> loss_quartiles;  // (q, mean loss) of the quartiles that had samples
  };
  // The means over `steps` optimizer steps (a host sync); starts the next interval.
  Interval take(int64_t steps);
  double max_streak() const;  // the longest run of non-finite steps so far (a host sync)

 private:
  at::Tensor loss_sum_, grad_norm_sum_, streak_, max_streak_, skipped_;  // 0-d float
  at::Tensor quartile_sum_, quartile_count_;                             // (4) float
};

}  // namespace difftrain

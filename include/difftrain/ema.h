// Exponential moving average of the weights, as diffusers' EMAModel (training_utils.py) does it:
//   decay_n = clamp(1 - (1 + n/inv_gamma)^-power, min_decay, decay)   (use_ema_warmup)
//           = clamp((1 + n)/(10 + n), min_decay, decay)                  (otherwise)
//   with n = optimization_step - update_after_step - 1 (decay 0, a plain copy, while n <= 0);
//   shadow ← lerp(shadow, param, 1 - decay_n) = shadow - (1 - decay_n)(shadow - param).
// update_every = k updates on every k-th optimization step only (lucidrains' ema-pytorch).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "difftrain/config.h"

namespace difftrain {

class EMAModel {
 public:
  // `shadow` are the averaged tensors, updated in place (e.g. the parameters of a copy of the
  // model, so that the copy samples with EMA weights). `capturable`: the step counter and the
  // decay live on the shadow's device and every step() is the same device work, so that a CUDA
  // graph can replay it (train.cuda_graph); otherwise they live on the host.
  EMAModel(std::vector<at::Tensor> shadow, EmaConfig cfg, bool capturable = false);

  double get_decay(int64_t optimization_step) const;
  // Counts one optimization step and, when it is an update step, averages `params` into the
  // shadow with one multi-tensor lerp (no temporary). No host sync.
  void step(const std::vector<at::Tensor>& params);

  // Reading these syncs with the device when capturable.
  int64_t optimization_step() const;
  void set_optimization_step(int64_t n);  // on resume
  double cur_decay_value() const;
  bool capturable() const { return capturable_; }
  const std::vector<at::Tensor>& shadow() const { return shadow_; }

 private:
  void step_on_device(const std::vector<at::Tensor>& params);

  std::vector<at::Tensor> shadow_;
  EmaConfig cfg_;
  bool capturable_;
  int64_t optimization_step_ = 0;
  double cur_decay_value_ = 0.0;
  at::Tensor step_t_, decay_t_;  // capturable: 0-d float64 on the device
};

}  // namespace difftrain

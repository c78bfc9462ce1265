// Exponential moving average of the weights, as diffusers' EMAModel (training_utils.py) does it:
//   decay_n = clamp(1 - (1 + n/inv_gamma)^-power, min_decay, decay)   (use_ema_warmup)
//           = clamp((1 + n)/(10 + n), min_decay, decay)                  (otherwise)
//   with n = optimization_step - update_after_step - 1 (decay 0, a plain copy, while n <= 0);
//   shadow ← shadow - (1 - decay_n)(shadow - param).
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
  // model, so that the copy samples with EMA weights).
  EMAModel(std::vector<at::Tensor> shadow, EmaConfig cfg);

  double get_decay(int64_t optimization_step) const;
  // Counts one optimization step and, when it is an update step, averages `params` into the
  // shadow with one multi-tensor op. No host sync.
  void step(const std::vector<at::Tensor>& params);

  int64_t optimization_step() const { return optimization_step_; }
  void set_optimization_step(int64_t n) { optimization_step_ = n; }  // on resume
  double cur_decay_value() const { return cur_decay_value_; }
  const std::vector<at::Tensor>& shadow() const { return shadow_; }

 private:
  std::vector<at::Tensor> shadow_;
  EmaConfig cfg_;
  int64_t optimization_step_ = 0;
  double cur_decay_value_ = 0.0;
};

}  // namespace difftrain

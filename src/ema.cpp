#include "difftrain/ema.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/_foreach_sub.h>
#include <c10/core/GradMode.h>

namespace difftrain {

EMAModel::EMAModel(std::vector<at::Tensor> shadow, EmaConfig cfg) : shadow_(std::move(shadow)), cfg_(cfg) {}

double EMAModel::get_decay(int64_t optimization_step) const {
  const int64_t n = std::max<int64_t>(0, optimization_step - cfg_.update_after_step - 1);
  if (n <= 0) return 0.0;
  const double step = static_cast<double>(n);
  double d = cfg_.use_ema_warmup ? 1.0 - std::pow(1.0 + step / cfg_.inv_gamma, -cfg_.power) : (1.0 + step) / (10.0 + step);
  d = std::min(d, cfg_.decay);
  return std::max(d, cfg_.min_decay);
}

void EMAModel::step(const std::vector<at::Tensor>& params) {
  TORCH_CHECK(params.size() == shadow_.size(), "EMAModel::step: ", params.size(), " parameters for ", shadow_.size(),
              " shadow tensors");
  optimization_step_ += 1;
  if (optimization_step_ % cfg_.update_every != 0) return;
  cur_decay_value_ = get_decay(optimization_step_);
  c10::NoGradGuard no_grad;
  // shadow -= (1 - decay)(shadow - param): diffusers' foreach form, so the rounding matches too.
  at::_foreach_sub_(shadow_, at::_foreach_sub(shadow_, params), 1.0 - cur_decay_value_);
}

}  // namespace difftrain

#include "difftrain/ema.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>

namespace difftrain {

EMAModel::EMAModel(std::vector<at::Tensor> shadow, EmaConfig cfg, bool capturable)
    : shadow_(std::move(shadow)), cfg_(cfg), capturable_(capturable) {
  if (capturable_) {
    TORCH_CHECK(!shadow_.empty(), "EMAModel: a capturable EMA needs its shadow tensors (for their device)");
    const auto opts = shadow_.front().options().dtype(at::kDouble);
    step_t_ = at::zeros({}, opts), decay_t_ = at::zeros({}, opts);
  }
}

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
  if (capturable_) return step_on_device(params);
  optimization_step_ += 1;
  if (optimization_step_ % cfg_.update_every != 0) return;
  cur_decay_value_ = get_decay(optimization_step_);
  c10::NoGradGuard no_grad;
  // lerp computes s + w(p - s) in the kernel: no (s - p) temporary as large as the model, the
  // same value as diffusers' s - (1 - d)(s - p) up to rounding.
  at::_foreach_lerp_(shadow_, params, 1.0 - cur_decay_value_);
}

// get_decay() and step() in device ops, in float64 as the host computes them, so the weight
// 1 - d rounds to float32 exactly as the host's does: the same bits as the host path.
void EMAModel::step_on_device(const std::vector<at::Tensor>& params) {
  c10::NoGradGuard no_grad;
  step_t_.add_(1);
  const auto n = (step_t_ - static_cast<double>(cfg_.update_after_step + 1)).clamp_min(0);
  const auto warm = cfg_.use_ema_warmup ? 1 - at::pow(1 + n / cfg_.inv_gamma, -cfg_.power) : (1 + n) / (10 + n);
  const auto d = at::where(n <= 0, 0.0, at::clamp(warm, cfg_.min_decay, cfg_.decay));
  const auto update = step_t_.fmod(static_cast<double>(cfg_.update_every)) == 0;
  decay_t_.copy_(at::where(update, d, decay_t_));
  const auto weight = at::where(update, 1 - d, 0.0).to(shadow_.front().scalar_type());  // 0: shadow unchanged
  at::_foreach_lerp_(shadow_, params, std::vector<at::Tensor>(shadow_.size(), weight));
}

int64_t EMAModel::optimization_step() const {
  return capturable_ ? static_cast<int64_t>(step_t_.item<double>()) : optimization_step_;
}

void EMAModel::set_optimization_step(int64_t n) {
  optimization_step_ = n;
  cur_decay_value_ = get_decay(n - n % cfg_.update_every);  // the decay of the last update
  if (capturable_) step_t_.fill_(static_cast<double>(n)), decay_t_.fill_(cur_decay_value_);
}

double EMAModel::cur_decay_value() const { return capturable_ ? decay_t_.item<double>() : cur_decay_value_; }

}  // namespace difftrain

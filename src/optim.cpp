#include "difftrain/optim.h"

#include <cmath>

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_addcdiv.h>
#include <ATen/ops/_foreach_addcmul.h>
#include <ATen/ops/_foreach_div.h>
#include <ATen/ops/_foreach_lerp.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_foreach_sqrt.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "difftrain/errors.h"

namespace difftrain {

bool decays(const at::Tensor& param) { return param.dim() >= 2; }

AdamW::AdamW(NamedTensors params, AdamWOptions opts)
    : opts_(opts), impl_(opts.impl == OptimizerImpl::auto_ ? OptimizerImpl::fused : opts.impl) {
  for (auto& [name, p] : params) {
    TORCH_CHECK(p.is_floating_point() && p.requires_grad(), "AdamW: parameter ", name, " is not a trainable float tensor");
    (decays(p) ? decay_idx_ : no_decay_idx_).push_back(params_.size());
    names_.push_back(name);
    params_.push_back(p);
    exp_avgs_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    exp_avg_sqs_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    steps_.push_back(at::zeros({}, p.options().dtype(at::kFloat)));
  }
}

void AdamW::zero_grad() {
  std::vector<at::Tensor> grads;
  for (auto& p : params_)
    if (p.grad().defined()) grads.push_back(p.mutable_grad());
  if (!grads.empty()) at::_foreach_zero_(grads);
}

void AdamW::step(double lr, const at::Tensor& found_inf) {
  c10::NoGradGuard no_grad;
  if (impl_ != OptimizerImpl::fused && found_inf.defined() && found_inf.item<float>() != 0.0f) return;
  const auto skip = impl_ == OptimizerImpl::fused && found_inf.defined() ? std::optional<at::Tensor>(found_inf) : std::nullopt;
  step_group(decay_idx_, lr, opts_.weight_decay, skip);
  step_group(no_decay_idx_, lr, 0.0, skip);
}

void AdamW::step_group(const std::vector<size_t>& idx, double lr, double weight_decay,
                       const std::optional<at::Tensor>& found_inf) {
  if (idx.empty()) return;
  std::vector<at::Tensor> p, g, m, v, s;
  for (size_t i : idx) {
    TORCH_CHECK(params_[i].grad().defined(), "AdamW: parameter ", names_[i], " has no gradient");
    p.push_back(params_[i]), g.push_back(params_[i].grad()), m.push_back(exp_avgs_[i]), v.push_back(exp_avg_sqs_[i]),
        s.push_back(steps_[i]);
  }
  const double b1 = opts_.beta1, b2 = opts_.beta2;
  at::_foreach_add_(s, 1.0);
  if (impl_ == OptimizerImpl::fused) {
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, b1, b2, weight_decay, opts_.eps, /*amsgrad=*/false,
                      /*maximize=*/false, /*grad_scale=*/std::nullopt, found_inf);
    // The kernel skips the update on found_inf but not the count, as in torch.optim's _fused_adamw.
    if (found_inf) at::_foreach_sub_(s, std::vector<at::Tensor>(s.size(), *found_inf));
    return;
  }
  // Every parameter has taken the same number of steps; read it once (torch's non-capturable path does too).
  const double t = s.front().item<double>();
  const double bias_correction1 = 1 - std::pow(b1, t), bias_correction2_sqrt = std::sqrt(1 - std::pow(b2, t));
  const double step_size = lr / bias_correction1;
  if (impl_ == OptimizerImpl::foreach) {
    if (weight_decay != 0) at::_foreach_mul_(p, 1 - lr * weight_decay);
    at::_foreach_lerp_(m, g, 1 - b1);
    at::_foreach_mul_(v, b2);
    at::_foreach_addcmul_(v, g, g, 1 - b2);
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, bias_correction2_sqrt);
    at::_foreach_add_(denom, opts_.eps);
    at::_foreach_addcdiv_(p, m, denom, -step_size);
    return;
  }
  for (size_t i = 0; i < p.size(); ++i) {  // loop: the same ops, one tensor at a time
    if (weight_decay != 0) p[i].mul_(1 - lr * weight_decay);
    m[i].lerp_(g[i], 1 - b1);
    v[i].mul_(b2).addcmul_(g[i], g[i], 1 - b2);
    const auto denom = (v[i].sqrt() / bias_correction2_sqrt).add_(opts_.eps);
    p[i].addcdiv_(m[i], denom, -step_size);
  }
}

NamedTensors AdamW::state_dict() const {
  NamedTensors out;
  for (size_t i = 0; i < names_.size(); ++i) {
    out.emplace_back("exp_avg." + names_[i], exp_avgs_[i]);
    out.emplace_back("exp_avg_sq." + names_[i], exp_avg_sqs_[i]);
    out.emplace_back("step." + names_[i], steps_[i]);
  }
  return out;
}

void AdamW::load_state_dict(const std::map<std::string, at::Tensor>& state) {
  c10::NoGradGuard no_grad;
  auto load = [&](const std::string& key, at::Tensor& dst) {
    const auto it = state.find(key);
    if (it == state.end()) throw RuntimeError(fmt::format("optimizer state: missing {}", key));
    if (it->second.sizes() != dst.sizes())
      throw RuntimeError(fmt::format("optimizer state: {} has shape [{}], the model needs [{}]", key,
                                     fmt::join(it->second.sizes(), ", "), fmt::join(dst.sizes(), ", ")));
    dst.copy_(it->second);
  };
  for (size_t i = 0; i < names_.size(); ++i) {
    load("exp_avg." + names_[i], exp_avgs_[i]);
    load("exp_avg_sq." + names_[i], exp_avg_sqs_[i]);
    load("step." + names_[i], steps_[i]);
  }
}

double lr_lambda(LrSchedule schedule, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
  const double progress =
      static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
  switch (schedule) {
    case LrSchedule::constant: return 1.0;
    case LrSchedule::linear:
      return std::max(0.0, static_cast<double>(total - step) / static_cast<double>(std::max<int64_t>(1, total - warmup)));
    case LrSchedule::cosine: return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));  // num_cycles 0.5
  }
  return 1.0;
}

at::Tensor clip_grad_norm_(const std::vector<at::Tensor>& grads, double max_norm, bool foreach) {
  c10::NoGradGuard no_grad;
  TORCH_CHECK(!grads.empty(), "clip_grad_norm_: no gradients");
  std::vector<at::Tensor> norms;
  if (foreach) {
    norms = at::_foreach_norm(grads, 2);
  } else {
    for (const auto& g : grads) norms.push_back(at::linalg_vector_norm(g, 2));
  }
  const auto total_norm = at::linalg_vector_norm(at::stack(norms), 2);  // (): ‖g‖₂ over all gradients
  if (max_norm > 0) {
    const auto clip_coef_clamped = at::clamp(max_norm / (total_norm + 1e-6), std::nullopt, 1.0);
    if (foreach) {
      at::_foreach_mul_(grads, clip_coef_clamped);
    } else {
      for (const auto& g : grads) g.mul_(clip_coef_clamped);
    }
  }
  return total_norm;
}

}  // namespace difftrain

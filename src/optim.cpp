#include "difftrain/optim.h"

#include <cmath>
#include <limits>

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
#include <ATen/ops/masked_fill.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
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
  step_group(decay_idx_, lr, {}, opts_.weight_decay, found_inf);
  step_group(no_decay_idx_, lr, {}, 0.0, found_inf);
}

at::ScalarType AdamW::lr_dtype() const {
  // The fused CUDA kernel reads the rate as float (fused_adamw_impl.cu); the fused CPU kernel
  // reads it as a double, and the foreach/loop arithmetic below rounds it as the double path does.
  const bool cuda = !params_.empty() && params_.front().is_cuda();
  return impl_ == OptimizerImpl::fused && cuda ? at::kFloat : at::kDouble;
}

void AdamW::step(const at::Tensor& lr, const at::Tensor& found_inf) {
  TORCH_CHECK(lr.dim() == 0 && lr.scalar_type() == lr_dtype() && (params_.empty() || lr.device() == params_.front().device()),
              "AdamW::step: the learning rate must be a 0-d ", lr_dtype(), " tensor on the parameters' device");
  c10::NoGradGuard no_grad;
  step_group(decay_idx_, 0.0, lr, opts_.weight_decay, found_inf);
  step_group(no_decay_idx_, 0.0, lr, 0.0, found_inf);
}

void AdamW::step_group(const std::vector<size_t>& idx, double lr, const at::Tensor& lr_t, double weight_decay,
                       const at::Tensor& found_inf) {
  if (idx.empty()) return;
  std::vector<at::Tensor> p, g, m, v, s;
  for (size_t i : idx) {
    TORCH_CHECK(params_[i].grad().defined(), "AdamW: parameter ", names_[i], " has no gradient");
    p.push_back(params_[i]), g.push_back(params_[i].grad()), m.push_back(exp_avgs_[i]), v.push_back(exp_avg_sqs_[i]),
        s.push_back(steps_[i]);
  }
  const double b1 = opts_.beta1, b2 = opts_.beta2;
  if (impl_ == OptimizerImpl::fused) {
    at::_foreach_add_(s, 1.0);
    const auto skip = found_inf.defined() ? std::optional<at::Tensor>(found_inf) : std::nullopt;
    if (lr_t.defined())
      at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr_t, b1, b2, weight_decay, opts_.eps, /*amsgrad=*/false,
                        /*maximize=*/false, /*grad_scale=*/std::nullopt, skip);
    else
      at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, b1, b2, weight_decay, opts_.eps, /*amsgrad=*/false,
                        /*maximize=*/false, /*grad_scale=*/std::nullopt, skip);
    // The kernel skips the update on found_inf but not the count, as in torch.optim's _fused_adamw.
    if (skip) at::_foreach_sub_(s, std::vector<at::Tensor>(s.size(), *skip));
    return;
  }
  // foreach and loop decide on the device too, so neither reads a tensor on the host: every
  // coefficient is a 0-d tensor, and on a skipped step each is the identity (as torch.where
  // would choose). Non-finite gradients cannot be multiplied away (0 · inf = NaN), so a skipped
  // step first zeroes them. The arithmetic is torch.optim.AdamW's capturable foreach path.
  const auto dev = s.front().options();  // 0-d float32 on the parameters' device
  const auto skip = found_inf.defined() ? found_inf.ne(0) : at::zeros({}, dev.dtype(at::kBool));
  if (found_inf.defined()) {
    at::_foreach_add_(s, 1 - found_inf);
    for (auto& gi : g) gi.masked_fill_(skip, 0);
  } else {
    at::_foreach_add_(s, 1.0);
  }
  // Every parameter has taken the same number of steps. A first step that is skipped leaves
  // t = 0, where the bias corrections would divide by zero: its update is masked anyway.
  const auto t = s.front().clamp_min(1);
  // With a tensor rate (float64), each expression rounds to float32 where the double path's
  // scalar does: -lr when it fills the float tensor, 1 - lr·λ once, after double arithmetic.
  const auto step_size =
      lr_t.defined() ? lr_t.neg().to(at::kFloat).div(1 - at::pow(b1, t)) : -lr / (1 - at::pow(b1, t));  // -lr / (1 - β₁ᵗ)
  // A skipped step, or a zero rate (the first warmup step), updates nothing: denom is then +inf
  // and m / denom = 0. Dividing by a zero step_size instead would make 0/0 = NaN wherever v = 0
  // (a parameter whose gradient has been exactly 0, e.g. the embedding of a class not yet seen).
  const auto no_update = skip.logical_or(step_size == 0);
  const auto denom_scale = at::where(no_update, 1.0, at::sqrt(1 - at::pow(b2, t)) * step_size);  // √(1 - β₂ᵗ) · step_size
  const auto eps_over_step = at::where(no_update, std::numeric_limits<double>::infinity(), opts_.eps / step_size);
  const auto decay = lr_t.defined() ? at::where(skip, 1.0, (1 - lr_t * weight_decay).to(at::kFloat))
                                    : at::where(skip, 1.0, 1 - lr * weight_decay);
  const auto beta1 = at::where(skip, 1.0, b1), beta2 = at::where(skip, 1.0, b2);
  if (impl_ == OptimizerImpl::foreach) {
    if (weight_decay != 0) at::_foreach_mul_(p, decay);
    at::_foreach_mul_(m, beta1);
    at::_foreach_add_(m, g, 1 - b1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - b2);
    auto denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, denom_scale);
    at::_foreach_add_(denom, eps_over_step);
    at::_foreach_addcdiv_(p, m, denom);
    return;
  }
  for (size_t i = 0; i < p.size(); ++i) {  // loop: the same ops, one tensor at a time
    if (weight_decay != 0) p[i].mul_(decay);
    m[i].mul_(beta1).add_(g[i], 1 - b1);
    v[i].mul_(beta2).addcmul_(g[i], g[i], 1 - b2);
    p[i].addcdiv_(m[i], (v[i].sqrt() / denom_scale).add_(eps_over_step));
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

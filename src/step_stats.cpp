#include "step_stats.h"

#include <ATen/ops/isfinite.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>

#include "difftrain/distributed.h"

namespace difftrain {

StepStats::StepStats(const c10::Device& device) {
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  loss_sum_ = at::zeros({}, fopts), grad_norm_sum_ = at::zeros({}, fopts);
  streak_ = at::zeros({}, fopts), max_streak_ = at::zeros({}, fopts), skipped_ = at::zeros({}, fopts);
  quartile_sum_ = at::zeros({4}, fopts), quartile_count_ = at::zeros({4}, fopts);
}

void StepStats::add_micro_batch(const at::Tensor& loss, const at::Tensor& per_sample, const at::Tensor& quartile) {
  c10::NoGradGuard no_grad;
  loss_sum_.add_(loss.detach());
  quartile_sum_.index_add_(0, quartile, per_sample.detach());
  quartile_count_.index_add_(0, quartile, at::ones_like(per_sample));
}

void StepStats::add_step(const at::Tensor& grad_norm, const at::Tensor& nonfinite, bool streak) {
  c10::NoGradGuard no_grad;
  if (streak) streak_.add_(nonfinite).mul_(nonfinite);  // consecutive non-finite steps
  max_streak_.copy_(at::maximum(max_streak_, streak_));
  skipped_.add_(nonfinite);
  grad_norm_sum_.add_(at::where(at::isfinite(grad_norm), grad_norm, 0.0));
}

void StepStats::all_reduce(ProcessGroup& group) {
  group.allreduce_sum({loss_sum_, quartile_sum_, quartile_count_});
  loss_sum_.div_(static_cast<double>(group.world().world_size));  // the mean over ranks
}

StepStats::Interval StepStats::take(int64_t steps) {
  Interval out;
  const auto n = static_cast<double>(steps);
  out.loss = loss_sum_.item<double>() / n;
  out.grad_norm = grad_norm_sum_.item<double>() / n;
  out.skipped = static_cast<int64_t>(skipped_.item<double>());
  const auto qs = quartile_sum_.cpu(), qc = quartile_count_.cpu();
  for (int q = 0; q < 4; ++q)
    if (const double c = qc[q].item<double>(); c > 0) out.loss_quartiles.emplace_back(q, qs[q].item<double>() / c);
  loss_sum_.zero_(), grad_norm_sum_.zero_(), quartile_sum_.zero_(), quartile_count_.zero_();
  return out;
}

double StepStats::max_streak() const { return max_streak_.item<double>(); }

}  // namespace difftrain

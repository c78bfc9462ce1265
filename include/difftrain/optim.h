// AdamW, the learning-rate schedules and gradient clipping: the optimizer half of a training
// step. Each follows the PyTorch / diffusers function it names, so numbers agree with them.
// Nothing here reads a tensor on the host (no device sync), in any implementation.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "difftrain/enums.h"
#include "difftrain/named_tensors.h"

namespace difftrain {

// ---------------------------------------------------------------------------------------------
// AdamW (Loshchilov & Hutter 2019, Algorithm 2) as torch.optim.AdamW computes it:
//   θ ← θ (1 - lr λ);  m ← β₁ m + (1-β₁) g;  v ← β₂ v + (1-β₂) g²
//   θ ← θ - lr/(1-β₁ᵗ) · m / (√v / √(1-β₂ᵗ) + ε)
struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;                  // λ, applied to the parameters for which decays() holds
  OptimizerImpl impl = OptimizerImpl::auto_;  // fused | foreach | loop; auto = fused
};

// Whether weight decay applies: matrices and convolution kernels do (dim >= 2), biases and
// GroupNorm scales do not (the usual split, e.g. nanoGPT and timm).
bool decays(const at::Tensor& param);

class AdamW {
 public:
  // `params` are named as in the model; state tensors are created next to them.
  AdamW(NamedTensors params, AdamWOptions opts);

  // One update at learning rate `lr` from the parameters' .grad(). When `found_inf` (0-d float on
  // the parameters' device) is 1, parameters and state stay as they were, decided on the device
  // in every implementation (foreach and loop zero the gradients of such a step in place).
  void step(double lr, const at::Tensor& found_inf = {});
  // The same update with the learning rate in a 0-d tensor on the parameters' device, of dtype
  // lr_dtype(), so that a captured CUDA graph reads a new rate on every replay (the rate is
  // written into the tensor before it). Bit-equal to step(double) wherever lr_dtype() is float64,
  // i.e. everywhere but the fused CUDA kernel, which reads a float32 rate.
  void step(const at::Tensor& lr, const at::Tensor& found_inf = {});
  at::ScalarType lr_dtype() const;
  void zero_grad();  // in place, so gradient buffers keep their addresses

  OptimizerImpl impl() const { return impl_; }
  const AdamWOptions& options() const { return opts_; }
  const std::vector<at::Tensor>& params() const { return params_; }

  // "exp_avg.<name>", "exp_avg_sq.<name>", "step.<name>" (as torch's state_dict holds them per param).
  NamedTensors state_dict() const;
  // Throws RuntimeError naming a missing key or a shape that differs.
  void load_state_dict(const std::map<std::string, at::Tensor>& state);

 private:
  // `lr_t` (a 0-d tensor) when defined, else `lr`.
  void step_group(const std::vector<size_t>& idx, double lr, const at::Tensor& lr_t, double weight_decay,
                  const at::Tensor& found_inf);

  AdamWOptions opts_;
  OptimizerImpl impl_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_, exp_avgs_, exp_avg_sqs_, steps_;  // steps_: 0-d float32 each
  std::vector<size_t> decay_idx_, no_decay_idx_;
};

// ---------------------------------------------------------------------------------------------
// The learning-rate factor for the optimizer step about to be taken (0-based), as diffusers'
// get_scheduler builds it (optimization.py): linear warmup from 0 over `warmup` steps, then
// constant, linear decay to 0 at `total`, or half a cosine to 0 at `total`.
double lr_lambda(LrSchedule schedule, int64_t step, int64_t warmup, int64_t total);

// ---------------------------------------------------------------------------------------------
// The global L2 norm of `grads` as a 0-d float tensor, and, when max_norm > 0, the gradients
// scaled in place by min(1, max_norm / (norm + 1e-6)): torch.nn.utils.clip_grad_norm_. No host
// sync. `foreach` = multi-tensor kernels, else one op per tensor.
at::Tensor clip_grad_norm_(const std::vector<at::Tensor>& grads, double max_norm, bool foreach = true);

}  // namespace difftrain

// Ancestral Euler sampling of the diffusion SDE in the σ parametrisation (Karras et al. 2022,
// arXiv 2206.00364, Algorithm 2 with the ancestral step of k-diffusion), with the names and
// arithmetic of diffusers' EulerAncestralDiscreteScheduler
// (schedulers/scheduling_euler_ancestral_discrete.py).
//
// The model sees x / √(σ² + 1) (the VP sample x_t) at a fractional timestep interpolated from the
// ᾱ table, and the sample starts at x_T = σ_max z. Each step moves along the ODE to σ_down, then adds
// fresh noise of σ_up, with σ_down² + σ_up² = σ_next². Scalars are float32 as diffusers takes them
// (difftrain/scalar_ops.h); the noise is drawn as diffusers' randn_tensor draws it.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "difftrain/scheduler.h"

namespace difftrain {

class EulerAncestralDiscreteScheduler {
 public:
  explicit EulerAncestralDiscreteScheduler(const SchedulerConfig& cfg);

  const SchedulerConfig& config() const { return cfg_; }
  // Lays out the timesteps (float32: np.linspace under "linspace", integers otherwise) and their σ
  // interpolated in the table (one more: 0 after the last), and resets the step index.
  void set_timesteps(int64_t num_inference_steps);
  const std::vector<float>& timesteps() const { return timesteps_; }
  const std::vector<float>& sigmas() const { return sigmas_; }
  int64_t num_inference_steps() const { return static_cast<int64_t>(timesteps_.size()); }
  int64_t step_index() const { return step_index_; }  // -1 before the first call

  // The standard deviation of x_T: σ_max, or √(σ_max² + 1) under "leading" spacing.
  float init_noise_sigma() const;
  // x / √(σ² + 1): the VP sample x_t the model was trained on.
  at::Tensor scale_model_input(const at::Tensor& sample, float timestep);
  // x̂₀ from the model output (ε: x - σ ε; v: the c_skip/c_out form of Salimans & Ho; x₀: the
  // output, which diffusers does not implement), d = (x - x̂₀)/σ, x ← x + d (σ_down - σ) + σ_up z
  // with z ~ N(0, I) from `generator` (drawn on its device and moved to the sample's, as
  // diffusers' randn_tensor does with a CPU generator).
  SchedulerOutput step(const at::Tensor& model_output, float timestep, const at::Tensor& sample,
                       std::optional<at::Generator> generator = std::nullopt);

  // Where t is in timesteps(): the second of several matches.
  int64_t index_for_timestep(float timestep) const;

 private:
  SchedulerConfig cfg_;
  std::vector<float> table_;  // σ at every training timestep (vp_sigmas)
  std::vector<float> timesteps_;
  std::vector<float> sigmas_;  // (n + 1)
  int64_t step_index_ = -1;
};

}  // namespace difftrain

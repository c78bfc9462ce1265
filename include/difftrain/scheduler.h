// Noise schedules and reverse steps with diffusers' names and math:
// DDPMScheduler (schedulers/scheduling_ddpm.py, Ho et al. 2020, arXiv 2006.11239) and
// DDIMScheduler (schedulers/scheduling_ddim.py, Song et al. 2021, arXiv 2010.02502), sharing one
// schedule; plus the training target and loss weighting for each prediction type.
//
// Tables (betas, alphas_cumprod) are float32 on the CPU, computed as diffusers computes them, so
// the numbers agree with diffusers to the last bit where the arithmetic allows.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "difftrain/config.h"

namespace difftrain {

// DDPMScheduler / DDIMScheduler constructor arguments (diffusers names and defaults).
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;                         // T
  double beta_start = 1e-4;                                   // β at t = 0 (linear, scaled_linear, sigmoid)
  double beta_end = 0.02;                                     // β at t = T-1
  BetaSchedule beta_schedule = BetaSchedule::linear;          // linear | scaled_linear | squaredcos_cap_v2 | sigmoid
  PredictionType prediction_type = PredictionType::epsilon;   // epsilon | v_prediction | sample
  VarianceType variance_type = VarianceType::fixed_small;     // DDPM only: fixed_small | fixed_small_log | fixed_large
  bool clip_sample = true;                                    // clamp x̂₀ to ±clip_sample_range while sampling
  double clip_sample_range = 1.0;
  TimestepSpacing timestep_spacing = TimestepSpacing::leading;  // leading | trailing | linspace
  int64_t steps_offset = 0;                                   // added to "leading" inference timesteps
  bool rescale_betas_zero_snr = false;                        // Lin et al. 2023, Algorithm 1
  bool set_alpha_to_one = true;                               // DDIM only: ᾱ before t = 0 is 1 (else ᾱ₀)

  static SchedulerConfig from(const DiffusionConfig& d);
};
using DDPMSchedulerConfig = SchedulerConfig;  // diffusers' two schedulers take the same arguments here
using DDIMSchedulerConfig = SchedulerConfig;

// β₀..β_{T-1} for the config's schedule, float32 (T).
at::Tensor make_betas(const SchedulerConfig& cfg);
// Rescales β so that ᾱ_{T-1} = 0 while keeping √ᾱ₀ (Lin et al. 2023, Algorithm 1).
at::Tensor rescale_zero_terminal_snr(const at::Tensor& betas);
// Inference timesteps for `n` steps, descending, as diffusers' set_timesteps lays them out.
std::vector<int64_t> inference_timesteps(const SchedulerConfig& cfg, int64_t n);
// The layout of DPMSolverMultistepScheduler and UniPCMultistepScheduler: "linspace" and "leading"
// place n + 1 points and drop the last (t = 0), "trailing" is the DDPM one.
std::vector<int64_t> multistep_inference_timesteps(const SchedulerConfig& cfg, int64_t n);

// ᾱ as diffusers' σ-parametrised schedulers (DPMSolverMultistep, UniPCMultistep,
// EulerAncestralDiscrete) hold it: with rescale_betas_zero_snr, ᾱ_{T-1} = 2^-24 instead of 0, so
// that σ_{T-1} is finite. (T) float32.
at::Tensor sigma_alphas_cumprod(const SchedulerConfig& cfg, const at::Tensor& alphas_cumprod);
// σ_t = √((1 - ᾱ_t) / ᾱ_t), the noise level of x_t / √ᾱ_t = x₀ + σ_t ε (Karras et al. 2022, §2 and
// Table 1, "VP"), in diffusers' float32 operations. (T) float32.
at::Tensor vp_sigmas(const at::Tensor& alphas_cumprod);

struct SchedulerOutput {
  at::Tensor prev_sample;           // x_{t-1}
  at::Tensor pred_original_sample;  // x̂₀
};

// The forward process q(x_t | x₀) and what training needs from it.
class NoiseSchedule {
 public:
  explicit NoiseSchedule(const SchedulerConfig& cfg);

  const SchedulerConfig& config() const { return cfg_; }
  const at::Tensor& betas() const { return betas_; }                    // (T) float32, CPU
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }  // ᾱ_t (T) float32, CPU

  // x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε  (Ho et al. eq. 4); timesteps (B) int64 on the samples' device.
  at::Tensor add_noise(const at::Tensor& original_samples, const at::Tensor& noise, const at::Tensor& timesteps) const;
  // v = √ᾱ_t ε - √(1-ᾱ_t) x₀  (Salimans & Ho 2022, §4).
  at::Tensor get_velocity(const at::Tensor& sample, const at::Tensor& noise, const at::Tensor& timesteps) const;
  // SNR(t) = ᾱ_t / (1 - ᾱ_t), (B) float32.
  at::Tensor snr(const at::Tensor& timesteps) const;

  // What the model learns to output for each prediction type: ε, v, or x₀.
  at::Tensor training_target(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const;
  // Per-sample loss weights (B): ones without snr_gamma; with it, min-SNR-γ (Hang et al. 2023)
  // expressed for the prediction type: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v,
  // min(SNR, γ) for x₀.
  at::Tensor loss_weights(const at::Tensor& timesteps, std::optional<double> snr_gamma) const;

  // Inference timesteps; before set_timesteps() they are T-1 .. 0.
  void set_timesteps(int64_t num_inference_steps);
  const std::vector<int64_t>& timesteps() const { return timesteps_; }
  int64_t num_inference_steps() const { return num_inference_steps_; }
  // diffusers' sampling interface, trivial here: x_T ~ N(0, I) and the model sees x_t unscaled.
  float init_noise_sigma() const { return 1.0f; }
  at::Tensor scale_model_input(const at::Tensor& sample, int64_t /*timestep*/) const { return sample; }
  // The timestep a reverse step from t lands on (negative: done). Here, as DDIM defines it:
  // t - T / num_inference_steps; DDPMScheduler takes the next entry of timesteps() instead.
  virtual int64_t previous_timestep(int64_t t) const;
  virtual ~NoiseSchedule() = default;

 protected:
  float alpha_prod(int64_t t) const;  // ᾱ_t as a float, for t in [0, T)
  const at::Tensor& table_on(const at::Device& device) const;  // ᾱ on that device, cached

  SchedulerConfig cfg_;
  at::Tensor betas_, alphas_cumprod_;
  std::vector<float> acp_;  // ᾱ_t on the host
  std::vector<int64_t> timesteps_;
  int64_t num_inference_steps_ = 0;
  mutable at::Tensor device_table_;
};

class DDPMScheduler : public NoiseSchedule {
 public:
  using NoiseSchedule::NoiseSchedule;
  // t - 1 before set_timesteps(); afterwards the entry after t in timesteps(), or -1 after the
  // last (diffusers' DDPMScheduler.previous_timestep). t must be one of the timesteps.
  int64_t previous_timestep(int64_t t) const override;
  // The variance of p(x_{t-1} | x_t) for the variance type (fixed_small: β̃_t, Ho et al. eq. 7;
  // fixed_small_log: its standard deviation; fixed_large: β_t).
  float get_variance(int64_t t) const;
  // One reverse step from x_t, following diffusers' stages; noise is drawn from `generator`.
  SchedulerOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample,
                       std::optional<at::Generator> generator = std::nullopt) const;
};

class DDIMScheduler : public NoiseSchedule {
 public:
  using NoiseSchedule::NoiseSchedule;
  // σ_t² / η² of Song et al. eq. 16.
  float get_variance(int64_t t, int64_t prev_t) const;
  // One DDIM step (Song et al. eq. 12) with σ_t = η √(get_variance).
  SchedulerOutput step(const at::Tensor& model_output, int64_t timestep, const at::Tensor& sample, double eta = 0.0,
                       std::optional<at::Generator> generator = std::nullopt, bool use_clipped_model_output = false) const;
};

// Per-sample diffusion loss (B): w(t) · mean over (C, H, W) of (model_output - target)², in
// float32, target and w as NoiseSchedule::training_target and loss_weights give them.
at::Tensor diffusion_loss(const at::Tensor& model_output, const at::Tensor& target, const at::Tensor& weights);

}  // namespace difftrain

// The EDM formulation of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
// Generative Models" (arXiv 2206.00364): the preconditioned denoiser, the training distribution of
// σ and the loss weight (Table 1, "Ours"), the σ schedule (eq. 5) and the deterministic and
// stochastic samplers (Algorithms 1 and 2), with the names and float32 arithmetic of diffusers'
// EDMEulerScheduler (schedulers/scheduling_edm_euler.py) where it implements the same thing.
//
//   x = y + σ n,  n ~ N(0, I)                        the noisy sample of data y at noise level σ
//   D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))    F is the UNet, c_noise its timestep
//   loss = λ(σ) ‖D(y + σ n; σ) - y‖²,  ln σ ~ N(P_mean, P_std²)
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "difftrain/config.h"

namespace difftrain {

// The diffusion.* keys EDM reads (Table 1 defaults).
struct EDMConfig {
  double sigma_min = 0.002;  // σ_min of the sampling schedule
  double sigma_max = 80.0;   // σ_max: x_0 ~ N(0, σ_max² I)
  double sigma_data = 0.5;   // σ_data, the data's standard deviation
  double rho = 7.0;          // ρ of eq. 5
  double p_mean = -1.2;      // ln σ ~ N(P_mean, P_std²) while training
  double p_std = 1.2;

  static EDMConfig from(const DiffusionConfig& d);
};

// The preconditioning of Table 1 at noise levels σ (any shape, float32; the results have its
// shape), in diffusers' operations (precondition_inputs / precondition_outputs / precondition_noise):
//   c_skip = σ_data² / (σ² + σ_data²),  c_out = σ σ_data / √(σ² + σ_data²),
//   c_in = 1 / √(σ² + σ_data²),         c_noise = ¼ ln σ.
struct EDMPreconditioning {
  at::Tensor c_skip, c_out, c_in, c_noise;
};
EDMPreconditioning edm_preconditioning(const at::Tensor& sigma, double sigma_data);

// λ(σ) = (σ² + σ_data²) / (σ σ_data)² (Table 1), which makes λ c_out² = 1: the network's own
// target (y - c_skip x)/c_out has unit weight at every σ.
at::Tensor edm_loss_weight(const at::Tensor& sigma, double sigma_data);

// σ = exp(P_mean + P_std z) for standard normal z (any shape).
at::Tensor edm_training_sigma(const at::Tensor& z, const EDMConfig& cfg);

// Which quartile of the training distribution of ln σ the draws z fall in (0: least noise), int64
// of z's shape: the quartiles of N(0, 1) are at ±0.6745 and 0.
at::Tensor edm_sigma_quartile(const at::Tensor& z);

// The sampling schedule: σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ for i < N and
// σ_N = 0 (eq. 5), N = num_inference_steps >= 1, descending, (N + 1) float32 on the CPU: computed in
// float64 and rounded as EDMEulerScheduler.set_timesteps does. N = 1 takes σ_max alone.
at::Tensor edm_sigmas(const EDMConfig& cfg, int64_t num_inference_steps);

// The stochastic sampler's settings (Algorithm 2); s_churn = 0 is the deterministic Algorithm 1.
struct EDMSamplerOptions {
  bool heun = true;      // the 2nd-order correction of Algorithm 1 (lines 9-11); false: Euler
  double s_churn = 0.0;  // γ_i = min(S_churn/N, √2 - 1) for σ_i in [s_tmin, s_tmax], else 0
  double s_tmin = 0.0;
  double s_tmax = std::numeric_limits<double>::infinity();
  double s_noise = 1.0;  // the added noise ε ~ N(0, S_noise² I)

  static EDMSamplerOptions from(const SamplingConfig& s);
};

// D(x; σ) for a batch x (B, C, H, W) at one noise level σ (float32 as the schedule holds it).
using EDMDenoiser = std::function<at::Tensor(const at::Tensor& x, float sigma)>;

// D(x; σ) from the raw network output F (precondition_outputs): c_skip x + c_out F, with the
// coefficients of edm_preconditioning at this σ (one element each).
at::Tensor edm_denoised(const at::Tensor& x, const at::Tensor& model_output, const EDMPreconditioning& c);

// The Euler step of EDMEulerScheduler.step: d = (x - D)/σ̂, x + d (σ_next - σ̂) (Algorithm 1,
// lines 5-6). x and denoised (B, C, H, W) float32.
at::Tensor edm_euler_step(const at::Tensor& x, const at::Tensor& denoised, float sigma_hat, float sigma_next);

// Runs Algorithm 2 (Algorithm 1 when s_churn = 0, Euler without `heun`) from x_0 = latents (the
// caller scales the noise by σ_0) over `sigmas` (N + 1, last 0), drawing the churn noise from
// `generator` on the samples' device. Returns x_N, float32 (B, C, H, W).
at::Tensor edm_sample(const EDMDenoiser& denoiser, const at::Tensor& latents, const at::Tensor& sigmas,
                      const EDMSamplerOptions& opts, std::optional<at::Generator> generator = std::nullopt);

// Network evaluations of one edm_sample over N steps: 2N - 1 with heun (none at σ_N = 0), N without.
int64_t edm_nfe(bool heun, int64_t num_inference_steps);

}  // namespace difftrain

#include "difftrain/edm.h"

#include <algorithm>
#include <cmath>

#include <ATen/ops/cat.h>
#include <ATen/ops/linspace.h>
#include <ATen/ops/log.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "difftrain/scalar_ops.h"

namespace difftrain {

using scalar_ops::aten_pow;

EDMConfig EDMConfig::from(const DiffusionConfig& d) {
  return {.sigma_min = d.sigma_min,
          .sigma_max = d.sigma_max,
          .sigma_data = d.sigma_data,
          .rho = d.rho,
          .p_mean = d.p_mean,
          .p_std = d.p_std};
}

EDMSamplerOptions EDMSamplerOptions::from(const SamplingConfig& s) {
  return {.heun = s.sampler != Sampler::euler,
          .s_churn = s.s_churn,
          .s_tmin = s.s_tmin,
          .s_tmax = s.s_tmax.value_or(std::numeric_limits<double>::infinity()),
          .s_noise = s.s_noise};
}

// diffusers writes `a / t` for a Python number a, which torch evaluates as reciprocal(t) * a.
EDMPreconditioning edm_preconditioning(const at::Tensor& sigma, double sigma_data) {
  const double sd2 = sigma_data * sigma_data;
  const auto s2 = sigma.pow(2) + sd2;  // σ² + σ_data²
  const auto root = s2.pow(0.5);
  return {.c_skip = at::reciprocal(s2) * sd2,
          .c_out = sigma * sigma_data / root,
          .c_in = at::reciprocal(root),
          .c_noise = at::log(sigma) * 0.25};
}

at::Tensor edm_loss_weight(const at::Tensor& sigma, double sigma_data) {
  return (sigma.pow(2) + sigma_data * sigma_data) / (sigma * sigma_data).pow(2);
}

at::Tensor edm_training_sigma(const at::Tensor& z, const EDMConfig& cfg) { return (z * cfg.p_std + cfg.p_mean).exp(); }

at::Tensor edm_sigma_quartile(const at::Tensor& z) {
  constexpr double q3 = 0.6744897501960817;  // Φ⁻¹(3/4)
  return (z > -q3).to(at::kLong) + (z > 0.0).to(at::kLong) + (z > q3).to(at::kLong);
}

at::Tensor edm_sigmas(const EDMConfig& cfg, int64_t n) {
  TORCH_CHECK(n >= 1, "edm_sigmas: num_inference_steps must be >= 1, got ", n);
  // EDMEulerScheduler._compute_karras_sigmas on torch.linspace(0, 1, n, float64), then float32.
  const double min_inv_rho = std::pow(cfg.sigma_min, 1 / cfg.rho), max_inv_rho = std::pow(cfg.sigma_max, 1 / cfg.rho);
  const auto ramp = at::linspace(0, 1, n, at::TensorOptions().dtype(at::kDouble));
  const auto sigmas = (ramp * (min_inv_rho - max_inv_rho) + max_inv_rho).pow(cfg.rho).to(at::kFloat);
  return at::cat({sigmas, at::zeros({1}, sigmas.options())});  // final_sigmas_type = "zero"
}

at::Tensor edm_denoised(const at::Tensor& x, const at::Tensor& model_output, const EDMPreconditioning& c) {
  return c.c_skip.item<float>() * x + c.c_out.item<float>() * model_output.to(at::kFloat);
}

namespace {
// dx/dσ = (x - D(x; σ))/σ (eq. 3 with σ(t) = t).
at::Tensor edm_derivative(const at::Tensor& x, const at::Tensor& denoised, float sigma) { return (x - denoised) / sigma; }
// x + d (σ_next - σ̂): the Euler step along the slope d.
at::Tensor euler_along(const at::Tensor& x, const at::Tensor& d, float sigma_hat, float sigma_next) {
  return x + d * (sigma_next - sigma_hat);
}
}  // namespace

at::Tensor edm_euler_step(const at::Tensor& x, const at::Tensor& denoised, float sigma_hat, float sigma_next) {
  return euler_along(x, edm_derivative(x, denoised, sigma_hat), sigma_hat, sigma_next);
}

at::Tensor edm_sample(const EDMDenoiser& denoiser, const at::Tensor& latents, const at::Tensor& sigmas_in,
                      const EDMSamplerOptions& opts, std::optional<at::Generator> generator) {
  const auto sigmas = sigmas_in.to(at::kFloat).cpu().contiguous();
  const int64_t N = sigmas.numel() - 1;
  TORCH_CHECK(N >= 1, "edm_sample: needs at least two σ (the last 0), got ", sigmas.numel());
  const float* s = sigmas.const_data_ptr<float>();
  const float gamma_max = static_cast<float>(std::min(opts.s_churn / static_cast<double>(N), std::sqrt(2.0) - 1));
  auto x = latents.to(at::kFloat);  // (B, C, H, W)
  for (int64_t i = 0; i < N; ++i) {
    const float sigma = s[i], sigma_next = s[i + 1];
    // Algorithm 2, lines 4-6: raise σ to σ̂ = σ (γ + 1) by adding noise of variance σ̂² - σ².
    const double level = sigma;
    const float gamma = opts.s_tmin <= level && level <= opts.s_tmax ? gamma_max : 0.0f;
    const float sigma_hat = sigma * (gamma + 1.0f);
    if (gamma > 0) {
      const auto eps = at::randn(x.sizes(), generator, x.options()) * opts.s_noise;
      x = x + eps * aten_pow(sigma_hat * sigma_hat - sigma * sigma, 0.5);
    }
    // Lines 7-8: the Euler step from σ̂ to σ_{i+1}.
    const auto d = edm_derivative(x, denoiser(x, sigma_hat), sigma_hat);
    auto x_next = euler_along(x, d, sigma_hat, sigma_next);
    // Lines 9-11: the trapezoidal correction, unless σ_{i+1} = 0.
    if (opts.heun && sigma_next != 0.0f) {
      const auto d_next = edm_derivative(x_next, denoiser(x_next, sigma_next), sigma_next);
      x_next = euler_along(x, d * 0.5 + d_next * 0.5, sigma_hat, sigma_next);
    }
    x = x_next;
  }
  return x;
}

int64_t edm_nfe(bool heun, int64_t n) { return heun ? 2 * n - 1 : n; }

}  // namespace difftrain

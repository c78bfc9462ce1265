// EDM (Karras et al. 2022): the preconditioning, loss weight, σ distribution and schedule against
// their closed forms (Table 1, eq. 5); the samplers (Algorithms 1 and 2) against hand-computed steps
// and oracle denoisers of a point mass and a Gaussian, whose probability-flow ODE has a closed-form
// solution; and against diffusers' EDMEulerScheduler (reference tensors made at test time by
// tests/reference/make_reference.py).
#include <cmath>
#include <iostream>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/edm.h"
#include "difftrain/sampling.h"
#include "difftrain/unet.h"
#include "numerics.h"
#include "reference.h"

namespace difftrain {
namespace {

using json = nlohmann::json;
using test::within_ulps;

at::Tensor d(const at::Tensor& t) { return t.abs().to(at::kDouble); }
at::Tensor f32(std::vector<float> v) { return torch::tensor(v, torch::kFloat); }

// ---------------------------------------------------------------------------------------------
// Closed forms.

// Each coefficient is a handful of float32 roundings of σ² + σ_data² and its root (pow, add,
// reciprocal or divide, multiply: at most 4u = 2ε relative, plus pow's own ≤ 1 ulp), so 4 ulps of
// the exact value; c_noise = ¼ ln σ is one log (≤ 1 ulp) and an exact ¼: 2 ulps, with |ln σ|
// near 0 measured against 1 (an ulp of ln σ near σ = 1 is that of σ itself).
TEST(EDM, PreconditioningIsTable1) {
  const std::vector<double> sigmas = {0.002, 0.05, 0.5, 0.9999, 1.0, 3.7, 80.0};
  for (const double sd : {0.5, 0.25, 1.0}) {
    std::vector<float> sf(sigmas.begin(), sigmas.end());
    const auto c = edm_preconditioning(f32(sf), sd);
    const auto lambda = edm_loss_weight(f32(sf), sd);
    for (size_t i = 0; i < sigmas.size(); ++i) {
      const double s = sf[i];  // the float32 σ the functions saw
      const double root = std::sqrt(s * s + sd * sd);
      const auto idx = static_cast<int64_t>(i);
      const std::string what = "σ = " + std::to_string(s) + ", σ_data = " + std::to_string(sd);
      auto near = [&](const at::Tensor& t, double want, double ulps, double scale) {
        return std::abs(t[idx].item<double>() - want) <= ulps * test::kFloatEps * scale;
      };
      EXPECT_TRUE(near(c.c_skip, sd * sd / (s * s + sd * sd), 4, sd * sd / (s * s + sd * sd))) << what << " c_skip";
      EXPECT_TRUE(near(c.c_out, s * sd / root, 4, s * sd / root)) << what << " c_out";
      EXPECT_TRUE(near(c.c_in, 1 / root, 4, 1 / root)) << what << " c_in";
      EXPECT_TRUE(near(c.c_noise, 0.25 * std::log(s), 2, 0.25 * std::max(std::abs(std::log(s)), 1.0))) << what << " c_noise";
      const double lam = (s * s + sd * sd) / (s * sd * s * sd);
      EXPECT_TRUE(near(lambda, lam, 6, lam)) << what << " λ";
      // λ c_out² = 1: the effective target of F has unit weight at every σ (Karras et al. §5).
      const double unit = lambda[idx].item<double>() * std::pow(c.c_out[idx].item<double>(), 2);
      EXPECT_NEAR(unit, 1.0, 14 * test::kFloatEps) << what;
    }
  }
}

// c_in and c_out are chosen so that the network's input and its effective target
// (y - c_skip x)/c_out have unit variance for data of standard deviation σ_data (Karras et al.,
// appendix B.6). Monte Carlo with n = 2^18 draws: the sample variance of a unit Gaussian has
// standard error √(2/n) ≈ 0.0028; 5 of them.
TEST(EDM, PreconditionedInputAndTargetHaveUnitVariance) {
  torch::manual_seed(7);
  const int64_t n = int64_t{1} << 18;
  const double sd = 0.5;
  for (const float sigma : {0.01f, 0.3f, 2.0f, 60.0f}) {
    const auto y = torch::randn({n}, torch::kDouble) * sd;
    const auto noise = torch::randn({n}, torch::kDouble) * sigma;
    const auto c = edm_preconditioning(torch::full({1}, sigma, torch::kDouble), sd);
    const auto x = y + noise;
    const double tol = 5 * std::sqrt(2.0 / static_cast<double>(n));
    EXPECT_NEAR((x * c.c_in).var().item<double>(), 1.0, tol) << sigma;
    EXPECT_NEAR(((y - c.c_skip * x) / c.c_out).var().item<double>(), 1.0, tol) << sigma;
  }
}

// ln σ = P_mean + P_std z; the quartiles of z are cut at Φ⁻¹(¼) = -0.6745, 0 and Φ⁻¹(¾).
TEST(EDM, TrainingSigmaAndItsQuartiles) {
  EXPECT_TRUE(torch::equal(edm_sigma_quartile(f32({-3.f, -0.7f, -0.67f, -0.1f, 0.f, 0.1f, 0.67f, 0.68f, 5.f})),
                           torch::tensor({0, 0, 1, 1, 1, 2, 2, 3, 3}, torch::kLong)));
  const EDMConfig cfg;
  const auto z = f32({-1.f, 0.f, 2.f});
  const auto sigma = edm_training_sigma(z, cfg);
  for (int64_t i = 0; i < 3; ++i) {
    const double want = std::exp(cfg.p_mean + cfg.p_std * z[i].item<double>());
    EXPECT_NEAR(sigma[i].item<double>(), want, 4 * test::kFloatEps * want) << i;
  }
}

// eq. 5: computed in float64 and rounded once, so within half an ulp (1 here) of the double value.
TEST(EDM, SigmaScheduleIsEq5) {
  for (const auto& [n, cfg] : std::vector<std::pair<int64_t, EDMConfig>>{
           {18, EDMConfig{}}, {2, EDMConfig{}}, {7, EDMConfig{.sigma_min = 0.01, .sigma_max = 10, .rho = 3}}}) {
    const auto s = edm_sigmas(cfg, n);
    ASSERT_EQ(s.numel(), n + 1);
    EXPECT_EQ(s[n].item<float>(), 0.0f);
    std::vector<double> want;
    for (int64_t i = 0; i < n; ++i) {
      const double a = std::pow(cfg.sigma_max, 1 / cfg.rho), b = std::pow(cfg.sigma_min, 1 / cfg.rho);
      want.push_back(std::pow(a + static_cast<double>(i) / static_cast<double>(n - 1) * (b - a), cfg.rho));
    }
    const auto w = torch::tensor(want, torch::kDouble);
    EXPECT_TRUE(within_ulps(s.slice(0, 0, n), w, w.abs(), 1)) << n;
    EXPECT_EQ(s[0].item<float>(), static_cast<float>(cfg.sigma_max));
    EXPECT_EQ(s[n - 1].item<float>(), static_cast<float>(cfg.sigma_min));
  }
  EXPECT_EQ(edm_sigmas(EDMConfig{}, 1)[0].item<float>(), 80.0f);  // one step: σ_max alone
}

// ---------------------------------------------------------------------------------------------
// Samplers with oracle denoisers.

// Data N(μ, s²) per element: D(x; σ) = μ + s²/(s² + σ²) (x - μ), and the probability-flow ODE
// dx/dσ = (x - D)/σ = σ (x - μ)/(s² + σ²) keeps (x - μ)/√(s² + σ²) constant.
struct Gaussian {
  double mu, s;
  int* calls = nullptr;
  at::Tensor operator()(const at::Tensor& x, float sigma) const {
    if (calls) ++*calls;
    const double sg = sigma;
    return mu + (x - mu) * (s * s / (s * s + sg * sg));
  }
  at::Tensor ode_end(const at::Tensor& x0, double sigma0) const {
    return mu + (x0 - mu) * (s / std::sqrt(s * s + sigma0 * sigma0));
  }
};

// Algorithm 1, lines 5-11, by hand in float64 for one step from σ₀ to σ₁ > 0, against edm_sample
// in float32 on the same start: each of the ~10 float32 operations rounds by u of values of the
// size of |x|, so 8 ulps of |x₀| + |x₁| cover them.
TEST(EDM, HeunStepIsTheTrapezoidalRule) {
  torch::manual_seed(1);
  const Gaussian D{0.3, 0.5};
  const auto x0 = torch::randn({2, 1, 3, 3}) * 7.0f;
  const float s0 = 7.0f, s1 = 2.5f;
  const auto out = edm_sample(D, x0, f32({s0, s1}), EDMSamplerOptions{});
  const auto xd = x0.to(torch::kDouble);
  const auto dd = (xd - D(xd, s0)) / static_cast<double>(s0);
  const auto x1 = xd + dd * static_cast<double>(s1 - s0);
  const auto d1 = (x1 - D(x1, s1)) / static_cast<double>(s1);
  const auto heun = xd + (dd + d1) * (0.5 * static_cast<double>(s1 - s0));
  EXPECT_TRUE(within_ulps(out, heun, d(xd) + d(heun), 8));
  // Euler: lines 5-6 alone.
  EDMSamplerOptions euler;
  euler.heun = false;
  EXPECT_TRUE(within_ulps(edm_sample(D, x0, f32({s0, s1}), euler), x1, d(xd) + d(x1), 8));
}

// A point mass at μ: D ≡ μ, every step scales x - μ by σ_{i+1}/σ_i and the last (to σ = 0) lands
// on μ up to the roundings of that step: a few u of |μ| plus |x_{N-1} - μ|, which is
// σ_{N-1}/σ₀ = 2.5e-5 of |x₀ - μ| < 5 σ₀.
TEST(EDM, SamplersRecoverAPointMass) {
  torch::manual_seed(2);
  const auto mu = torch::rand({1, 1, 4, 4}) * 1.6 - 0.8;
  const auto sigmas = edm_sigmas(EDMConfig{}, 18);
  for (const bool heun : {true, false}) {
    int calls = 0;
    const EDMDenoiser D = [&](const at::Tensor& x, float) {
      ++calls;
      return mu.expand_as(x);
    };
    EDMSamplerOptions o;
    o.heun = heun;
    const auto x = edm_sample(D, torch::randn({1, 1, 4, 4}) * sigmas[0].item<float>(), sigmas, o);
    EXPECT_TRUE(within_ulps(x, mu, d(mu) + 5 * 80.0 * 2.5e-5, 4)) << heun;
    EXPECT_EQ(calls, edm_nfe(heun, 18)) << heun;
  }
  EXPECT_EQ(edm_nfe(true, 18), 35);  // the paper's 35 evaluations for CIFAR-10
}

// A Gaussian: every sampler step is linear in x - μ, so x_N - μ = ĝ (x₀ - μ) against the exact
// ODE's g = s/√(s² + σ_max²), and e = |ĝ/g - 1| is the sampler's whole error. Heun's method is
// second order: doubling the steps divides e by about 4 (we accept > 3; 18 steps give 5.5% at
// s = 0.5, the error of Heun at eq. 5's steps for this narrow a distribution). The samples' mean
// and variance are then the push-forward of x₀ ~ N(0, σ_max²): mean μ(1 - ĝ), variance σ_max² ĝ²
// (not quite N(μ, s²), since x₀ ignores the data), checked against g within 5 standard errors of
// n draws (s/√n for the mean, var √(2/n) for the variance) plus what e moves them by.
TEST(EDM, HeunIsSecondOrderAndRecoversAGaussian) {
  const Gaussian D{0.4, 0.5};
  const EDMConfig cfg;
  const int64_t n = 1 << 16;
  auto gen = at::detail::createCPUGenerator(11);
  const auto z = torch::randn({n, 1, 1, 1}, gen);
  const double g = D.s / std::sqrt(D.s * D.s + cfg.sigma_max * cfg.sigma_max);
  std::vector<double> errors;
  for (const int64_t steps : {18, 36}) {
    const auto sigmas = edm_sigmas(cfg, steps);
    const auto x0 = z * sigmas[0].item<float>();
    const auto x = edm_sample(D, x0, sigmas, EDMSamplerOptions{}).to(torch::kDouble);
    const auto exact = D.ode_end(x0.to(torch::kDouble), cfg.sigma_max);
    const double e = ((x - D.mu).abs().sum() / (exact - D.mu).abs().sum()).item<double>() - 1;
    errors.push_back(std::abs(e));
    const double mean = D.mu * (1 - g), var = cfg.sigma_max * cfg.sigma_max * g * g;
    const double sn = std::sqrt(static_cast<double>(n)), a = std::abs(e);
    EXPECT_NEAR(x.mean().item<double>(), mean, 5 * D.s / sn + std::abs(D.mu) * g * a) << steps;
    EXPECT_NEAR(x.var().item<double>(), var, var * (5 * std::sqrt(2.0) / sn + 2 * a + a * a)) << steps;
  }
  std::cout << "Heun on a Gaussian: relative scale error " << errors[0] << " at 18 steps, " << errors[1] << " at 36\n";
  EXPECT_GT(errors[0] / errors[1], 3.0);
}

// Algorithm 2, lines 4-6, with D(x; σ) = x (so d = 0 and the step leaves x̂ as it is): the output
// is x + S_noise √(σ̂² - σ²) ε with σ̂ = σ(1 + γ), γ = min(S_churn/N, √2 - 1) inside
// [s_tmin, s_tmax] and 0 outside.
TEST(EDM, ChurnAddsTheNoiseOfAlgorithm2) {
  const EDMDenoiser identity = [](const at::Tensor& x, float) { return x; };
  const auto x = torch::randn({1, 2, 3, 3});
  const auto sigmas = f32({10.0f, 5.0f});  // one step, N = 1
  for (const double churn : {0.2, 40.0}) {
    EDMSamplerOptions o;
    o.heun = false;
    o.s_churn = churn;
    o.s_noise = 1.003;
    auto g = at::detail::createCPUGenerator(4), twin = at::detail::createCPUGenerator(4);
    const auto out = edm_sample(identity, x, sigmas, o, g);
    const double gamma = std::min(churn, std::sqrt(2.0) - 1), sigma_hat = 10.0 * (1 + gamma);
    const auto eps = torch::randn({1, 2, 3, 3}, twin);
    const auto want = x.to(torch::kDouble) + eps.to(torch::kDouble) * (1.003 * std::sqrt(sigma_hat * sigma_hat - 100.0));
    EXPECT_TRUE(within_ulps(out, want, d(x) + 2 * d(want), 4)) << churn;
    o.s_tmax = 9.0;  // σ = 10 outside: Algorithm 1
    EXPECT_TRUE(torch::equal(edm_sample(identity, x, sigmas, o, g), x)) << churn;
  }
}

// The stochastic sampler (S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1: the paper's ImageNet
// setting without its S_noise > 1) also recovers the Gaussian: the churn re-noises with the exact
// forward process and D is exact, so the same mean and variance hold within 5 standard errors
// plus the discretisation error: that of the deterministic sampler at the same step count, times
// 3 for the churned steps, which start at σ̂ ≤ √2 σ (Heun's local error grows as h³: 2√2).
TEST(EDM, StochasticSamplerRecoversAGaussian) {
  const Gaussian D{-0.2, 0.5};
  const EDMConfig cfg;
  const int64_t n = 1 << 16;
  const auto sigmas = edm_sigmas(cfg, 40);
  auto gen = at::detail::createCPUGenerator(12);
  const auto x0 = torch::randn({n, 1, 1, 1}, gen) * sigmas[0].item<float>();
  const double ode_err =
      (edm_sample(D, x0, sigmas, EDMSamplerOptions{}).to(torch::kDouble) - D.ode_end(x0.to(torch::kDouble), cfg.sigma_max))
          .abs()
          .max()
          .item<double>();
  EDMSamplerOptions o;
  o.s_churn = 40, o.s_tmin = 0.05, o.s_tmax = 50;
  const auto x = edm_sample(D, x0, sigmas, o, gen).to(torch::kDouble);
  const double r = D.s / std::sqrt(D.s * D.s + cfg.sigma_max * cfg.sigma_max);
  const double sn = std::sqrt(static_cast<double>(n));
  // With churn, x₀'s mismatch with N(μ, s² + σ_max²) is partly forgotten: the mean lies between μ(1 - r) and μ.
  const double err = 3 * ode_err;
  EXPECT_NEAR(x.mean().item<double>(), D.mu * (1 - r / 2), std::abs(D.mu) * r / 2 + 5 * D.s / sn + err);
  EXPECT_NEAR(x.var().item<double>(), D.s * D.s, 5 * D.s * D.s * std::sqrt(2.0) / sn + 2 * err * (D.s + err));
}

// ---------------------------------------------------------------------------------------------
// Against diffusers' EDMEulerScheduler.

// σ: the same float64 ATen operations, rounded once: equal. Timesteps: diffusers takes the log of
// the whole σ vector (a vectorised log, ≤ 1 ulp), we of each σ: within 2 ulps of |c_noise|.
TEST(EDMVsDiffusers, SigmasAndTimestepsMatchEDMEulerScheduler) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/edm.pt");
  const auto cases = test::load_json(dir + "/edm.json")["layouts"];
  for (const auto& c : cases) {
    EDMConfig cfg;
    if (c.contains("sigma_min")) cfg.sigma_min = c["sigma_min"];
    if (c.contains("sigma_max")) cfg.sigma_max = c["sigma_max"];
    if (c.contains("rho")) cfg.rho = c["rho"];
    const int64_t n = c["n"];
    const auto sigmas = edm_sigmas(cfg, n);
    const std::string key = c["key"];
    EXPECT_TRUE(torch::equal(sigmas, ref.at(key + ".sigmas")))
        << c.dump() << "\nours " << sigmas << "\ndiffusers " << ref.at(key + ".sigmas");
    std::vector<float> t;
    for (int64_t i = 0; i < n; ++i)
      t.push_back(edm_preconditioning(sigmas[i].reshape({1}), cfg.sigma_data).c_noise.item<float>());
    const auto want = ref.at(key + ".timesteps");
    EXPECT_TRUE(within_ulps(f32(t), want, d(want), 2)) << c.dump();
  }
}

// Each step fed diffusers' own sample and model output. c_in, c_skip and c_out are 0-dim float32
// ATen operations on both sides (equal); the input is one product (≤ 1 ulp apart for any
// coefficient difference of an ulp: 2); x̂₀ = c_skip x + c_out F rounds three times (4 ulps of
// c_skip|x| + c_out|F|); prev = x + (x - x̂₀)/σ dt adds four roundings of terms of size
// |x| + (|x| + |x̂₀|)|dt|/σ (6 ulps, with x̂₀'s own error carried by |dt|/σ ≤ 1).
TEST(EDMVsDiffusers, EulerStepsMatchEDMEulerScheduler) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/edm.pt");
  const auto cases = test::load_json(dir + "/edm.json")["trajectories"];
  int checked = 0, identical = 0;
  for (const auto& c : cases) {
    EDMConfig cfg;
    if (c.contains("sigma_data")) cfg.sigma_data = c["sigma_data"];
    if (c.contains("sigma_max")) cfg.sigma_max = c["sigma_max"];
    const int64_t n = c["n"];
    const auto sigmas = edm_sigmas(cfg, n);
    for (int64_t i = 0; i < n; ++i) {
      const std::string p = "traj." + std::to_string(c["i"].get<int>()) + "." + std::to_string(i) + ".";
      const std::string what = c.dump() + " step " + std::to_string(i);
      const auto x = ref.at(p + "sample"), m = ref.at(p + "model_output");
      const float sigma = sigmas[i].item<float>(), next = sigmas[i + 1].item<float>();
      const auto pre = edm_preconditioning(sigmas[i].reshape({}), cfg.sigma_data);
      const auto model_input = x * pre.c_in.item<float>();
      EXPECT_TRUE(within_ulps(model_input, ref.at(p + "model_input"), d(model_input), 2)) << what << " scale_model_input";
      const auto x0 = edm_denoised(x, m, pre);
      const auto want_x0 = ref.at(p + "pred_original_sample");
      EXPECT_TRUE(within_ulps(x0, want_x0, pre.c_skip.item<double>() * d(x) + pre.c_out.item<double>() * d(m), 4))
          << what << " x0";
      const auto prev = edm_euler_step(x, x0, sigma, next);
      const double ratio = std::abs(static_cast<double>(next) - static_cast<double>(sigma)) / static_cast<double>(sigma);
      EXPECT_TRUE(within_ulps(prev, ref.at(p + "prev_sample"), d(x) + (d(x) + d(want_x0)) * ratio, 6)) << what << " prev_sample";
      ++checked;
      identical += torch::equal(prev, ref.at(p + "prev_sample")) ? 1 : 0;
    }
  }
  EXPECT_EQ(checked, 24);
  std::cout << "EDM Euler: " << identical << " of " << checked << " steps bit-identical to diffusers\n";
}

// EDM's c_noise = ¼ ln σ is a float in about [-1.6, 1.1], negative below σ = 1: the embedding
// must take it as diffusers' get_timestep_embedding does (no rounding to integers, sign kept).
// Each entry is sin or cos of t·f with f = exp(-ln(10⁴) i/(half - shift)) to a few ulps: the
// argument is off by a few ε|t|, and sin/cos add an ulp: 4 ulps of |t| + 1.
TEST(EDMVsDiffusers, TimestepEmbeddingTakesFloatAndNegativeTimesteps) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/edm.pt");
  const auto t = torch::tensor(test::load_json(dir + "/edm.json")["embedding_timesteps"].get<std::vector<float>>());
  for (const auto& [flip, shift] : std::vector<std::pair<bool, int>>{{true, 0}, {false, 1}}) {
    const auto ours = timestep_embedding(t, 32, flip, shift);
    const auto want = ref.at("embedding." + std::to_string(flip ? 1 : 0) + "." + std::to_string(shift));
    EXPECT_TRUE(within_ulps(ours, want, (d(t) + 1).unsqueeze(1), 4)) << flip << " " << shift;
  }
}

}  // namespace
}  // namespace difftrain

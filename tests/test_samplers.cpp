// DPM-Solver++, UniPC and Euler ancestral against diffusers' DPMSolverMultistepScheduler,
// UniPCMultistepScheduler and EulerAncestralDiscreteScheduler (reference tensors made at test time
// by tests/reference/make_reference.py), and on their own with an oracle model.
#include <cmath>
#include <iostream>
#include <memory>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/euler_ancestral.h"
#include "difftrain/multistep.h"
#include "numerics.h"
#include "reference.h"

namespace difftrain {
namespace {

using json = nlohmann::json;
constexpr double u = test::kUnitRoundoff;

// Our DDPM config with a reference case's overrides (the keys diffusers' from_config took).
SchedulerConfig config_of(const json& c) {
  SchedulerConfig cfg;
  if (c.contains("timestep_spacing")) cfg.timestep_spacing = *enum_from_string<TimestepSpacing>(c["timestep_spacing"].get<std::string>());
  if (c.contains("steps_offset")) cfg.steps_offset = c["steps_offset"];
  if (c.contains("beta_schedule")) cfg.beta_schedule = *enum_from_string<BetaSchedule>(c["beta_schedule"].get<std::string>());
  if (c.contains("prediction_type"))
    cfg.prediction_type = *enum_from_string<PredictionType>(c["prediction_type"].get<std::string>());
  if (c.contains("rescale_betas_zero_snr")) cfg.rescale_betas_zero_snr = c["rescale_betas_zero_snr"];
  return cfg;
}

at::Tensor as_tensor(const std::vector<float>& v) { return torch::tensor(v, torch::kFloat); }
at::Tensor d(const at::Tensor& t) { return t.abs().to(at::kDouble); }

// ---------------------------------------------------------------------------------------------
// Against diffusers.

// Timesteps are integers (float32 for Euler ancestral): equal. σ: the non-Karras σ are entries of
// the float32 table ((1 - ᾱ)/ᾱ) ** 0.5 made by the same ATen operations (np.interp at integer or
// float32 timesteps is float64 arithmetic we repeat in its order); the Karras σ are float64 pow()
// of glibc on both sides (numpy's may differ by an ulp of a double, 2^-29 of a float32 ulp), then
// rounded to float32: equal unless a value falls within that of a rounding boundary, which for
// these few hundred values has a probability below 1e-6. So all are compared bit for bit, as the
// step tests below assume.
TEST(SamplersVsDiffusers, TimestepsAndSigmasMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/samplers.pt");
  const auto cases = test::load_json(dir + "/samplers.json")["layouts"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    const SchedulerConfig cfg = config_of(c);
    const std::string sampler = c["sampler"], what = c.dump();
    const int64_t n = c["n"];
    std::vector<float> sigmas;
    if (sampler == "euler_ancestral") {
      EulerAncestralDiscreteScheduler s(cfg);
      s.set_timesteps(n);
      EXPECT_EQ(s.timesteps(), c["timesteps"].get<std::vector<float>>()) << what;
      EXPECT_EQ(s.init_noise_sigma(), c["init_noise_sigma"].get<float>()) << what;
      sigmas = s.sigmas();
    } else {
      const bool karras = c["karras"];
      std::unique_ptr<MultistepScheduler> s;
      if (sampler == "dpm_solver_multistep") s = std::make_unique<DPMSolverMultistepScheduler>(cfg, 2, karras);
      else s = std::make_unique<UniPCMultistepScheduler>(cfg, 2, karras);
      s->set_timesteps(n);
      EXPECT_EQ(s->timesteps(), c["timesteps"].get<std::vector<int64_t>>()) << what;
      EXPECT_EQ(s->init_noise_sigma(), c["init_noise_sigma"].get<float>()) << what;
      sigmas = s->sigmas();
    }
    const auto want = ref.at(c["key"].get<std::string>() + ".sigmas");
    EXPECT_TRUE(torch::equal(as_tensor(sigmas), want)) << what << "\nours " << as_tensor(sigmas) << "\ndiffusers " << want;
  }
}

// Every step of whole trajectories, each fed diffusers' own sample and model output (and so the
// same history). A multistep update adds up to four tensors with coefficients from logs and exps
// of the σ schedule and, for UniPC, a small linear solve; its scalars are float32 in diffusers'
// operations on both sides (and bit-equal: TimestepsAndSigmasMatch). Rather than a count per
// formula, the step must be as accurate as diffusers' own float32 against the float64 evaluation
// of the same update (same float32 scalars, float64 tensors: make_reference.py's exact_multistep):
// tests/numerics.h as_accurate_as, with its factor 4 for a different summation order (the einsum
// of UniPC) and 2ε of the largest value.
void check_multistep(const std::string& sampler) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/samplers.pt");
  const auto cases = test::load_json(dir + "/samplers.json")["trajectories"];  // a copy: the parsed document is a temporary
  int checked = 0, identical = 0;
  for (const auto& c : cases) {
    if (c["sampler"] != sampler) continue;
    const SchedulerConfig cfg = config_of(c);
    const int64_t order = c["solver_order"];
    const bool karras = c["karras"];
    DPMSolverMultistepScheduler dpm(cfg, order, karras);
    UniPCMultistepScheduler unipc(cfg, order, karras);
    const bool is_dpm = sampler == "dpm_solver_multistep";
    MultistepScheduler& s = is_dpm ? static_cast<MultistepScheduler&>(dpm) : unipc;
    s.set_timesteps(c["n"]);
    std::vector<double> ts(s.timesteps().begin(), s.timesteps().end());
    ASSERT_EQ(ts, c["timesteps"].get<std::vector<double>>()) << c.dump();
    const std::string k = "traj." + std::to_string(c["i"].get<int>()) + ".";
    for (int64_t i = 0; i < c["steps"].get<int64_t>(); ++i) {
      const std::string p = k + std::to_string(i) + ".";
      const auto x = ref.at(p + "sample"), m = ref.at(p + "model_output");
      const int64_t t = s.timesteps()[static_cast<size_t>(i)];
      const auto out = is_dpm ? dpm.step(m, t, x) : unipc.step(m, t, x);
      EXPECT_TRUE(test::as_accurate_as(out.prev_sample, ref.at(p + "prev_sample"), ref.at(p + "exact")))
          << c.dump() << " step " << i << " (t = " << t << ")";
      ++checked;
      identical += torch::equal(out.prev_sample, ref.at(p + "prev_sample")) ? 1 : 0;
    }
  }
  EXPECT_GT(checked, 0);
  // Not a requirement (another ISA may round a kernel otherwise), but what the same operations give.
  std::cout << sampler << ": " << identical << " of " << checked << " steps bit-identical to diffusers\n";
}

TEST(SamplersVsDiffusers, DpmSolverMultistepStepsMatch) { check_multistep("dpm_solver_multistep"); }
TEST(SamplersVsDiffusers, UniPcMultistepStepsMatch) { check_multistep("unipc_multistep"); }

// Euler ancestral, with the noise drawn from a generator seeded as diffusers' was. The scalars
// (σ, σ_up, σ_down, c_out) are bit-equal on both sides (the same float32 ATen operations on equal
// σ); the bounds count the tensor roundings of one evaluation (u each) and double them for two:
//   scale_model_input x/√(σ²+1): one division, u of the result;
//   x̂₀ (ε) = x - σ m: a product and a difference, 2u (|x| + σ|m|);
//   x̂₀ (v) = m c_out + x/(σ²+1): three roundings, 3u (|c_out||m| + |x|/(σ²+1));
//   prev = x + ((x - x̂₀)/σ) dt + σ_up z with |dt| = σ - σ_down <= σ: the error of x̂₀ passes at most
//   once, and the subtraction, division, product, two additions and the noise product round by u
//   of |x| + |x̂₀| (twice: the derivative term is at most that) and σ_up |z|: per evaluation
//   3u (e(x̂₀)/3u + 2(|x| + |x̂₀|) + σ_up |z|).
TEST(SamplersVsDiffusers, EulerAncestralStepsMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/samplers.pt");
  const auto cases = test::load_json(dir + "/samplers.json")["trajectories"];  // a copy: the parsed document is a temporary
  int checked = 0, identical = 0;
  for (const auto& c : cases) {
    if (c["sampler"] != "euler_ancestral") continue;
    const SchedulerConfig cfg = config_of(c);
    EulerAncestralDiscreteScheduler s(cfg);
    s.set_timesteps(c["n"]);
    const int k = c["i"];
    auto gen = at::detail::createCPUGenerator(200 + k);  // diffusers' noise generator
    auto twin = at::detail::createCPUGenerator(200 + k);  // the same draws, for the bound
    const std::string pre = "traj." + std::to_string(k) + ".";
    EXPECT_TRUE(torch::equal(torch::randn({2, 3, 8, 8}, at::detail::createCPUGenerator(100 + k)) * s.init_noise_sigma(),
                             ref.at(pre + "x_T")))
        << "x_T = z σ_max";
    for (int64_t i = 0; i < c["steps"].get<int64_t>(); ++i) {
      const std::string p = pre + std::to_string(i) + ".", what = c.dump() + " step " + std::to_string(i);
      const auto x = ref.at(p + "sample"), m = ref.at(p + "model_output");
      const float t = s.timesteps()[static_cast<size_t>(i)];
      const auto x_in = s.scale_model_input(x, t);
      EXPECT_TRUE(test::within_ulps(x_in, ref.at(p + "model_input"), d(x_in), 1)) << what << " scale_model_input";
      const auto out = s.step(m, t, x, gen);
      const auto z = torch::randn({2, 3, 8, 8}, twin);
      const double sigma = s.sigmas()[static_cast<size_t>(i)], sigma_to = s.sigmas()[static_cast<size_t>(i) + 1];
      const double sigma_up = std::sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma));
      const auto want_x0 = ref.at(p + "pred_original_sample");
      at::Tensor x0_err;  // the bound of one evaluation of x̂₀
      if (cfg.prediction_type == PredictionType::epsilon) x0_err = 2 * u * (d(x) + sigma * d(m));
      else x0_err = 3 * u * (sigma / std::sqrt(sigma * sigma + 1) * d(m) + d(x) / (sigma * sigma + 1));
      EXPECT_TRUE(test::within_ulps(out.pred_original_sample, want_x0, 2 * x0_err / test::kFloatEps, 1)) << what << " x0";
      const auto prev_err = x0_err + 3 * u * (2 * (d(x) + d(want_x0)) + sigma_up * d(z));
      EXPECT_TRUE(test::within_ulps(out.prev_sample, ref.at(p + "prev_sample"), 2 * prev_err / test::kFloatEps, 1))
          << what << " prev_sample";
      ++checked;
      identical += torch::equal(out.prev_sample, ref.at(p + "prev_sample")) ? 1 : 0;
    }
  }
  EXPECT_GT(checked, 0);
  std::cout << "euler_ancestral: " << identical << " of " << checked << " steps bit-identical to diffusers\n";
}

// ---------------------------------------------------------------------------------------------
// On their own.

// diffusers has no x₀ prediction for Euler ancestral; ours takes the output as x̂₀. Given the x̂₀
// an ε model implies (x - σ ε, the same float32 operation), the step is bit for bit the ε step.
TEST(Samplers, EulerAncestralSamplePredictionIsTheEpsilonStep) {
  SchedulerConfig eps_cfg, x0_cfg;
  x0_cfg.prediction_type = PredictionType::sample;
  EulerAncestralDiscreteScheduler eps(eps_cfg), x0(x0_cfg);
  eps.set_timesteps(6), x0.set_timesteps(6);
  auto g1 = at::detail::createCPUGenerator(3), g2 = at::detail::createCPUGenerator(3);
  auto x = torch::randn({1, 2, 4, 4}) * eps.init_noise_sigma(), y = x.clone();
  torch::manual_seed(1);
  for (size_t i = 0; i < eps.timesteps().size(); ++i) {
    const float t = eps.timesteps()[i];
    const auto m = torch::randn({1, 2, 4, 4});
    const auto a = eps.step(m, t, x, g1);
    const auto b = x0.step(x - eps.sigmas()[i] * m, t, y, g2);
    EXPECT_TRUE(torch::equal(a.prev_sample, b.prev_sample)) << i;
    x = a.prev_sample, y = b.prev_sample;
  }
}

// The data are one image x*: the exact ε of x_t = α x* + σ_t ε is (x_t - α x*)/σ_t, and every
// sampler must land on x*. The last step returns x̂₀ = (x - σ_t ε)/α_t (its σ is 0), which rounds
// within a few u of (|x| + |x*|)/α_t: 8 ulps of that scale.
TEST(Samplers, OracleSamplersRecoverAPointMass) {
  torch::manual_seed(3);
  const auto x_star = torch::rand({1, 1, 4, 4}) * 1.6 - 0.8;
  for (const char* name : {"dpm2", "dpm3", "dpm3_karras", "unipc2", "unipc3", "euler_ancestral"}) {
    const std::string sampler = name;
    SchedulerConfig cfg;
    cfg.timestep_spacing = TimestepSpacing::linspace;
    auto x = torch::randn({1, 1, 4, 4});
    at::Tensor scale;
    if (sampler == "euler_ancestral") {
      EulerAncestralDiscreteScheduler s(cfg);
      s.set_timesteps(12);
      x = x * s.init_noise_sigma();
      auto gen = at::detail::createCPUGenerator(5);
      for (size_t i = 0; i < s.timesteps().size(); ++i) {
        const float sigma = s.sigmas()[i];
        const auto eps = (x - x_star) / sigma;  // the ε of x = x* + σ ε
        scale = d(x) + d(x_star);
        x = s.step(eps, s.timesteps()[i], x, gen).prev_sample;
      }
    } else {
      const int64_t order = sampler.back() == 's' ? 3 : sampler.back() - '0';
      std::unique_ptr<MultistepScheduler> s;
      if (sampler.starts_with("dpm")) s = std::make_unique<DPMSolverMultistepScheduler>(cfg, order, sampler.ends_with("karras"));
      else s = std::make_unique<UniPCMultistepScheduler>(cfg, order, false);
      s->set_timesteps(8);
      for (size_t i = 0; i < s->timesteps().size(); ++i) {
        const double sg = s->sigmas()[i], alpha = 1 / std::sqrt(sg * sg + 1), sigma_t = sg * alpha;
        const auto eps = (x - alpha * x_star) / sigma_t;
        scale = (d(x) + d(x_star)) / alpha;
        const int64_t t = s->timesteps()[i];
        x = sampler.starts_with("dpm") ? static_cast<DPMSolverMultistepScheduler&>(*s).step(eps, t, x).prev_sample
                                       : static_cast<UniPCMultistepScheduler&>(*s).step(eps, t, x).prev_sample;
      }
    }
    EXPECT_TRUE(test::within_ulps(x, x_star, scale, 8)) << sampler;
  }
}

TEST(Samplers, StepsFollowDiffusersOrderSchedule) {
  // DPM-Solver++ 3M with 10 steps: orders 1, 2, 3, ..., 3, then 2 (n < 15) and 1 at the end; a
  // second set_timesteps starts again from order 1. Checked through the equivalence of the first
  // step with DDIM: the first-order update is DDIM η = 0 in λ (Lu et al. 2022, §3.1).
  SchedulerConfig cfg;
  cfg.clip_sample = false;
  DPMSolverMultistepScheduler dpm(cfg, 3);
  dpm.set_timesteps(10);
  EXPECT_EQ(dpm.timesteps(), (std::vector<int64_t>{900, 810, 720, 630, 540, 450, 360, 270, 180, 90}));  // leading, T // 11
  EXPECT_EQ(dpm.sigmas().size(), 11u);
  EXPECT_EQ(dpm.sigmas().back(), 0.0f);
  torch::manual_seed(0);
  const auto x = torch::randn({1, 1, 4, 4}), m = torch::randn({1, 1, 4, 4});
  const auto first = dpm.step(m, 900, x).prev_sample;
  // DDIM from ᾱ_900 to ᾱ_810: √ᾱ_prev x̂₀ + √(1 - ᾱ_prev) ε.
  const NoiseSchedule ns(cfg);
  const double ab = ns.alphas_cumprod()[900].item<double>(), ab_prev = ns.alphas_cumprod()[810].item<double>();
  const auto x0 = (x.to(at::kDouble) - std::sqrt(1 - ab) * m.to(at::kDouble)) / std::sqrt(ab);
  const auto ddim = std::sqrt(ab_prev) * x0 + std::sqrt(1 - ab_prev) * m.to(at::kDouble);
  // float32 against the float64 formula: a handful of roundings of the terms, each within ~8u.
  EXPECT_TRUE(test::within_ulps(first, ddim, (d(x) + d(m)) / std::sqrt(ab), 16));
  dpm.set_timesteps(10);
  EXPECT_EQ(dpm.step_index(), -1);
  EXPECT_TRUE(torch::equal(dpm.step(m, 900, x).prev_sample, first)) << "set_timesteps resets the history";
}

}  // namespace
}  // namespace difftrain

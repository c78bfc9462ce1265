// DDPM / DDIM schedulers against diffusers (reference tensors made at test time), closed forms,
// values pinned by diffusers' own tests, inversion, and an oracle sampler.
#include <cmath>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/scheduler.h"
#include "numerics.h"
#include "reference.h"

namespace difftrain {
namespace {

SchedulerConfig make(const std::string& schedule, const std::string& pred = "epsilon", const std::string& var = "fixed_small",
                     bool clip = true) {
  SchedulerConfig c;
  c.beta_schedule = *enum_from_string<BetaSchedule>(schedule);
  c.prediction_type = *enum_from_string<PredictionType>(pred);
  c.variance_type = *enum_from_string<VarianceType>(var);
  c.clip_sample = clip;
  return c;
}

using test::kFloatEps;
constexpr double u = test::kUnitRoundoff;

// Bounds on |ours - diffusers| for one reverse step, from its formulas (tests/numerics.h). Both
// sides run the same float32 operations in the same order on the same ᾱ table (TablesMatch:
// equal), so their scalars agree exactly except where a square root, log or exp is taken: a
// library's (MKL, Sleef) is within 1 ulp (2u), ours (std::sqrt) is correctly rounded. The counts
// below add the roundings of one evaluation and double them for two.
struct StepBounds {
  at::Tensor x0, prev;  // element-wise bounds on pred_original_sample and prev_sample, float64
};

// x̂₀ and its bound, for a prediction type. x, m: sample and model output in float64.
at::Tensor x0_bound(PredictionType p, double ab, const at::Tensor& x, const at::Tensor& m) {
  const double sa = std::sqrt(ab), sb = std::sqrt(1 - ab);
  switch (p) {
    case PredictionType::epsilon:  // (x - √β̄ m) / √ᾱ: sqrt 2u, mul u, sub u, sqrt 2u, div u = 7u, relative to
      return 2 * 7 * u * (x.abs() + sb * m.abs()) / sa;  // the terms over √ᾱ (the 1/√ᾱ ≈ 157 of t = 999)
    case PredictionType::v_prediction:                   // √ᾱ x - √β̄ m: two sqrt 2u, two mul u, sub u
      return 2 * 4 * u * (sa * x.abs() + sb * m.abs());
    case PredictionType::sample: return at::zeros_like(x);  // x̂₀ = m, exactly
  }
  return {};
}

// Relative error bound of σ from one evaluation: sqrt 2u; exp(½ log v) (fixed_small_log) moves by
// the log's 2u error of |log v| plus the exp's 2u.
double sigma_rel(VarianceType v, double variance) {
  return v == VarianceType::fixed_small_log ? (std::fabs(std::log(variance)) + 2) * 2 * u : 2 * u;
}

// DDPM (formula (7) of arXiv 2006.11239): prev = c0 x̂₀ + c1 x + σ z, c0 = √ᾱ_{t-1} β_t / β̄_t,
// c1 = √α_t β̄_{t-1} / β̄_t, each a sqrt (2u), a mul and a div (u each); two muls and two adds.
StepBounds ddpm_bounds(const DDPMScheduler& s, const SchedulerConfig& cfg, int64_t t, const at::Tensor& x, const at::Tensor& m,
                       const at::Tensor& x0, const at::Tensor& z) {
  const int64_t prev_t = s.previous_timestep(t);
  const double ab = s.alphas_cumprod()[t].item<double>(), ab_prev = prev_t >= 0 ? s.alphas_cumprod()[prev_t].item<double>() : 1.0;
  const double beta = 1 - ab / ab_prev, c0 = std::sqrt(ab_prev) * beta / (1 - ab),
               c1 = std::sqrt(ab / ab_prev) * (1 - ab_prev) / (1 - ab);
  StepBounds b;
  b.x0 = x0_bound(cfg.prediction_type, ab, x, m);
  b.prev = c0 * b.x0 + 2 * 7 * u * (c0 * x0.abs() + c1 * x.abs());
  if (t > 0) {
    const double variance = s.get_variance(t);
    const double sigma = cfg.variance_type == VarianceType::fixed_small_log ? variance : std::sqrt(variance);
    b.prev = b.prev + 2 * (sigma_rel(cfg.variance_type, variance) + 2 * u) * sigma * z.abs();
  }
  return b;
}

// DDIM (formula (12) of arXiv 2010.02502): prev = √ᾱ_prev x̂₀ + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
// σ = η √((β̄_prev / β̄_t)(1 - ᾱ_t / ᾱ_prev)).
StepBounds ddim_bounds(const DDIMScheduler& s, const SchedulerConfig& cfg, int64_t t, double eta, const at::Tensor& x,
                       const at::Tensor& m, const at::Tensor& x0, const at::Tensor& z) {
  const int64_t prev_t = s.previous_timestep(t);
  const double ab = s.alphas_cumprod()[t].item<double>();
  const double ab_prev = prev_t >= 0 ? s.alphas_cumprod()[prev_t].item<double>()
                                     : (cfg.set_alpha_to_one ? 1.0 : s.alphas_cumprod()[0].item<double>());
  const double sa = std::sqrt(ab), sb = std::sqrt(1 - ab);
  const double sigma = eta * std::sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev));
  const double dir2 = 1 - ab_prev - sigma * sigma, dir = std::sqrt(dir2);
  // ε̂ and its bound: the model output itself, or derived as x̂₀ is.
  at::Tensor eps, eps_bound;
  switch (cfg.prediction_type) {
    case PredictionType::epsilon: eps = m, eps_bound = at::zeros_like(m); break;
    case PredictionType::sample:  // (x - √ᾱ m) / √β̄, from the unclipped x̂₀ = m
      eps = (x - sa * m) / sb, eps_bound = 2 * 7 * u * (x.abs() + sa * m.abs()) / sb;
      break;
    case PredictionType::v_prediction:  // √ᾱ m + √β̄ x
      eps = sa * m + sb * x, eps_bound = 2 * 4 * u * (sa * m.abs() + sb * x.abs());
      break;
  }
  // σ: sqrt 2u and the η mul u, so σ² is within 7u; 1 - ᾱ_prev - σ² rounds twice more (u of each
  // operand); its sqrt halves that relative error and adds 2u.
  const double sigma_err = 3 * u,
               dir_err = dir > 0 ? 0.5 * (u * (1 - ab_prev) + 7 * u * sigma * sigma + u * dir2) / dir2 + 2 * u : 0;
  StepBounds b;
  b.x0 = x0_bound(cfg.prediction_type, ab, x, m);
  b.prev = std::sqrt(ab_prev) * b.x0 + dir * eps_bound +
           2 * ((3 * u + 2 * u) * std::sqrt(ab_prev) * x0.abs() + (dir_err + 3 * u) * dir * eps.abs());
  if (eta > 0) b.prev = b.prev + 2 * (sigma_err + 3 * u) * sigma * z.abs();
  return b;
}

::testing::AssertionResult within(const at::Tensor& got, const at::Tensor& want, const at::Tensor& bound) {
  return test::within_ulps(got, want, bound / kFloatEps, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Against diffusers.

TEST(SchedulerVsDiffusers, TablesMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/scheduler.pt");
  const auto cases = test::load_json(dir + "/scheduler.json")["tables"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    SchedulerConfig cfg = make(c["beta_schedule"]);
    cfg.rescale_betas_zero_snr = c["rescale_betas_zero_snr"];
    const NoiseSchedule s(cfg);
    const std::string key = c["key"];
    // The same float32 operations of the same library in the same environment (the reference is
    // made at test time): bit for bit, which the step bounds below rely on.
    EXPECT_TRUE(torch::equal(s.betas(), ref.at(key + ".betas")))
        << key << " betas: max abs error " << (s.betas() - ref.at(key + ".betas")).abs().max().item<double>();
    EXPECT_TRUE(torch::equal(s.alphas_cumprod(), ref.at(key + ".alphas_cumprod")))
        << key << " alphas_cumprod: max abs error "
        << (s.alphas_cumprod() - ref.at(key + ".alphas_cumprod")).abs().max().item<double>();
  }
}

TEST(SchedulerVsDiffusers, InferenceTimestepsMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto cases = test::load_json(dir + "/scheduler.json")["timesteps"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    SchedulerConfig cfg;
    cfg.timestep_spacing = *enum_from_string<TimestepSpacing>(c["spacing"].get<std::string>());
    cfg.steps_offset = c["steps_offset"];
    NoiseSchedule s(cfg);
    s.set_timesteps(c["n"]);
    EXPECT_EQ(s.timesteps(), c["timesteps"].get<std::vector<int64_t>>()) << c["scheduler"] << " " << c["spacing"] << " n=" << c["n"];
  }
}

TEST(SchedulerVsDiffusers, AddNoiseAndVelocityMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/scheduler.pt");
  const auto cases = test::load_json(dir + "/scheduler.json")["noise"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    const std::string schedule = c["beta_schedule"];
    const NoiseSchedule s(make(schedule));
    const auto x0 = ref.at("noise.x0"), noise = ref.at("noise.noise"), ts = ref.at("noise.timesteps");
    // √ᾱ x₀ + √β̄ ε and √ᾱ ε - √β̄ x₀: per evaluation two sqrt (2u), two mul and an add (u): 7u of
    // √ᾱ|a| + √β̄|b|, twice.
    const auto ab = s.alphas_cumprod().to(at::kDouble).index_select(0, ts).reshape({-1, 1, 1, 1});
    const auto scale = ab.sqrt() * x0.abs().to(at::kDouble) + (1 - ab).sqrt() * noise.abs().to(at::kDouble);
    const auto scale_v = ab.sqrt() * noise.abs().to(at::kDouble) + (1 - ab).sqrt() * x0.abs().to(at::kDouble);
    EXPECT_TRUE(test::within_ulps(s.add_noise(x0, noise, ts), ref.at("noise." + schedule + ".add_noise"), scale, 7))
        << schedule << " add_noise";
    EXPECT_TRUE(test::within_ulps(s.get_velocity(x0, noise, ts), ref.at("noise." + schedule + ".velocity"), scale_v, 7))
        << schedule << " get_velocity";
  }
}

TEST(SchedulerVsDiffusers, DdpmStepsMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/scheduler.pt");
  const auto cases = test::load_json(dir + "/scheduler.json")["ddpm"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    SchedulerConfig cfg = make(c["beta_schedule"], c["prediction_type"], c["variance_type"], c["clip"]);
    cfg.timestep_spacing = *enum_from_string<TimestepSpacing>(c["spacing"].get<std::string>());
    DDPMScheduler s(cfg);
    if (!c["n"].is_null()) s.set_timesteps(c["n"]);
    const int64_t t = c["t"];
    const std::string what = "ddpm case " + c.dump();
    // The same float32 operations on both sides, but for the log and exp of fixed_small_log.
    const double variance = c["variance"].get<double>();
    EXPECT_NEAR(s.get_variance(t), variance, 2 * sigma_rel(cfg.variance_type, variance) * variance) << what;
    const auto x = ref.at("step.sample"), m = ref.at("step.model_output");
    const auto out = s.step(m, t, x, at::detail::createCPUGenerator(7));
    const std::string i = std::to_string(c["i"].get<int>());
    const auto want_x0 = ref.at("ddpm." + i + ".pred_original_sample");
    const auto z = at::randn(m.sizes(), at::detail::createCPUGenerator(7), m.options());  // the step's own draw
    const auto b = ddpm_bounds(s, cfg, t, x.to(at::kDouble), m.to(at::kDouble), want_x0.to(at::kDouble), z.to(at::kDouble));
    EXPECT_TRUE(within(out.pred_original_sample, want_x0, b.x0)) << what << " x0";
    EXPECT_TRUE(within(out.prev_sample, ref.at("ddpm." + i + ".prev_sample"), b.prev)) << what << " prev_sample";
  }
}

TEST(SchedulerVsDiffusers, DdimStepsMatch) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = test::load_tensors(dir + "/scheduler.pt");
  const auto cases = test::load_json(dir + "/scheduler.json")["ddim"];  // a copy: the parsed document is a temporary
  ASSERT_GT(cases.size(), 0u);
  for (const auto& c : cases) {
    SchedulerConfig cfg = make(c["beta_schedule"], c["prediction_type"], "fixed_small", c["clip"]);
    cfg.set_alpha_to_one = c["set_alpha_to_one"];
    DDIMScheduler s(cfg);
    s.set_timesteps(c["n"]);
    const auto x = ref.at("step.sample"), m = ref.at("step.model_output");
    const int64_t t = c["t"];
    const double eta = c["eta"];
    const auto out = s.step(m, t, x, eta, at::detail::createCPUGenerator(11));
    const std::string i = std::to_string(c["i"].get<int>()), what = "ddim case " + c.dump();
    const auto want_x0 = ref.at("ddim." + i + ".pred_original_sample");
    const auto z = at::randn(m.sizes(), at::detail::createCPUGenerator(11), m.options());  // the step's own draw
    const auto b = ddim_bounds(s, cfg, t, eta, x.to(at::kDouble), m.to(at::kDouble), want_x0.to(at::kDouble), z.to(at::kDouble));
    EXPECT_TRUE(within(out.pred_original_sample, want_x0, b.x0)) << what << " x0";
    EXPECT_TRUE(within(out.prev_sample, ref.at("ddim." + i + ".prev_sample"), b.prev)) << what << " prev_sample";
  }
}

// ---------------------------------------------------------------------------------------------
// On its own.

TEST(Scheduler, BetasFollowTheirClosedForms) {
  const int64_t T = 1000;
  const NoiseSchedule linear(make("linear")), scaled(make("scaled_linear")), cosine(make("squaredcos_cap_v2")),
      sigmoid(make("sigmoid"));
  for (int64_t t : {0, 1, 250, 500, 998, 999}) {
    const double f = static_cast<double>(t) / static_cast<double>(T - 1);
    EXPECT_NEAR(linear.betas()[t].item<double>(), 1e-4 + (0.02 - 1e-4) * f, 1e-8) << t;
    const double sq = std::sqrt(1e-4) + (std::sqrt(0.02) - std::sqrt(1e-4)) * f;
    EXPECT_NEAR(scaled.betas()[t].item<double>(), sq * sq, 1e-8) << t;
    EXPECT_NEAR(sigmoid.betas()[t].item<double>(), 1 / (1 + std::exp(-(-6 + 12 * f))) * (0.02 - 1e-4) + 1e-4, 1e-8) << t;
  }
  // Cosine (Nichol & Dhariwal eq. 17): ᾱ_t telescopes to ᾱ((t+1)/T) / ᾱ(0) while β is below its 0.999 cap.
  auto alpha_bar = [](double s) { return std::pow(std::cos((s + 0.008) / 1.008 * M_PI / 2), 2); };
  for (int64_t t : {0, 10, 500, 900, 990})
    EXPECT_NEAR(cosine.alphas_cumprod()[t].item<double>(), alpha_bar(static_cast<double>(t + 1) / T) / alpha_bar(0), 2e-5) << t;
  EXPECT_FLOAT_EQ(cosine.betas()[T - 1].item<float>(), 0.999f);  // the cap binds at the end
  // ᾱ is the running product of 1 - β.
  EXPECT_NEAR(linear.alphas_cumprod()[T - 1].item<double>(), [&] {
    double p = 1;
    for (int64_t t = 0; t < T; ++t) p *= 1 - (1e-4 + (0.02 - 1e-4) * static_cast<double>(t) / static_cast<double>(T - 1));
    return p;
  }(), 1e-7);
}

TEST(Scheduler, ZeroTerminalSnr) {
  SchedulerConfig c = make("scaled_linear", "v_prediction");
  const NoiseSchedule plain(c);
  c.rescale_betas_zero_snr = true;
  const NoiseSchedule rescaled(c);
  EXPECT_NEAR(rescaled.alphas_cumprod()[-1].item<double>(), 0.0, 1e-12);                                   // SNR(T) = 0
  EXPECT_NEAR(rescaled.alphas_cumprod()[0].item<double>(), plain.alphas_cumprod()[0].item<double>(), 1e-6);  // √ᾱ₀ kept
}

TEST(Scheduler, ConfigSectionMapsOntoTheScheduler) {
  const Config cfg = load_config("", {"diffusion.steps_offset=1", "diffusion.beta_schedule=sigmoid", "diffusion.clip_sample=false",
                                      "diffusion.prediction_type=sample", "diffusion.variance_type=fixed_large",
                                      "diffusion.num_train_timesteps=500", "diffusion.clip_sample_range=2"});
  const SchedulerConfig s = SchedulerConfig::from(cfg.diffusion);
  EXPECT_EQ(s.num_train_timesteps, 500);
  EXPECT_EQ(s.beta_schedule, BetaSchedule::sigmoid);
  EXPECT_EQ(s.prediction_type, PredictionType::sample);
  EXPECT_EQ(s.variance_type, VarianceType::fixed_large);
  EXPECT_FALSE(s.clip_sample);
  EXPECT_EQ(s.clip_sample_range, 2.0);
  NoiseSchedule n(s);
  n.set_timesteps(5);
  EXPECT_EQ(n.timesteps(), (std::vector<int64_t>{401, 301, 201, 101, 1}));  // leading, T // n = 100, plus the offset
}

// Values diffusers' own tests pin (tests/schedulers/test_scheduler_ddpm.py, test_variance).
TEST(Scheduler, PinnedDdpmVariances) {
  const DDPMScheduler s(make("linear"));
  EXPECT_NEAR(s.get_variance(0), 0.0, 1e-5);
  EXPECT_NEAR(s.get_variance(487), 0.00979, 1e-5);
  EXPECT_NEAR(s.get_variance(999), 0.02, 1e-5);
}

TEST(Scheduler, AddNoiseInvertsForEveryPredictionType) {
  torch::manual_seed(0);
  const auto x0 = torch::rand({4, 3, 8, 8}) * 2 - 1, eps = torch::randn({4, 3, 8, 8});
  for (const char* pred : {"epsilon", "v_prediction", "sample"})
    for (int64_t t : {1, 100, 500, 900}) {
      DDPMScheduler s(make("linear", pred, "fixed_small", /*clip=*/false));
      const auto ts = torch::full({4}, t, torch::kLong);
      const auto xt = s.add_noise(x0, eps, ts);
      const auto target = s.training_target(x0, eps, ts);  // what a perfect model outputs
      const auto out = s.step(target, t, xt, at::detail::createCPUGenerator(0));
      // x_t and the target round within 7u of √ᾱ|x₀| + √β̄|ε| (AddNoiseAndVelocityMatch); the step's
      // x̂₀ (7u of its terms over √ᾱ) carries that error over √ᾱ too: 16u of the scale below.
      const double ab = s.alphas_cumprod()[t].item<double>();
      const auto d = [](const at::Tensor& a) { return a.abs().to(at::kDouble); };
      const auto scale =
          (std::sqrt(ab) * d(x0) + std::sqrt(1 - ab) * d(eps) + d(xt) + std::sqrt(1 - ab) * d(target)) / std::sqrt(ab);
      EXPECT_TRUE(test::within_ulps(out.pred_original_sample, x0, scale, 8)) << pred << " t=" << t;
    }
}

TEST(Scheduler, MinSnrWeightsPerPredictionType) {
  const auto ts = torch::tensor({0L, 100L, 400L, 999L});
  for (const char* pred : {"epsilon", "v_prediction", "sample"}) {
    const NoiseSchedule s(make("linear", pred));
    const auto snr = s.snr(ts), w = s.loss_weights(ts, 5.0);
    EXPECT_TRUE(torch::equal(s.loss_weights(ts, std::nullopt), torch::ones({4})));
    for (int i = 0; i < 4; ++i) {
      const double r = snr[i].item<double>(), m = std::min(r, 5.0);
      const double want = std::string(pred) == "epsilon" ? m / r : std::string(pred) == "v_prediction" ? m / (r + 1) : m;
      // From the same float SNR: a clamp, then at most a div and an add (u each).
      EXPECT_NEAR(w[i].item<double>(), want, 3 * u * want) << pred << " t=" << ts[i].item<int64_t>();
    }
  }
  const NoiseSchedule s(make("linear"));
  const double ab = s.alphas_cumprod()[400].item<double>();
  // 1 - ᾱ and the div round by u each.
  EXPECT_NEAR(s.snr(torch::tensor({400L}))[0].item<double>(), ab / (1 - ab),
              2 * u * ab / (1 - ab) * std::max(1.0, ab / (1 - ab)));
}

// The data distribution is one image x*: the exact ε of x_t is (x_t - √ᾱ_t x*) / √(1-ᾱ_t), and both
// samplers must land on x*.
TEST(Scheduler, OracleSamplersRecoverAPointMass) {
  torch::manual_seed(3);
  const auto x_star = torch::rand({1, 1, 4, 4}) * 1.6 - 0.8;
  for (const char* sampler : {"ddpm", "ddim"}) {
    SchedulerConfig cfg = make("linear");
    DDPMScheduler ddpm(cfg);
    DDIMScheduler ddim(cfg);
    const bool is_ddpm = std::string(sampler) == "ddpm";
    NoiseSchedule& s = is_ddpm ? static_cast<NoiseSchedule&>(ddpm) : ddim;
    s.set_timesteps(is_ddpm ? 1000 : 50);
    auto gen = at::detail::createCPUGenerator(5);
    auto x = torch::randn({1, 1, 4, 4});
    at::Tensor scale;
    for (int64_t t : s.timesteps()) {
      const double ab = s.alphas_cumprod()[t].item<double>();
      const auto eps = (x - std::sqrt(ab) * x_star) / std::sqrt(1 - ab);
      // The last step returns x̂₀ = (x - √β̄ ε)/√ᾱ = x* up to rounding: ε rounds within 7u of
      // (|x| + √ᾱ|x*|)/√β̄, x̂₀ within 7u of its terms over √ᾱ, and a scale-and-add by 1 (DDIM) 2u more.
      scale = (2 * x.abs().to(at::kDouble) + x_star.abs().to(at::kDouble)) / std::sqrt(ab) + x_star.abs().to(at::kDouble);
      x = is_ddpm ? ddpm.step(eps, t, x, gen).prev_sample : ddim.step(eps, t, x, 0.0, gen).prev_sample;
    }
    EXPECT_TRUE(test::within_ulps(x, x_star, scale, 8)) << sampler;
  }
}

}  // namespace
}  // namespace difftrain

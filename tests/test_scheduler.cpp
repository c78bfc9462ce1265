// DDPM / DDIM schedulers against diffusers (reference tensors made at test time), closed forms,
// values pinned by diffusers' own tests, inversion, and an oracle sampler.
#include <cmath>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/scheduler.h"
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

void expect_close(const at::Tensor& got, const at::Tensor& want, double atol, double rtol, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const double err = (got - want).abs().max().item<double>();
  EXPECT_TRUE(at::allclose(got, want, rtol, atol)) << what << ": max abs error " << err;
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
    expect_close(s.betas(), ref.at(key + ".betas"), 1e-7, 1e-6, key + " betas");
    expect_close(s.alphas_cumprod(), ref.at(key + ".alphas_cumprod"), 1e-7, 1e-6, key + " alphas_cumprod");
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
    expect_close(s.add_noise(ref.at("noise.x0"), ref.at("noise.noise"), ref.at("noise.timesteps")),
                 ref.at("noise." + schedule + ".add_noise"), 1e-6, 1e-5, schedule + " add_noise");
    expect_close(s.get_velocity(ref.at("noise.x0"), ref.at("noise.noise"), ref.at("noise.timesteps")),
                 ref.at("noise." + schedule + ".velocity"), 1e-6, 1e-5, schedule + " get_velocity");
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
    EXPECT_NEAR(s.get_variance(t), c["variance"].get<double>(), 1e-6 * std::max(1.0, std::fabs(c["variance"].get<double>())))
        << what;
    const auto out = s.step(ref.at("step.model_output"), t, ref.at("step.sample"), at::detail::createCPUGenerator(7));
    const std::string i = std::to_string(c["i"].get<int>());
    expect_close(out.pred_original_sample, ref.at("ddpm." + i + ".pred_original_sample"), 1e-5, 1e-5, what + " x0");
    expect_close(out.prev_sample, ref.at("ddpm." + i + ".prev_sample"), 1e-5, 1e-5, what + " prev_sample");
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
    const auto out = s.step(ref.at("step.model_output"), c["t"], ref.at("step.sample"), c["eta"],
                            at::detail::createCPUGenerator(11));
    const std::string i = std::to_string(c["i"].get<int>()), what = "ddim case " + c.dump();
    expect_close(out.pred_original_sample, ref.at("ddim." + i + ".pred_original_sample"), 1e-5, 1e-5, what + " x0");
    expect_close(out.prev_sample, ref.at("ddim." + i + ".prev_sample"), 1e-5, 1e-5, what + " prev_sample");
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
      expect_close(out.pred_original_sample, x0, 2e-4, 1e-4, std::string(pred) + " t=" + std::to_string(t));
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
      EXPECT_NEAR(w[i].item<double>(), want, 1e-6 * std::max(1.0, want)) << pred << " t=" << ts[i].item<int64_t>();
    }
  }
  const NoiseSchedule s(make("linear"));
  const double ab = s.alphas_cumprod()[400].item<double>();
  EXPECT_NEAR(s.snr(torch::tensor({400L}))[0].item<double>(), ab / (1 - ab), 1e-5 * ab / (1 - ab));
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
    for (int64_t t : s.timesteps()) {
      const double ab = s.alphas_cumprod()[t].item<double>();
      const auto eps = (x - std::sqrt(ab) * x_star) / std::sqrt(1 - ab);
      x = is_ddpm ? ddpm.step(eps, t, x, gen).prev_sample : ddim.step(eps, t, x, 0.0, gen).prev_sample;
    }
    expect_close(x, x_star, 1e-3, 1e-3, sampler);
  }
}

}  // namespace
}  // namespace difftrain

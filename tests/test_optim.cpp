// The optimizer half of a step against PyTorch and diffusers (tests/reference/make_reference.py):
// torch.optim.AdamW, diffusers' get_scheduler and EMAModel, clip_grad_norm_, torch.amp.GradScaler;
// plus gradient-accumulation equivalence and the autocast scope.
#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "difftrain/amp.h"
#include "difftrain/ema.h"
#include "difftrain/optim.h"
#include "difftrain/scheduler.h"
#include "difftrain/trainer.h"
#include "reference.h"

namespace difftrain {
namespace {

using test::load_json;
using test::load_tensors;

TEST(AdamW, MatchesTorchOptimAdamWForEveryImplementation) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = load_tensors(dir + "/optim.pt");
  const auto cases = load_json(dir + "/optim.json");
  const auto cfg = cases["adamw"];
  for (OptimizerImpl impl : {OptimizerImpl::fused, OptimizerImpl::foreach, OptimizerImpl::loop}) {
    SCOPED_TRACE(to_string(impl));
    auto w = ref.at("adamw.init_w").clone().requires_grad_(), b = ref.at("adamw.init_b").clone().requires_grad_();
    AdamWOptions o;
    o.beta1 = cfg["beta1"], o.beta2 = cfg["beta2"], o.eps = cfg["eps"], o.weight_decay = cfg["weight_decay"], o.impl = impl;
    AdamW opt({{"w", w}, {"b", b}}, o);  // w is a matrix (decays), b a vector (does not)
    EXPECT_EQ(opt.impl(), impl);
    for (int k = 0; k < cfg["steps"].get<int>(); ++k) {
      w.mutable_grad() = ref.at(fmt::format("adamw.gw{}", k)).clone();
      b.mutable_grad() = ref.at(fmt::format("adamw.gb{}", k)).clone();
      opt.step(cfg["lrs"][static_cast<size_t>(k)].get<double>());
      EXPECT_TRUE(torch::allclose(w, ref.at(fmt::format("adamw.w{}", k)), 1e-6, 1e-7)) << "step " << k;
      EXPECT_TRUE(torch::allclose(b, ref.at(fmt::format("adamw.b{}", k)), 1e-6, 1e-7)) << "step " << k;
    }
    const auto sd = opt.state_dict();
    const std::map<std::string, at::Tensor> state(sd.begin(), sd.end());
    EXPECT_TRUE(torch::allclose(state.at("exp_avg.w"), ref.at("adamw.exp_avg_w"), 1e-6, 1e-8));
    EXPECT_TRUE(torch::allclose(state.at("exp_avg_sq.b"), ref.at("adamw.exp_avg_sq_b"), 1e-6, 1e-10));
    EXPECT_EQ(state.at("step.w").item<float>(), 6.0f);
  }
}

TEST(AdamW, FoundInfSkipsTheStepAndLeavesStateUnchanged) {
  for (OptimizerImpl impl : {OptimizerImpl::fused, OptimizerImpl::foreach, OptimizerImpl::loop}) {
    SCOPED_TRACE(to_string(impl));
    auto w = torch::randn({3, 3}).requires_grad_();
    AdamWOptions o;
    o.impl = impl, o.weight_decay = 0.1;
    AdamW opt({{"w", w}}, o);
    w.mutable_grad() = torch::randn({3, 3});
    opt.step(1e-2);
    const auto before = w.detach().clone();
    const auto state_before = opt.state_dict();
    std::vector<at::Tensor> copies;
    for (const auto& [name, t] : state_before) copies.push_back(t.clone());
    opt.step(1e-2, torch::ones({}));
    EXPECT_TRUE(torch::equal(w, before));
    for (size_t i = 0; i < copies.size(); ++i) EXPECT_TRUE(torch::equal(opt.state_dict()[i].second, copies[i])) << state_before[i].first;
    opt.step(1e-2, torch::zeros({}));
    EXPECT_FALSE(torch::equal(w, before));
    EXPECT_EQ(opt.state_dict()[2].second.item<float>(), 2.0f) << "a skipped step is not counted";
  }
}

// A real overflow: inf and NaN in the gradient, found_inf computed on the device from the norm as
// the trainer does. The skipped step (here the very first, where t = 0) must be an exact no-op,
// so the run continues bit-identical to one that never saw the bad gradient; nothing turns NaN.
TEST(AdamW, AnInfGradientIsSkippedExactlyByEveryImplementation) {
  for (OptimizerImpl impl : {OptimizerImpl::fused, OptimizerImpl::foreach, OptimizerImpl::loop}) {
    SCOPED_TRACE(to_string(impl));
    torch::manual_seed(0);
    const auto init = torch::randn({4, 3}), good = torch::randn({4, 3});
    AdamWOptions o;
    o.impl = impl, o.weight_decay = 0.1;
    auto w = init.clone().requires_grad_(), twin = init.clone().requires_grad_();
    AdamW opt({{"w", w}}, o), reference({{"w", twin}}, o);

    auto bad = good.clone();
    bad[0][0] = std::numeric_limits<float>::infinity(), bad[1][2] = std::numeric_limits<float>::quiet_NaN();
    w.mutable_grad() = bad;
    const auto found_inf = at::isfinite(clip_grad_norm_({w.grad()}, 0.0)).logical_not().to(at::kFloat);
    ASSERT_EQ(found_inf.item<float>(), 1.0f);
    opt.step(1e-2, found_inf);
    EXPECT_TRUE(torch::equal(w, init));
    for (const auto& [name, t] : opt.state_dict()) EXPECT_FALSE(t.isnan().any().item<bool>()) << name;
    EXPECT_EQ(opt.state_dict()[2].second.item<float>(), 0.0f) << "a skipped step is not counted";

    for (int k = 0; k < 3; ++k) {  // then the same good steps on both
      w.mutable_grad() = good.clone(), twin.mutable_grad() = good.clone();
      opt.step(1e-2, torch::zeros({})), reference.step(1e-2, torch::zeros({}));
    }
    EXPECT_TRUE(torch::equal(w, twin));
    for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(opt.state_dict()[i].second, reference.state_dict()[i].second));
  }
}

TEST(AdamW, StateRoundTripsAndMismatchesAreNamed) {
  auto w = torch::randn({2, 2}).requires_grad_();
  AdamW a({{"w", w}}, {});
  w.mutable_grad() = torch::ones({2, 2});
  a.step(0.1);
  auto w2 = w.detach().clone().requires_grad_();
  AdamW b({{"w", w2}}, {});
  const auto sd = a.state_dict();
  b.load_state_dict({sd.begin(), sd.end()});
  w.mutable_grad() = torch::full({2, 2}, 0.5), w2.mutable_grad() = torch::full({2, 2}, 0.5);
  a.step(0.1), b.step(0.1);
  EXPECT_TRUE(torch::equal(w, w2));

  auto v = torch::randn({3}).requires_grad_();
  AdamW c({{"w", v}}, {});
  try {
    c.load_state_dict({sd.begin(), sd.end()});
    FAIL() << "a shape mismatch must throw";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("exp_avg.w"), std::string::npos) << e.what();
  }
}

TEST(AdamW, WeightDecaySplit) {
  EXPECT_TRUE(decays(torch::zeros({4, 3, 3, 3})));  // conv kernel
  EXPECT_TRUE(decays(torch::zeros({8, 4})));        // linear / embedding
  EXPECT_FALSE(decays(torch::zeros({8})));          // bias, GroupNorm scale
}

TEST(LrSchedule, MatchesDiffusersGetScheduler) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto cases = load_json(dir + "/optim.json");
  for (const auto& c : cases["lr"]) {
    const auto schedule = *enum_from_string<LrSchedule>(c["schedule"].get<std::string>());
    const auto& factors = c["factors"];
    for (size_t step = 0; step < factors.size(); ++step)
      EXPECT_NEAR(lr_lambda(schedule, static_cast<int64_t>(step), c["warmup"], c["total"]), factors[step].get<double>(), 1e-12)
          << c["schedule"] << " warmup " << c["warmup"] << " step " << step;
  }
}

TEST(LrSchedule, ClosedFormPoints) {
  EXPECT_DOUBLE_EQ(lr_lambda(LrSchedule::constant, 5, 10, 100), 0.5);   // warmup: step / warmup
  EXPECT_DOUBLE_EQ(lr_lambda(LrSchedule::linear, 55, 10, 100), 0.5);    // (100 - 55) / 90
  EXPECT_NEAR(lr_lambda(LrSchedule::cosine, 55, 10, 100), 0.5, 1e-15);  // cos(π/2) half-way
  EXPECT_DOUBLE_EQ(lr_lambda(LrSchedule::cosine, 100, 10, 100), 0.0);
}

TEST(EMA, MatchesDiffusersEMAModel) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = load_tensors(dir + "/optim.pt");
  const auto cases = load_json(dir + "/optim.json");
  for (const auto& c : cases["ema"]) {
    const int i = c["i"];
    SCOPED_TRACE(c["config"].dump());
    EmaConfig cfg;
    cfg.decay = c["config"]["decay"];
    cfg.use_ema_warmup = c["config"]["use_ema_warmup"];
    cfg.min_decay = c["config"].value("min_decay", 0.0);
    cfg.update_after_step = c["config"].value("update_after_step", 0);
    cfg.inv_gamma = c["config"].value("inv_gamma", 1.0);
    cfg.power = c["config"].value("power", 2.0 / 3.0);
    auto shadow = ref.at(fmt::format("ema.{}.p0", i)).clone();
    EMAModel ema({shadow}, cfg);
    for (int k = 0; k < 12; ++k) {
      ema.step({ref.at(fmt::format("ema.{}.param{}", i, k))});
      EXPECT_NEAR(ema.cur_decay_value(), c["decays"][static_cast<size_t>(k)].get<double>(), 1e-12) << "step " << k;
      EXPECT_TRUE(torch::allclose(shadow, ref.at(fmt::format("ema.{}.shadow{}", i, k)), 1e-6, 1e-6)) << "step " << k;
    }
    EXPECT_EQ(ema.optimization_step(), 12);
  }
}

TEST(EMA, UpdateEveryAveragesOnEveryKthStepOnly) {
  EmaConfig cfg;
  cfg.use_ema_warmup = false, cfg.update_every = 3, cfg.decay = 0.5, cfg.min_decay = 0.5;
  auto shadow = torch::zeros({2});
  EMAModel ema({shadow}, cfg);
  const auto p = torch::ones({2});
  ema.step({p}), ema.step({p});
  EXPECT_TRUE(torch::equal(shadow, torch::zeros({2})));
  ema.step({p});  // step 3: shadow = 0.5 * 0 + 0.5 * 1
  EXPECT_TRUE(torch::allclose(shadow, torch::full({2}, 0.5)));
}

TEST(ClipGradNorm, MatchesTorchClipGradNorm) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = load_tensors(dir + "/optim.pt");
  for (bool foreach : {true, false}) {
    std::vector<at::Tensor> g = {ref.at("clip.g0").clone(), ref.at("clip.g1").clone(), ref.at("clip.g2").clone()};
    const auto total = clip_grad_norm_(g, 1.5, foreach);
    EXPECT_TRUE(torch::allclose(total, ref.at("clip.total_norm"), 1e-6));
    for (int j = 0; j < 3; ++j) EXPECT_TRUE(torch::allclose(g[j], ref.at(fmt::format("clip.clipped{}", j)), 1e-6, 1e-7));
  }
}

TEST(ClipGradNorm, ClosedForm) {
  std::vector<at::Tensor> g = {torch::full({4}, 1.0), torch::full({12}, 2.0)};  // ‖g‖ = √(4 + 48) = √52
  EXPECT_NEAR(clip_grad_norm_(g, 0.0).item<double>(), std::sqrt(52.0), 1e-5);
  EXPECT_TRUE(torch::equal(g[0], torch::full({4}, 1.0))) << "max_norm 0 measures without clipping";
  clip_grad_norm_(g, 1.0);
  EXPECT_NEAR(torch::cat(g).norm().item<double>(), 1.0, 1e-5);
  std::vector<at::Tensor> small = {torch::full({4}, 0.1)};
  clip_grad_norm_(small, 1.0);
  EXPECT_TRUE(torch::equal(small[0], torch::full({4}, 0.1))) << "below max_norm nothing changes";
}

TEST(GradScaler, StateMachineMatchesTorchAmpGradScaler) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto c = load_json(dir + "/optim.json")["scaler"];
  GradScalerOptions o;
  o.init_scale = c["init_scale"], o.growth_factor = c["growth_factor"], o.backoff_factor = c["backoff_factor"];
  o.growth_interval = c["growth_interval"];
  GradScaler scaler(o, torch::kCPU);
  for (size_t k = 0; k < c["pattern"].size(); ++k) {
    const bool bad = c["pattern"][k].get<int>() != 0;
    std::vector<at::Tensor> grads = {torch::full({2}, bad ? std::numeric_limits<double>::infinity() : 1.0) * scaler.scale_tensor()};
    const auto found_inf = scaler.unscale_(grads);
    EXPECT_EQ(found_inf.item<float>(), bad ? 1.0f : 0.0f);
    if (!bad) {
      EXPECT_TRUE(torch::allclose(grads[0], torch::ones({2})));
    }
    scaler.update(found_inf);
    EXPECT_EQ(scaler.scale_tensor().item<double>(), c["scales"][k].get<double>()) << "update " << k;
  }
}

TEST(Amp, AutocastScopeRunsMatmulInBf16AndRestores) {
  ASSERT_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  const auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  {
    AutocastScope scope(c10::kCPU, c10::kBFloat16);
    EXPECT_EQ(torch::mm(a, b).scalar_type(), c10::kBFloat16);
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  EXPECT_EQ(torch::mm(a, b).scalar_type(), c10::kFloat);
  AutocastScope off(c10::kCPU, std::nullopt);
  EXPECT_EQ(torch::mm(a, b).scalar_type(), c10::kFloat);
}

TEST(Amp, Fp16NeedsCuda) {
  EXPECT_THROW(autocast_dtype(MixedPrecision::fp16, torch::kCPU), UsageError);
  EXPECT_EQ(autocast_dtype(MixedPrecision::no, torch::kCPU), std::nullopt);
}

// k micro-batches of B/k, each loss divided by k, give the gradient of one batch of B.
TEST(Accumulation, MicroBatchesEqualOneBatch) {
  ModelConfig m;
  m.block_out_channels = {16, 32};
  m.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  m.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  m.norm_num_groups = 8, m.sample_size = 8;
  torch::manual_seed(0);
  UNet2DModel model(m);
  NoiseSchedule schedule{SchedulerConfig{}};
  const auto x0 = torch::rand({8, 1, 8, 8}) * 2 - 1, noise = torch::randn({8, 1, 8, 8});
  const auto t = torch::randint(1000, {8}, torch::kLong);
  auto grads_for = [&](int k) {
    model->zero_grad();
    for (int i = 0; i < k; ++i) {
      const auto s = torch::indexing::Slice(i * 8 / k, (i + 1) * 8 / k);
      const auto xs = x0.index({s}), ns = noise.index({s}), ts = t.index({s});
      const auto out = model->forward(schedule.add_noise(xs, ns, ts), ts);
      const auto loss = diffusion_loss(out, schedule.training_target(xs, ns, ts), schedule.loss_weights(ts, 5.0)).mean() / k;
      loss.backward();
    }
    std::vector<at::Tensor> g;
    for (auto& p : model->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  const auto one = grads_for(1);
  for (int k : {2, 4}) {
    const auto acc = grads_for(k);
    for (size_t i = 0; i < one.size(); ++i)
      EXPECT_TRUE(torch::allclose(acc[i], one[i], 1e-4, 1e-6)) << "k = " << k << ", parameter " << i;
  }
}

TEST(Seeds, DerivedSeedsDifferPerStreamAndAreStable) {
  EXPECT_NE(derive_seed(0, 0), derive_seed(0, 1));
  EXPECT_NE(derive_seed(0, 0), derive_seed(1, 0));
  EXPECT_EQ(derive_seed(42, 3), derive_seed(42, 3));
  EXPECT_LT(derive_seed(~0ull, 7), uint64_t{1} << 63);
}

}  // namespace
}  // namespace difftrain

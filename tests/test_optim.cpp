// The optimizer half of a step against PyTorch and diffusers (tests/reference/make_reference.py):
// torch.optim.AdamW, diffusers' get_scheduler and EMAModel, clip_grad_norm_, torch.amp.GradScaler;
// plus gradient-accumulation equivalence and the autocast scope.
#include <cstdlib>
#include <fstream>
#include <iterator>

#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "difftrain/amp.h"
#include "difftrain/ema.h"
#include "difftrain/optim.h"
#include "difftrain/rng.h"
#include "difftrain/scheduler.h"
#include "difftrain/unet.h"
#include "numerics.h"
#include "reference.h"

namespace difftrain {
namespace {

using test::load_json;
using test::load_tensors;
constexpr double u = test::kUnitRoundoff;

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
    // Bounds that accumulate over the steps (ε units, tests/numerics.h), per evaluation: the
    // parameter's decay and subtraction round by u each of |w|; the update lr·m̂/(√v̂ + eps) by
    // about 10u of itself (two moment updates of 3u, two bias corrections, sqrt 2u, add, div, mul),
    // so 20u of |w_k - w_{k-1}| bounds it. The moments: 3u of their two terms per step.
    const double beta1 = cfg["beta1"], beta2 = cfg["beta2"];
    const auto d = [](const at::Tensor& t) { return t.abs().to(at::kDouble); };
    at::Tensor scale_w = torch::zeros({4, 3}, torch::kDouble), scale_b = torch::zeros({5}, torch::kDouble);
    at::Tensor scale_m = torch::zeros({4, 3}, torch::kDouble), scale_v = torch::zeros({5}, torch::kDouble);
    at::Tensor prev_w = ref.at("adamw.init_w"), prev_b = ref.at("adamw.init_b");
    for (int k = 0; k < cfg["steps"].get<int>(); ++k) {
      const auto gw = ref.at(fmt::format("adamw.gw{}", k)), gb = ref.at(fmt::format("adamw.gb{}", k));
      const auto want_w = ref.at(fmt::format("adamw.w{}", k)), want_b = ref.at(fmt::format("adamw.b{}", k));
      w.mutable_grad() = gw.clone();
      b.mutable_grad() = gb.clone();
      opt.step(cfg["lrs"][static_cast<size_t>(k)].get<double>());
      scale_w = scale_w + d(want_w) + 20 * d(want_w - prev_w);
      scale_b = scale_b + d(want_b) + 20 * d(want_b - prev_b);
      scale_m = beta1 * scale_m + (1 - beta1) * d(gw);  // Σ |terms| of the moments

      scale_v = beta2 * scale_v + (1 - beta2) * d(gb).pow(2);
      prev_w = want_w, prev_b = want_b;
      EXPECT_TRUE(test::within_ulps(w, want_w, scale_w, 1)) << "step " << k;  // 2 evaluations × u
      EXPECT_TRUE(test::within_ulps(b, want_b, scale_b, 1)) << "step " << k;
    }
    const int steps = cfg["steps"];
    const auto sd = opt.state_dict();
    const std::map<std::string, at::Tensor> state(sd.begin(), sd.end());
    // Each step's moment update rounds by at most 3u (4u with the square of g) of its terms, whose
    // magnitudes are the running Σ|terms| above: 2 evaluations × steps × that.
    EXPECT_TRUE(test::within_ulps(state.at("exp_avg.w"), ref.at("adamw.exp_avg_w"), scale_m, 3 * steps));
    EXPECT_TRUE(test::within_ulps(state.at("exp_avg_sq.b"), ref.at("adamw.exp_avg_sq_b"), scale_v, 4 * steps));
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

// The capturable form (train.cuda_graph): the rate in a device tensor. Same bits as the double
// rate, for every implementation, over steps with decay, a skipped step and a changing rate.
TEST(AdamW, TensorLearningRateIsBitEqualToTheDoublePath) {
  for (OptimizerImpl impl : {OptimizerImpl::fused, OptimizerImpl::foreach, OptimizerImpl::loop}) {
    SCOPED_TRACE(to_string(impl));
    torch::manual_seed(7);
    const auto w0 = torch::randn({6, 5}), b0 = torch::randn({5});
    std::vector<at::Tensor> gw, gb;
    for (int k = 0; k < 6; ++k) gw.push_back(torch::randn({6, 5})), gb.push_back(torch::randn({5}));
    AdamWOptions o;
    o.weight_decay = 0.03, o.impl = impl;
    auto w1 = w0.clone().requires_grad_(), b1 = b0.clone().requires_grad_();
    auto w2 = w0.clone().requires_grad_(), b2 = b0.clone().requires_grad_();
    AdamW by_double({{"w", w1}, {"b", b1}}, o), by_tensor({{"w", w2}, {"b", b2}}, o);
    ASSERT_EQ(by_tensor.lr_dtype(), at::kDouble);  // on the CPU, every implementation
    const auto lr_t = torch::zeros({}, torch::dtype(by_tensor.lr_dtype()));
    for (int k = 0; k < 6; ++k) {
      const double lr = 1e-3 * lr_lambda(LrSchedule::cosine, k, 2, 6) + 3.3e-5;  // not a float32 value
      const auto found_inf = torch::full({}, k == 3 ? 1.0f : 0.0f);
      w1.mutable_grad() = gw[k].clone(), b1.mutable_grad() = gb[k].clone();
      w2.mutable_grad() = gw[k].clone(), b2.mutable_grad() = gb[k].clone();
      by_double.step(lr, found_inf);
      lr_t.fill_(lr);
      by_tensor.step(lr_t, found_inf);
      ASSERT_TRUE(torch::equal(w1, w2)) << "step " << k;
      ASSERT_TRUE(torch::equal(b1, b2)) << "step " << k;
    }
    const auto s1 = by_double.state_dict(), s2 = by_tensor.state_dict();
    for (size_t i = 0; i < s1.size(); ++i) EXPECT_TRUE(torch::equal(s1[i].second, s2[i].second)) << s1[i].first;
  }
  AdamW opt({{"w", torch::zeros({2, 2}).requires_grad_()}}, AdamWOptions{});
  EXPECT_THROW(opt.step(torch::zeros({}, torch::kFloat)), c10::Error);  // a float32 rate would round it
}

// A zero rate (the first step of a linear warmup) leaves the parameters as they are in every
// implementation, also where the gradient is exactly 0 so far (v = 0): no 0/0.
TEST(AdamW, ZeroLearningRateChangesNothingWhereTheGradientIsZero) {
  for (OptimizerImpl impl : {OptimizerImpl::fused, OptimizerImpl::foreach, OptimizerImpl::loop}) {
    SCOPED_TRACE(to_string(impl));
    AdamWOptions o;
    o.weight_decay = 0.1, o.impl = impl;
    const auto w0 = torch::randn({3, 4});
    auto w = w0.clone().requires_grad_();
    AdamW opt({{"w", w}}, o);
    auto g = torch::randn({3, 4});
    g.index_put_({0}, 0.0);  // a row that has had no gradient (an unseen class's embedding)
    w.mutable_grad() = g;
    opt.step(0.0);
    EXPECT_TRUE(torch::equal(w, w0));
    w.mutable_grad() = g.clone();
    opt.step(torch::zeros({}, torch::dtype(opt.lr_dtype())));
    EXPECT_TRUE(torch::equal(w, w0));
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
  for (const bool capturable : {false, true})
    for (const auto& c : cases["ema"]) {
      const int i = c["i"];
      SCOPED_TRACE(c["config"].dump() + (capturable ? " capturable" : ""));
      EmaConfig cfg;
      cfg.decay = c["config"]["decay"];
      cfg.use_ema_warmup = c["config"]["use_ema_warmup"];
      cfg.min_decay = c["config"].value("min_decay", 0.0);
      cfg.update_after_step = c["config"].value("update_after_step", 0);
      cfg.inv_gamma = c["config"].value("inv_gamma", 1.0);
      cfg.power = c["config"].value("power", 2.0 / 3.0);
      auto shadow = ref.at(fmt::format("ema.{}.p0", i)).clone();
      EMAModel ema({shadow}, cfg, capturable);
      for (int k = 0; k < 12; ++k) {
        ema.step({ref.at(fmt::format("ema.{}.param{}", i, k))});
        // The decay is a few float64 operations (pow: within an ulp or two): 1e-12 is loose.
        EXPECT_NEAR(ema.cur_decay_value(), c["decays"][static_cast<size_t>(k)].get<double>(), 1e-12) << "step " << k;
        // lerp s + w(p - s) (ours) or s - w(s - p) (diffusers), w = 1 - d rounded to float32 in
        // both: 3u of |s| + |p| per step and evaluation, accumulated over k + 1 steps.
        const auto want = ref.at(fmt::format("ema.{}.shadow{}", i, k)), p = ref.at(fmt::format("ema.{}.param{}", i, k));
        EXPECT_TRUE(test::within_ulps(shadow, want, (want.abs() + p.abs()).to(at::kDouble), 3.0 * (k + 1))) << "step " << k;
      }
      EXPECT_EQ(ema.optimization_step(), 12);
    }
}

// The capturable EMA (device counter and decay) against the host one: the same bits, with
// warmup, update_after_step and update_every, and across a resume of the counter.
TEST(EMA, CapturableEqualsTheHostPathBitForBit) {
  EmaConfig cfg;
  cfg.decay = 0.9999, cfg.use_ema_warmup = true, cfg.power = 0.75, cfg.update_after_step = 2, cfg.update_every = 2;
  torch::manual_seed(3);
  const auto init = torch::randn({4, 3});
  auto host_shadow = init.clone(), dev_shadow = init.clone();
  EMAModel host({host_shadow}, cfg), dev({dev_shadow}, cfg, /*capturable=*/true);
  auto p = init.clone();
  for (int k = 1; k <= 40; ++k) {
    p.add_(torch::randn({4, 3}));
    host.step({p}), dev.step({p});
    ASSERT_TRUE(torch::equal(host_shadow, dev_shadow)) << "step " << k;
    ASSERT_EQ(host.cur_decay_value(), dev.cur_decay_value()) << "step " << k;
    if (k == 25) {  // a resume of both at an odd step (not an update step)
      EMAModel host2({host_shadow}, cfg), dev2({dev_shadow}, cfg, true);
      host2.set_optimization_step(25), dev2.set_optimization_step(25);
      EXPECT_EQ(dev2.optimization_step(), 25);
      EXPECT_EQ(host2.cur_decay_value(), host.cur_decay_value());
      EXPECT_EQ(dev2.cur_decay_value(), dev.cur_decay_value());
    }
  }
  EXPECT_EQ(dev.optimization_step(), 40);
}

TEST(EMA, UpdateEveryAveragesOnEveryKthStepOnly) {
  for (const bool capturable : {false, true}) {
    EmaConfig cfg;
    cfg.use_ema_warmup = false, cfg.update_every = 3, cfg.decay = 0.5, cfg.min_decay = 0.5;
    auto shadow = torch::zeros({2});
    EMAModel ema({shadow}, cfg, capturable);
    const auto p = torch::ones({2});
    ema.step({p}), ema.step({p});
    EXPECT_TRUE(torch::equal(shadow, torch::zeros({2})));
    ema.step({p});  // step 3: shadow = 0.5 * 0 + 0.5 * 1
    EXPECT_TRUE(torch::allclose(shadow, torch::full({2}, 0.5)));
  }
}

TEST(ClipGradNorm, MatchesTorchClipGradNorm) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto ref = load_tensors(dir + "/optim.pt");
  for (bool foreach : {true, false}) {
    std::vector<at::Tensor> g = {ref.at("clip.g0").clone(), ref.at("clip.g1").clone(), ref.at("clip.g2").clone()};
    const auto total = clip_grad_norm_(g, 1.5, foreach);
    // ‖g‖ sums N = 24 squares (γ_N: N u of the sum, in any order) and takes a sqrt (2u): relative
    // (N + 2)u/2 + 2u... per evaluation, under (N + 4)u; the clip factor adds a div and an add, the scaling a mul.
    const double n = 24, rel = (n + 4) * u;
    EXPECT_NEAR(total.item<double>(), ref.at("clip.total_norm").item<double>(),
                2 * rel * ref.at("clip.total_norm").item<double>());
    for (int j = 0; j < 3; ++j) {
      const auto want = ref.at(fmt::format("clip.clipped{}", j));
      EXPECT_TRUE(test::within_ulps(g[j], want, want.abs().to(at::kDouble), 2 * (rel + 3 * u) / test::kFloatEps)) << j;
    }
  }
}

TEST(ClipGradNorm, ClosedForm) {
  std::vector<at::Tensor> g = {torch::full({4}, 1.0), torch::full({12}, 2.0)};  // ‖g‖ = √(4 + 48) = √52
  EXPECT_NEAR(clip_grad_norm_(g, 0.0).item<double>(), std::sqrt(52.0), 2 * u * std::sqrt(52.0));  // exact sum, then a sqrt
  EXPECT_TRUE(torch::equal(g[0], torch::full({4}, 1.0))) << "max_norm 0 measures without clipping";
  clip_grad_norm_(g, 1.0);
  EXPECT_NEAR(torch::cat(g).norm().item<double>(), 1.0, 2 * (16 + 8) * u);  // two norms of 16 and a scaling
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

// `auto` is bf16 exactly where an explicit bf16 is accepted on this CPU, fp32 elsewhere, and says
// which and why. The CPU's own flags decide, read independently here from /proc/cpuinfo.
TEST(Amp, AutoPicksBf16WhereTheCpuHasIt) {
  std::string reason;
  const auto chosen = autocast_dtype(MixedPrecision::auto_, torch::kCPU, &reason);
  bool explicit_ok = true;
  try {
    autocast_dtype(MixedPrecision::bf16, torch::kCPU);
  } catch (const UsageError&) {
    explicit_ok = false;
  }
  std::ifstream cpuinfo("/proc/cpuinfo");
  const std::string info((std::istreambuf_iterator<char>(cpuinfo)), std::istreambuf_iterator<char>());
  const bool native = info.find(" avx512_bf16") != std::string::npos || info.find(" amx_bf16") != std::string::npos;
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const bool capped = cap && std::string(cap) != "avx512";
  if (!native || capped) {
    EXPECT_FALSE(explicit_ok);
  }
  if (explicit_ok) {
    EXPECT_EQ(chosen, c10::kBFloat16) << reason;
    EXPECT_NE(reason.find("auto: bf16"), std::string::npos) << reason;
  } else {
    EXPECT_EQ(chosen, std::nullopt) << reason;
    EXPECT_NE(reason.find("auto: fp32, because"), std::string::npos) << reason;
  }
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
    const auto dtype = model->parameters()[0].scalar_type();  // float32, or float64 for the exact gradient
    for (int i = 0; i < k; ++i) {
      const auto s = torch::indexing::Slice(i * 8 / k, (i + 1) * 8 / k);
      const auto xs = x0.index({s}).to(dtype), ns = noise.index({s}).to(dtype), ts = t.index({s});
      const auto out = model->forward(schedule.add_noise(xs, ns, ts), ts);
      const auto loss = diffusion_loss(out, schedule.training_target(xs, ns, ts), schedule.loss_weights(ts, 5.0)).mean() / k;
      loss.backward();
    }
    std::vector<at::Tensor> g;
    for (auto& p : model->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  const auto one = grads_for(1);
  std::vector<std::vector<at::Tensor>> accumulated;
  for (int k : {2, 4}) accumulated.push_back(grads_for(k));
  model->to(torch::kDouble);
  const auto exact = grads_for(1);
  // Dividing by k = 2, 4 is exact, so accumulation sums the same per-sample terms in another order,
  // and the kernels may round a smaller batch otherwise: float32 rounding either way, so each
  // accumulated gradient is as close to the float64 gradient as the one-batch float32 one is
  // (tests/numerics.h). Some gradients are pure rounding (a bias before a GroupNorm, which removes
  // it), and this bound holds for them too.
  for (size_t j = 0; j < accumulated.size(); ++j)
    for (size_t i = 0; i < one.size(); ++i)
      EXPECT_TRUE(test::as_accurate_as(accumulated[j][i], one[i], exact[i])) << "k = " << (j == 0 ? 2 : 4) << ", parameter " << i;
}

TEST(Seeds, DerivedSeedsDifferPerStreamAndAreStable) {
  EXPECT_NE(derive_seed(0, 0), derive_seed(0, 1));
  EXPECT_NE(derive_seed(0, 0), derive_seed(1, 0));
  EXPECT_EQ(derive_seed(42, 3), derive_seed(42, 3));
  EXPECT_LT(derive_seed(~0ull, 7), uint64_t{1} << 63);
}

}  // namespace
}  // namespace difftrain

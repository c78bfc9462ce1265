// The trainer's speed switches on the CPU (issue 15): the capturable step's state (rate tensor,
// device EMA counter, static input buffers) computes exactly what the plain step computes, with
// accumulation, class conditioning and EMA; channels-last memory gives the same training within
// float32 rounding; switches that need CUDA are refused or named on a CPU.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/errors.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"
#include "numerics.h"
#include "stand_in.h"
#include "unet_formats.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

std::shared_ptr<Dataset> stand_in_data() { return test::stand_in_data(32, 8); }

class TrainerSwitches : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("difftrain_trainer_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A small class-conditional job with accumulation, EMA warmup and update_every, in float32.
  Config config() const {
    Config c;
    c.run.device = "cpu";
    c.run.output_dir = dir_.string();
    c.model.sample_size = 8;
    c.model.block_out_channels = {16, 32};
    c.model.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
    c.model.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
    c.model.norm_num_groups = 8;
    c.model.num_class_embeds = 10;
    c.data.channels = 1, c.data.resolution = 8, c.data.preload = true, c.data.num_workers = 0;
    c.train.batch_size = 4, c.train.gradient_accumulation_steps = 2, c.train.max_steps = 6, c.train.lr_warmup_steps = 2;
    c.train.mixed_precision = MixedPrecision::no, c.train.weight_decay = 0.01;
    c.ema.update_every = 2, c.ema.update_after_step = 1;
    c.logging.sample_every = 0;
    c.checkpoint.every = 1000;
    return c;
  }
  TrainerOptions options(const std::string& name, bool capturable = false) const {
    TrainerOptions o;
    o.run_dir = dir_ / name;
    fs::create_directories(o.run_dir);
    o.capturable_state = capturable;
    return o;
  }

  fs::path dir_;
};

std::vector<at::Tensor> weights(Trainer& t) {
  std::vector<at::Tensor> out;
  for (auto& p : t.model()->parameters()) out.push_back(p.detach().clone());
  for (auto& p : t.sampling_model()->parameters()) out.push_back(p.detach().clone());  // the EMA copy
  return out;
}

// With DDPM for both optimizer implementations, and with EDM (whose ln σ is drawn into the static
// buffer of the timesteps).
TEST_F(TrainerSwitches, CapturableStateStepsEqualPlainStepsBitForBit) {
  for (const auto& [impl, formulation] :
       std::vector<std::pair<OptimizerImpl, Formulation>>{{OptimizerImpl::fused, Formulation::ddpm},
                                                          {OptimizerImpl::foreach, Formulation::ddpm},
                                                          {OptimizerImpl::fused, Formulation::edm}}) {
    const std::string name = to_string(impl) + "_" + to_string(formulation);
    SCOPED_TRACE(name);
    Config cfg = config();
    cfg.train.optimizer_impl = impl;
    cfg.diffusion.formulation = formulation;
    if (formulation == Formulation::edm) cfg.sampling.sampler = Sampler::heun;
    Trainer plain(cfg, stand_in_data(), options("plain_" + name));
    Trainer capturable(cfg, stand_in_data(), options("capturable_" + name, /*capturable=*/true));
    for (int k = 1; k <= 6; ++k) {
      plain.train_step(), capturable.train_step();
      const auto a = weights(plain), b = weights(capturable);
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) ASSERT_TRUE(torch::equal(a[i], b[i])) << "step " << k << ", tensor " << i;
    }
    // The checkpoints hold the same state, the EMA step counter (on the device) included.
    const auto pa = plain.save_checkpoint_now(), pb = capturable.save_checkpoint_now();
    for (const char* part : {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"}) {
      std::ifstream fa(pa / part, std::ios::binary), fb(pb / part, std::ios::binary);
      const std::string ba((std::istreambuf_iterator<char>(fa)), {}), bb((std::istreambuf_iterator<char>(fb)), {});
      EXPECT_FALSE(ba.empty());
      EXPECT_EQ(ba, bb) << part;
    }
  }
}

// A resume of the capturable state continues exactly as the uninterrupted run does.
TEST_F(TrainerSwitches, CapturableStateResumesExactly) {
  Config cfg = config();
  std::vector<at::Tensor> straight;
  {
    Trainer t(cfg, stand_in_data(), options("straight", true));
    for (int k = 0; k < 6; ++k) t.train_step();
    straight = weights(t);
  }
  fs::path saved;
  {
    Trainer t(cfg, stand_in_data(), options("halves", true));
    for (int k = 0; k < 3; ++k) t.train_step();
    saved = t.save_checkpoint_now();
  }
  cfg.checkpoint.resume = saved.string();
  Trainer t(cfg, stand_in_data(), options("halves", true));
  ASSERT_EQ(t.step(), 3);
  for (int k = 0; k < 3; ++k) t.train_step();
  const auto resumed = weights(t);
  for (size_t i = 0; i < resumed.size(); ++i) EXPECT_TRUE(torch::equal(resumed[i], straight[i])) << "tensor " << i;
}

// train.channels_last puts the convolution kernels in NHWC and feeds NHWC inputs. That changes
// the order in which convolutions sum, nothing else: the output stays NHWC through the network (no
// op silently falls back to NCHW on the way), and the output and every gradient are as close to a
// float64 evaluation as the NCHW float32 ones are (tests/numerics.h, as_accurate_as).
TEST_F(TrainerSwitches, ChannelsLastComputesTheSameFunction) {
  Config cfg = config();
  cfg.train.channels_last = true;
  Trainer trainer(cfg, stand_in_data(), options("nhwc"));
  auto& nhwc = trainer.model();
  bool any = false;
  for (auto& p : nhwc->parameters())
    if (p.dim() == 4) {
      EXPECT_TRUE(p.is_contiguous(at::MemoryFormat::ChannelsLast));
      any = true;
    }
  EXPECT_TRUE(any);
  // The same weights in NCHW, and in float64.
  UNet2DModel nchw(cfg.model), exact(cfg.model);
  {
    torch::NoGradGuard no_grad;
    auto src = nhwc->parameters(), a = nchw->parameters(), b = exact->parameters();
    for (size_t i = 0; i < src.size(); ++i) a[i].copy_(src[i]), b[i].set_data(src[i].to(at::kDouble).contiguous());
  }
  torch::manual_seed(5);
  const auto x = torch::randn({4, 1, 8, 8}), t = torch::randint(1000, {4}, torch::kLong);
  const auto labels = torch::randint(10, {4}, torch::kLong);
  auto run = [&](UNet2DModel& m, const at::Tensor& input) {
    m->zero_grad();
    const auto out = m->forward(input, t, labels);
    (out.to(at::kDouble) * torch::linspace(-1, 1, out.numel(), torch::kDouble).view_as(out)).sum().backward();
    std::vector<at::Tensor> res = {out.detach()};
    for (auto& p : m->parameters()) res.push_back(p.grad().detach().clone());
    return res;
  };
  const auto cl = run(nhwc, x.contiguous(at::MemoryFormat::ChannelsLast)), plain = run(nchw, x), ref = run(exact, x.to(at::kDouble));
  EXPECT_TRUE(cl[0].is_contiguous(at::MemoryFormat::ChannelsLast)) << "the output left NHWC on the way";
  for (const auto& [stage, nhwc_out] : test::channels_last_trace(nhwc, x.contiguous(at::MemoryFormat::ChannelsLast), t, labels))
    EXPECT_TRUE(nhwc_out) << stage << " returned NCHW";
  // NHWC and NCHW convolutions (oneDNN) reduce in different orders and blockings, not the same
  // kernel in another order: a sum of K terms rounds by up to (K - 1)u of its magnitudes in
  // recursive order and ⌈log₂ K⌉u pairwise, so one order's error may exceed another's by that
  // ratio. K is the longest reduction: a weight gradient sums B·H·W = 4·8·8 = 256 products, an up
  // block's 3x3 convolution 9 · 64 = 576 inputs (its concatenated skip): 575 / 10 ≈ 58.
  const double K = std::max(4.0 * 8 * 8, 9.0 * 2 * cfg.model.block_out_channels.back());
  const double order_factor = (K - 1) / std::ceil(std::log2(K));
  for (size_t i = 0; i < cl.size(); ++i)
    EXPECT_TRUE(test::as_accurate_as(cl[i].contiguous(), plain[i].contiguous(), ref[i], order_factor))
        << (i == 0 ? "output" : "gradient ") << i;
  EXPECT_NO_THROW(trainer.train_step());
}

// Every random stream is seeded from (run.seed, purpose, rank) (rng.h), not drawn in call order:
// EMA on builds one more model, and must leave the dropout noise, hence the model's trajectory,
// unchanged. A run whose dropout stream is disturbed on purpose shows that the noise matters.
TEST_F(TrainerSwitches, EmaOnOrOffLeavesTheTrajectoryUnchanged) {
  Config cfg = config();
  cfg.model.dropout = 0.3;
  auto run = [&](bool ema, const std::string& name, bool disturb) {
    Config c = cfg;
    c.ema.enabled = ema;
    Trainer t(c, stand_in_data(), options(name));
    if (disturb) (void)torch::rand({7});  // one draw from the dropout stream (the CPU's default generator)
    for (int k = 0; k < 3; ++k) t.train_step();
    std::vector<at::Tensor> out;
    for (auto& p : t.model()->parameters()) out.push_back(p.detach().clone());
    return out;
  };
  const auto on = run(true, "ema_on", false), off = run(false, "ema_off", false), disturbed = run(false, "disturbed", true);
  ASSERT_EQ(on.size(), off.size());
  bool all_equal = true;
  for (size_t i = 0; i < on.size(); ++i) EXPECT_TRUE(torch::equal(on[i], off[i])) << "tensor " << i;
  for (size_t i = 0; i < on.size(); ++i) all_equal = all_equal && torch::equal(disturbed[i], off[i]);
  EXPECT_FALSE(all_equal) << "dropout noise did not reach the weights: the test would not see a shifted stream";
}

TEST_F(TrainerSwitches, CudaOnlySwitchesOnACpu) {
  Config cfg = config();
  cfg.train.cuda_graph = true;
  try {
    Trainer t(cfg, stand_in_data(), options("graph"));
    FAIL() << "train.cuda_graph on a CPU was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("train.cuda_graph"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cpu"), std::string::npos) << e.what();
  }
  cfg.train.cuda_graph = false, cfg.train.cudnn_benchmark = true, cfg.train.allow_tf32 = true;
  Trainer t(cfg, stand_in_data(), options("ignored"));  // accepted with a warning: they act on CUDA only
  EXPECT_NO_THROW(t.train_step());
}

}  // namespace
}  // namespace difftrain

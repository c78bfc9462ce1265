// The whole training step against PyTorch and diffusers (issue 18, part 5; as llm.c tests its
// step against PyTorch): difftrain's Trainer and tests/reference/train_step_reference.py (diffusers'
// UNet2DModel, DDPMScheduler.add_noise, MSE with min-SNR-γ weights, clip_grad_norm_,
// torch.optim.AdamW, get_scheduler's LR, EMAModel) run 10 optimizer steps of 2 micro-batches from
// the same weights, batches, t and ε. The 10 losses, the final weights and the EMA must be as
// close to the reference's float64 run as its float32 run is (tests/numerics.h, as_accurate_as).
// Both the plain step and the capturable one (train.cuda_graph's state) are held to it.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/rng.h"
#include "difftrain/safetensors.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"
#include "numerics.h"
#include "stand_in.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

Config step_config(const fs::path& dir) {
  Config c;
  c.run.device = "cpu";
  c.run.output_dir = dir.string();
  c.run.seed = 3;
  c.model.sample_size = 8;
  c.model.block_out_channels = {16, 32};
  c.model.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  c.model.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  c.model.norm_num_groups = 8;
  c.data.channels = 1, c.data.resolution = 8, c.data.preload = true, c.data.num_workers = 0;
  c.train.batch_size = 4, c.train.gradient_accumulation_steps = 2, c.train.max_steps = 10;
  c.train.learning_rate = 2e-3, c.train.lr_warmup_steps = 3, c.train.lr_schedule = LrSchedule::cosine;
  c.train.weight_decay = 0.01, c.train.max_grad_norm = 1.0;
  c.train.mixed_precision = MixedPrecision::no;
  c.diffusion.snr_gamma = 5.0;
  c.ema.decay = 0.99, c.ema.power = 0.75;
  c.logging.log_every = 1, c.logging.sample_every = 0, c.logging.tensorboard = false;
  c.checkpoint.every = 1000;
  c.sampling.num_samples = 1, c.sampling.num_inference_steps = 1, c.sampling.num_final_samples = 0;
  return c;
}

std::vector<double> logged_losses(const fs::path& metrics) {
  std::ifstream in(metrics);
  std::vector<double> out;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("train/loss")) out.push_back(j["train/loss"].get<double>());
  }
  return out;
}

class TrainStep : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("difftrain_step_" + std::to_string(::getpid()) + (GetParam() ? "_capturable" : ""));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_P(TrainStep, TenStepsMatchPyTorchAndDiffusers) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python with diffusers (make test installs it)";
  const Config cfg = step_config(dir_);
  const auto data = test::stand_in_data(32, 8);
  TrainerOptions o;
  o.run_dir = dir_ / "run";
  o.capturable_state = GetParam();
  fs::create_directories(o.run_dir);
  Trainer trainer(cfg, data, o);

  // The reference's inputs: the initial weights, the loader's batches (a second loader with the
  // trainer's options draws the same ones), the trainer's generator seed, the config.
  NamedTensors weights;
  for (const auto& item : trainer.model()->named_parameters()) weights.emplace_back(item.key(), item.value().detach().clone());
  save_safetensors(dir_ / "weights.safetensors", weights);
  LoaderOptions lo;
  lo.batch_size = cfg.train.batch_size, lo.seed = static_cast<uint64_t>(cfg.run.seed), lo.num_workers = 0, lo.preload = true;
  lo.augment = AugmentOptions::from(cfg.data);
  Loader loader(data, lo, LoaderState{});
  std::vector<at::Tensor> batches;
  for (int64_t i = 0; i < cfg.train.max_steps * cfg.train.gradient_accumulation_steps; ++i) batches.push_back(loader.next().images);
  save_safetensors(dir_ / "batches.safetensors", {{"x0", torch::stack(batches)}});
  std::ofstream(dir_ / "seed.json")
      << nlohmann::json{{"seed", stream_seed(static_cast<uint64_t>(cfg.run.seed), SeedPurpose::global_batch)}}.dump();
  std::ofstream(dir_ / "config.json") << config_to_string(cfg);
  const fs::path ref_file = dir_ / "reference.safetensors";
  const std::string cmd = python + " " + test::source_dir() + "/tests/reference/train_step_reference.py " + dir_.string() +
                          " " + ref_file.string() + " >" + (dir_ / "log.txt").string() + " 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::ifstream log(dir_ / "log.txt");
    FAIL() << "train_step_reference.py failed:\n" << std::string(std::istreambuf_iterator<char>(log), {});
  }
  std::map<std::string, at::Tensor> ref;
  for (auto& [name, t] : load_safetensors(ref_file).tensors) ref[name] = t;

  ASSERT_EQ(trainer.train(), 0);
  const auto losses = logged_losses(o.run_dir / "metrics.jsonl");
  ASSERT_EQ(static_cast<int64_t>(losses.size()), cfg.train.max_steps);
  // The losses of the same weights and inputs: ours as close to float64 as the reference's float32.
  EXPECT_TRUE(test::as_accurate_as(torch::tensor(losses, torch::kDouble), ref.at("loss32"), ref.at("loss64"))) << "losses";
  // The weights and the EMA after 10 steps, tensor by tensor. Adam turns a rounding-size gradient
  // into a step-size update, for us and for the reference's float32 alike: the same bound holds.
  int compared = 0;
  for (const auto& item : trainer.model()->named_parameters()) {
    const auto& name = item.key();
    EXPECT_TRUE(test::as_accurate_as(item.value().detach(), ref.at("model32." + name), ref.at("model64." + name))) << name;
    ++compared;
  }
  auto shadow = trainer.sampling_model()->named_parameters();
  for (const auto& item : shadow) {
    const auto& name = item.key();
    EXPECT_TRUE(test::as_accurate_as(item.value().detach(), ref.at("ema32." + name), ref.at("ema64." + name))) << "ema " << name;
  }
  EXPECT_GT(compared, 20);
  // And the run learned something: the weights moved by far more than the bound above.
  double moved = 0;
  for (const auto& [name, w0] : weights) moved = std::max(moved, (ref.at("model64." + name) - w0.to(at::kDouble)).abs().max().item<double>());
  EXPECT_GT(moved, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(PlainAndCapturable, TrainStep, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) { return p.param ? "capturable" : "plain"; });

}  // namespace
}  // namespace difftrain

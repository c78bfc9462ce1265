// Model FLOPs against PyTorch's own counter: tests/reference/flop_count.py runs diffusers'
// UNet2DModel forward and backward under torch.utils.flop_counter.FlopCounterMode for three
// architectures, and model_flops must give the same count per image. Then the peak table.
#include <unistd.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "difftrain/config.h"
#include "difftrain/flops.h"
#include "difftrain/peak.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A model small enough to count by hand: one level of 8 channels, one ResNet down, the mid
// block's two ResNets without attention, two ResNets up, at 4x4 (16 positions), 1 channel in and
// out, time embedding 4 x 8 = 32.
TEST(Flops, HandCountedTinyModel) {
  ModelConfig m;
  m.sample_size = 4;
  m.block_out_channels = {8};
  m.down_block_types = {BlockType::DownBlock2D};
  m.up_block_types = {BlockType::UpBlock2D};
  m.add_attention = false;
  m.norm_num_groups = 4;
  const int64_t P = 16;                                  // positions
  const int64_t conv3_8_8 = 2 * P * 9 * 8 * 8;           // a 3x3 conv, 8 -> 8 channels
  const int64_t temb_proj = 2 * 32 * 8;                  // time_emb_proj, one row per image
  const int64_t resnet_8_8 = 2 * conv3_8_8 + temb_proj;  // conv1, time_emb_proj, conv2
  // An up ResNet on 8 + 8 concatenated channels: conv1 16 -> 8, time_emb_proj, conv2, 1x1 shortcut 16 -> 8.
  const int64_t resnet_16_8 = 2 * P * 9 * 16 * 8 + temb_proj + conv3_8_8 + 2 * P * 16 * 8;
  const int64_t linear_1 = 2 * 8 * 32, linear_2 = 2 * 32 * 32;
  const int64_t conv_in = 2 * P * 9 * 1 * 8, conv_out = 2 * P * 9 * 8 * 1;
  const int64_t forward =
      linear_1 + linear_2 + conv_in + resnet_8_8 /*down*/ + 2 * resnet_8_8 /*mid*/ + 2 * resnet_16_8 /*up*/ + conv_out;
  // Backward: grad-weight for every layer, grad-input for every layer whose input requires grad:
  // all but linear_1 (the sinusoidal embedding) and conv_in (the data).
  const int64_t backward = 2 * forward - linear_1 - conv_in;
  const ModelFlops f = model_flops(m);
  EXPECT_EQ(f.forward, forward);
  EXPECT_EQ(f.backward, backward);
  EXPECT_EQ(f.total(), forward + backward);
  EXPECT_EQ(model_flops(m, 4, 4).forward, forward);
}

// Attention costs 4·L²·C forward whatever the head split; a head split changes nothing.
TEST(Flops, AttentionDoesNotDependOnTheHeadSplit) {
  ModelConfig m;
  m.attention_head_dim = 16;
  const auto split = model_flops(m);
  m.attention_head_dim = std::nullopt;
  EXPECT_EQ(model_flops(m).forward, split.forward);
  EXPECT_EQ(model_flops(m).backward, split.backward);
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), {}};
}

struct Case {
  std::string name;
  ModelConfig model;
  int64_t batch, height, width;
};

// The three architectures: the built-in default (Config{}), the CIFAR-10 DDPM of Ho et al.
// (configs/cifar10_ddpm.json, 35.7M parameters), and a class-conditional one with a head split
// and FiLM time conditioning, at a non-square input. Batches of 2 and 3 check that the count is
// per image. The reference runs the models for real on the CPU (FlopCounterMode's Python
// dispatch dominates: about 10 s on a quiet 2-core machine); on the meta device SDPA would take
// its math path and count four backward bmm instead of the kernel's five.
std::vector<Case> cases() {
  ModelConfig cond;
  cond.sample_size = 16;
  cond.in_channels = cond.out_channels = 3;
  cond.block_out_channels = {32, 64, 64};
  cond.layers_per_block = 2;
  cond.down_block_types = {BlockType::AttnDownBlock2D, BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  cond.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D, BlockType::AttnUpBlock2D};
  cond.attention_head_dim = 16;
  cond.resnet_time_scale_shift = TimeScaleShift::scale_shift;
  cond.num_class_embeds = 10;
  const ModelConfig cifar = load_config(test::source_dir() + "/configs/cifar10_ddpm.json").model;
  return {{"default", Config{}.model, 2, Config{}.model.sample_size, Config{}.model.sample_size},
          {"cifar10_ddpm", cifar, 1, cifar.sample_size, cifar.sample_size},  // 37 GFLOP a step: one image is enough
          {"class_conditional", cond, 3, 16, 24}};
}

// Exact equality: both sides count the same products of the same integer shapes (the forward,
// and the backward with grad-input only where the input requires grad), so any difference is a
// layer counted wrongly, not rounding. This is far inside the 2% the issue asked for. One test
// for the three, so that ctest (a process per test) runs the Python once.
TEST(Flops, EqualFlopCounterModeOnDiffusersUNet2DModel) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python with diffusers (make test installs it)";
  const auto all = cases();
  const fs::path dir = fs::temp_directory_path() / ("difftrain_flops_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  json in = json::array();
  for (const auto& c : all) {
    Config cfg;
    cfg.model = c.model;
    in.push_back({{"name", c.name},
                  {"model", config_to_json(cfg)["model"]},
                  {"batch", c.batch},
                  {"height", c.height},
                  {"width", c.width}});
  }
  std::ofstream(dir / "cases.json") << in.dump(1);
  const std::string cmd = python + " " + test::source_dir() + "/tests/reference/flop_count.py " + (dir / "cases.json").string() +
                          " >" + (dir / "out.json").string() + " 2>" + (dir / "err.txt").string();
  const int rc = std::system(cmd.c_str());
  const std::string out = slurp(dir / "out.json"), err = slurp(dir / "err.txt");
  fs::remove_all(dir);
  ASSERT_EQ(rc, 0) << "flop_count.py failed:\n" << err;
  const json ref = json::parse(out);

  for (const auto& c : all) {
    SCOPED_TRACE(c.name);
    ASSERT_TRUE(ref.contains(c.name)) << out;
    const auto& r = ref[c.name];
    const ModelFlops f = model_flops(c.model, c.height, c.width);
    EXPECT_EQ(f.forward, r["forward"].get<int64_t>()) << "FlopCounterMode's ops " << r["ops"]["forward"].dump();
    EXPECT_EQ(f.backward, r["backward"].get<int64_t>()) << "FlopCounterMode's ops " << r["ops"]["backward"].dump();
    // The attention kernels were counted (flop_count.py registers SDPA's formulas for the CPU kernel).
    EXPECT_TRUE(r["ops"]["forward"].contains("aten._scaled_dot_product_flash_attention_for_cpu")) << r["ops"].dump();
    EXPECT_TRUE(r["ops"]["backward"].contains("aten._scaled_dot_product_flash_attention_for_cpu_backward")) << r["ops"].dump();
  }
  // DESIGN.md §6 quotes the CIFAR-10 model at about 12.4 GFLOP forward and 37 forward plus backward at 32x32.
  const ModelFlops cifar = model_flops(all[1].model);
  EXPECT_NEAR(static_cast<double>(cifar.forward) / 1e9, 12.4, 0.05);
  EXPECT_NEAR(static_cast<double>(cifar.total()) / 1e9, 37.5, 0.05);
}

// ---------------------------------------------------------------------------------------------
// Peak TFLOP/s: the names CUDA reports, matched to datasheet values (src/peak.cpp cites them).

TEST(PeakTflops, KnownGpusByTheNamesCudaReports) {
  using P = PeakPrecision;
  struct Row {
    const char* name;
    P precision;
    double tflops;
  };
  const Row rows[] = {
      {"NVIDIA H200", P::bf16, 989.5},
      {"NVIDIA H200", P::fp32, 67},
      {"NVIDIA H200 NVL", P::bf16, 835.5},
      {"NVIDIA H100 80GB HBM3", P::bf16, 989.5},
      {"NVIDIA H100 80GB HBM3", P::tf32, 494.5},
      {"NVIDIA H100 PCIe", P::bf16, 756.5},
      {"NVIDIA H100 PCIe", P::fp32, 51},
      {"NVIDIA H100 NVL", P::fp16, 835.5},
      {"NVIDIA GH200 480GB", P::bf16, 989.5},
      {"NVIDIA A100-SXM4-80GB", P::bf16, 312},
      {"NVIDIA A100-SXM4-40GB", P::tf32, 156},
      {"NVIDIA A100 80GB PCIe", P::fp32, 19.5},
      {"NVIDIA A100-PCIE-40GB", P::fp16, 312},
      {"NVIDIA L40S", P::bf16, 362.05},
      {"NVIDIA L40", P::bf16, 181.05},
      {"NVIDIA L4", P::bf16, 121},
      {"NVIDIA L4", P::fp32, 30.3},
      {"NVIDIA GeForce RTX 4090", P::bf16, 165.2},
      {"NVIDIA A10G", P::bf16, 70},
      {"NVIDIA A10", P::bf16, 125},
      {"NVIDIA A40", P::tf32, 74.8},
      {"NVIDIA RTX A6000", P::bf16, 154.8},
      {"Tesla V100-SXM2-32GB", P::fp16, 125},
      {"Tesla V100-PCIE-16GB", P::fp16, 112},
      {"Tesla V100S-PCIE-32GB", P::fp32, 16.4},
      {"Tesla T4", P::fp16, 65},
  };
  for (const auto& r : rows) {
    const auto v = peak_tflops(r.name, r.precision);
    ASSERT_TRUE(v.has_value()) << r.name << " " << to_string(r.precision);
    EXPECT_DOUBLE_EQ(*v, r.tflops) << r.name << " " << to_string(r.precision);
  }
}

TEST(PeakTflops, NameVariantsAndUnknowns) {
  using P = PeakPrecision;
  // Case, hyphens and extra tokens do not matter; the variant token picks the part.
  EXPECT_EQ(peak_tflops("nvidia h100-sxm5-80gb", P::bf16), 989.5);
  EXPECT_EQ(peak_tflops("H100 PCIe", P::bf16), 756.5);
  EXPECT_EQ(peak_tflops("NVIDIA A100-SXM4-40GB MIG 1g.5gb", P::bf16), 312);  // whole-GPU peak; MIG slices are not scaled
  // Tokens are whole: an A10 is not an A100, an L40 not an L4 or an L40S.
  EXPECT_EQ(peak_tflops("NVIDIA A10", P::fp32), 31.2);
  EXPECT_EQ(peak_tflops("NVIDIA L40", P::fp32), 90.5);
  // Before Ampere: no bf16 tensor cores; TF32 does not exist, so allow_tf32 computes in fp32.
  EXPECT_EQ(peak_tflops("Tesla V100-SXM2-32GB", P::bf16), std::nullopt);
  EXPECT_EQ(peak_tflops("Tesla V100-SXM2-32GB", P::tf32), 15.7);
  EXPECT_EQ(peak_tflops("Tesla T4", P::bf16), std::nullopt);
  // Not in the table.
  EXPECT_EQ(peak_tflops("NVIDIA GeForce GTX 1080", P::fp32), std::nullopt);
  EXPECT_EQ(peak_tflops("AMD Instinct MI300X", P::bf16), std::nullopt);
  EXPECT_EQ(peak_tflops("", P::bf16), std::nullopt);
  // Dense figures: half the 2:4-sparse ones of the Hopper datasheets (H100 SXM: 1,979 with sparsity).
  EXPECT_EQ(*peak_tflops("NVIDIA H100 80GB HBM3", P::bf16) * 2, 1979);
}

TEST(PeakTflops, ChoosePeak) {
  using P = PeakPrecision;
  // run.peak_tflops wins, on any device.
  const auto set = choose_peak(123.0, std::nullopt, P::fp32);
  ASSERT_TRUE(set);
  EXPECT_EQ(set->tflops, 123.0);
  EXPECT_EQ(set->source, "run.peak_tflops");
  EXPECT_EQ(choose_peak(50.0, "NVIDIA H200", P::bf16)->tflops, 50.0);
  // Else the table, by the GPU's name and the training precision.
  const auto table = choose_peak(0.0, "NVIDIA H200", P::bf16);
  ASSERT_TRUE(table);
  EXPECT_EQ(table->tflops, 989.5);
  EXPECT_NE(table->source.find("NVIDIA H200"), std::string::npos) << table->source;
  EXPECT_EQ(choose_peak(0.0, "NVIDIA A100-SXM4-80GB", P::tf32)->tflops, 156);
  // No MFU on a CPU or on a GPU the table does not know.
  EXPECT_FALSE(choose_peak(0.0, std::nullopt, P::bf16));
  EXPECT_FALSE(choose_peak(0.0, "Some Future GPU", P::bf16));
}

// The attention layers of the default model, from the same walk: the third level's AttnDownBlock2D
// (one layer), the mid block, and the first AttnUpBlock2D (layers_per_block + 1 = 2), all with 64
// channels on the 7x7 grid of a 28x28 input.
TEST(Flops, AttentionLayersOfTheDefaultModel) {
  const auto layers = attention_layers(Config{}.model, 28, 28);
  ASSERT_EQ(layers.size(), 4u);
  for (const auto& l : layers) {
    EXPECT_EQ(l.channels, 64);
    EXPECT_EQ(l.height, 7);
    EXPECT_EQ(l.width, 7);
  }
}

}  // namespace
}  // namespace difftrain

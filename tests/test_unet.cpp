// UNet2D against diffusers' UNet2DModel (same weights by name, same outputs), shapes, the DDPM
// CIFAR-10 parameter count, gradients, and SDPA against explicit attention.
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/unet.h"
#include "numerics.h"
#include "reference.h"
#include "test_paths.h"

namespace difftrain {
namespace {

ModelConfig model_from(const nlohmann::json& model, int64_t resolution) {
  nlohmann::ordered_json doc;
  doc["model"] = nlohmann::ordered_json::parse(model.dump());
  doc["data"] = {{"channels", model["in_channels"]}, {"resolution", resolution}};
  return config_from_json(doc).model;
}

TEST(UNetVsDiffusers, SameWeightsByNameGiveTheSameOutput) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  for (const auto& c : test::load_json(dir + "/unet_cases.json")) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const auto ref = test::load_tensors(dir + "/unet_" + name + ".pt");
    UNet2DModel model(model_from(c["model"], c["model"]["sample_size"]));
    model->eval();

    // One-to-one names: every diffusers tensor has a home here and every tensor here is in diffusers'.
    std::set<std::string> theirs, ours;
    for (const auto& [k, v] : ref)
      if (k.rfind("param.", 0) == 0) theirs.insert(k.substr(6));
    torch::NoGradGuard no_grad;
    for (auto& p : model->named_parameters()) {
      ours.insert(p.key());
      ASSERT_TRUE(ref.count("param." + p.key())) << "diffusers has no " << p.key();
      const auto& src = ref.at("param." + p.key());
      ASSERT_EQ(p.value().sizes(), src.sizes()) << p.key();
      p.value().copy_(src);
    }
    for (auto& b : model->named_buffers()) ours.insert(b.key());
    EXPECT_EQ(ours, theirs);

    const auto labels = ref.count("class_labels") ? ref.at("class_labels") : torch::Tensor();
    const auto out = model->forward(ref.at("sample"), ref.at("timesteps"), labels);
    const auto& want = ref.at("output");
    ASSERT_EQ(out.sizes(), want.sizes());
    EXPECT_TRUE(test::as_accurate_as(out, want, ref.at("output64")))
        << "max abs difference from diffusers " << (out - want).abs().max().item<double>();
  }
}

TEST(UNetVsDiffusers, PresetParameterCounts) {
  DIFFTRAIN_REQUIRE_REFERENCE(dir);
  const auto counts = test::load_json(dir + "/param_counts.json");
  for (const char* preset : {"cifar10_ddpm", "fashion_mnist", "quickstart"}) {
    const Config cfg = load_config(test::source_dir() + "/configs/" + preset + ".json");
    UNet2DModel model(cfg.model);
    EXPECT_EQ(count_parameters(*model), counts[preset].get<int64_t>()) << preset;
  }
}

TEST(UNet, Cifar10PresetHasThePublishedSize) {
  // Ho et al. 2020, Appendix B: "Our CIFAR10 model has 35.7 million parameters".
  const Config cfg = load_config(test::source_dir() + "/configs/cifar10_ddpm.json");
  UNet2DModel model(cfg.model);
  const double millions = static_cast<double>(count_parameters(*model)) / 1e6;
  EXPECT_NEAR(millions, 35.7, 0.05) << "rounds to 35.7M";
}

ModelConfig small(std::vector<int> channels, int sample, int in = 1) {
  ModelConfig m;
  m.block_out_channels = channels;
  m.down_block_types.assign(channels.size(), BlockType::DownBlock2D);
  m.up_block_types.assign(channels.size(), BlockType::UpBlock2D);
  m.down_block_types[1] = BlockType::AttnDownBlock2D;
  m.up_block_types[channels.size() - 2] = BlockType::AttnUpBlock2D;
  m.norm_num_groups = 8;
  m.sample_size = sample;
  m.in_channels = m.out_channels = in;
  return m;
}

TEST(UNet, OutputShapeMatchesInputForOddAndNonSquareSizes) {
  torch::NoGradGuard no_grad;
  struct Case {
    std::vector<int> ch;
    int64_t h, w, c;
  };
  for (const Case& k : {Case{{16, 32, 32}, 28, 28, 1}, Case{{16, 32, 32}, 12, 20, 3}, Case{{16, 32}, 6, 10, 1},
                        Case{{16, 32, 32, 32}, 32, 24, 3}}) {
    UNet2DModel model(small(k.ch, static_cast<int>(k.h), static_cast<int>(k.c)));
    const auto out = model->forward(torch::randn({2, k.c, k.h, k.w}), torch::tensor({3L, 700L}));
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, k.c, k.h, k.w})) << k.h << "x" << k.w;
  }
  // A scalar timestep broadcasts over the batch, as in diffusers.
  UNet2DModel model(small({16, 32}, 8));
  model->eval();
  const auto x = torch::randn({3, 1, 8, 8});
  EXPECT_TRUE(torch::allclose(model->forward(x, torch::tensor(5L)), model->forward(x, torch::full({3}, 5L))));
}

TEST(UNet, EveryParameterGetsAGradient) {
  ModelConfig m = small({16, 32, 32}, 16);
  m.num_class_embeds = 3;
  m.resnet_time_scale_shift = TimeScaleShift::scale_shift;
  UNet2DModel model(m);
  const auto out = model->forward(torch::randn({2, 1, 16, 16}), torch::tensor({1L, 999L}), torch::tensor({0L, 3L}));
  out.pow(2).mean().backward();
  for (const auto& p : model->named_parameters()) {
    if (p.key() == "class_embedding.weight") {  // only the rows of the labels used
      EXPECT_GT(p.value().grad()[0].abs().sum().item<double>(), 0.0);
      EXPECT_GT(p.value().grad()[3].abs().sum().item<double>(), 0.0);
      continue;
    }
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  }
}

TEST(UNet, ClassLabelsAreCheckedAndChangeTheOutput) {
  ModelConfig m = small({16, 32}, 8);
  UNet2DModel uncond(m);
  EXPECT_THROW(uncond->forward(torch::randn({1, 1, 8, 8}), torch::tensor({1L}), torch::tensor({0L})), c10::Error);
  m.num_class_embeds = 4;
  UNet2DModel cond(m);
  EXPECT_EQ(cond->null_class(), 4);
  EXPECT_EQ(cond->class_embedding->weight.size(0), 5);  // 4 classes + the null class
  EXPECT_THROW(cond->forward(torch::randn({1, 1, 8, 8}), torch::tensor({1L})), c10::Error);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 1, 8, 8});
  EXPECT_FALSE(torch::allclose(cond->forward(x, torch::tensor({1L}), torch::tensor({0L})),
                               cond->forward(x, torch::tensor({1L}), torch::tensor({4L}))));
}

TEST(UNet, SdpaEqualsExplicitAttention) {
  torch::manual_seed(0);
  const auto q = torch::randn({2, 4, 64, 16}), k = torch::randn({2, 4, 64, 16}), v = torch::randn({2, 4, 64, 16});
  // Both are float32 evaluations of softmax(QKᵀ/√d)V; the explicit one in float64 is the exact
  // value, and SDPA must be as close to it as the explicit float32 one (tests/numerics.h).
  const auto exact = attention(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble), false);
  EXPECT_TRUE(test::as_accurate_as(attention(q, k, v, true), attention(q, k, v, false), exact));
  // And through a whole model, against the model in float64 with explicit attention.
  UNet2DModel model(small({16, 32}, 8));
  model->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 1, 8, 8});
  const auto a = model->forward(x, torch::tensor({2L, 9L}));
  model->set_use_sdpa(false);
  const auto explicit32 = model->forward(x, torch::tensor({2L, 9L}));
  model->to(torch::kDouble);
  const auto exact_model = model->forward(x.to(torch::kDouble), torch::tensor({2L, 9L}));
  EXPECT_TRUE(test::as_accurate_as(a, explicit32, exact_model));
}

TEST(UNet, TimestepEmbeddingClosedForm) {
  // dim 6, shift 1: freq_i = 10000^(-i/2), i = 0..2; flip puts cos first.
  const auto e = timestep_embedding(torch::tensor({3.0f}), 6, /*flip_sin_to_cos=*/true, /*freq_shift=*/1.0);
  for (int i = 0; i < 3; ++i) {
    const double f = std::pow(10000.0, -static_cast<double>(i) / 2.0);
    // float32: the exponent's exp (1 ulp), the product with t = 3 (3·f < 3: 2 ulps of 3 at most),
    // then cos/sin of an argument off by that much: |Δ| <= 4ε·3 + 2ε.
    const double bound = 14 * test::kFloatEps;
    EXPECT_NEAR(e[0][i].item<double>(), std::cos(3.0 * f), bound);
    EXPECT_NEAR(e[0][3 + i].item<double>(), std::sin(3.0 * f), bound);
  }
}

}  // namespace
}  // namespace difftrain

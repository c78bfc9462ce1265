// The sampling pipeline: determinism, classifier-free guidance, uint8 conversion, grids.
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/sampling.h"
#include "numerics.h"

namespace difftrain {
namespace {

UNet2DModel tiny(std::optional<int> classes = std::nullopt) {
  ModelConfig m;
  m.block_out_channels = {16, 32};
  m.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  m.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  m.norm_num_groups = 8;
  m.sample_size = 8;
  m.num_class_embeds = classes;
  torch::manual_seed(0);
  return UNet2DModel(m);
}

SamplingOptions opts(Sampler sampler, int64_t steps) {
  SamplingOptions o;
  o.sampler = sampler;
  o.num_inference_steps = steps;
  o.num_samples = 3;
  o.batch_size = 2;
  return o;
}

TEST(Sampling, SeedFixesTheResult) {
  auto model = tiny();
  for (Sampler s : {Sampler::ddim, Sampler::ddpm}) {
    SamplingOptions o = opts(s, 5);
    o.eta = 0.5;
    const auto a = generate(model, SchedulerConfig{}, o, torch::kCPU);
    EXPECT_EQ(a.sizes(), (std::vector<int64_t>{3, 1, 8, 8}));
    EXPECT_TRUE(torch::equal(a, generate(model, SchedulerConfig{}, o, torch::kCPU)));
    o.seed = 1;
    EXPECT_FALSE(torch::equal(a, generate(model, SchedulerConfig{}, o, torch::kCPU)));
  }
  EXPECT_TRUE(model->is_training()) << "generate restores the training mode";
}

TEST(Sampling, GuidanceCombinesConditionalAndNullClass) {
  auto model = tiny(4);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 1, 8, 8});
  const auto t = torch::tensor({10L, 600L}), y = torch::tensor({1L, 3L});
  const auto cond = model->forward(x, t, y), uncond = model->forward(x, t, torch::full({2}, 4L));
  EXPECT_TRUE(torch::allclose(guided_model_output(model, x, t, y, 1.0), cond));  // scale 1 is conditional sampling
  // The same batch of 2B as guided_model_output (a batch of B may round otherwise in the kernels),
  // so only eq. 6 rounds: a sub, a mul and an add, u each of |uncond| + 3|cond - uncond|, on our side.
  const auto both = model->forward(torch::cat({x, x}), torch::cat({t, t}), torch::cat({y, torch::full({2}, 4L)}));
  const auto c2 = both.slice(0, 0, 2), u2 = both.slice(0, 2);
  EXPECT_TRUE(test::within_ulps(guided_model_output(model, x, t, y, 3.0), u2 + 3.0 * (c2 - u2),
                                (u2.abs() + 3 * (c2.abs() + u2.abs())).to(torch::kDouble), 3));
  // Through the whole pipeline: a scale near 1 converges to the conditional result.
  SamplingOptions o = opts(Sampler::ddim, 4);
  o.class_labels = {2};
  const auto plain = generate(model, SchedulerConfig{}, o, torch::kCPU);
  o.guidance_scale = 1.0 + 1e-6;
  // Not a rounding bound: the scale moves each model output by 1e-6 |cond - uncond|, and the 2B batch
  // rounds its forward otherwise than the B batch of the plain sampler (kernel choice by batch size);
  // four DDIM steps carry both into the sample. 1e-4 is far above either and far below a wrong
  // formula's effect, which is of the order of the outputs (checked just above).
  EXPECT_TRUE(torch::allclose(plain, generate(model, SchedulerConfig{}, o, torch::kCPU), 1e-4, 1e-4));
}

// An EDM model through generate(): one Euler step from σ_0 = σ_max to 0 returns D(x_0; σ_max) =
// c_skip x_0 + c_out F(c_in x_0; ¼ ln σ_max) with guidance on F, for x_0 = σ_max z and z the first
// draw of the seeded generator. Computed here from the same 2B batch and the same float32
// operations; the Euler step x + (x - D)/σ · (0 - σ) lands on D up to a few u of |x_0| (its
// subtraction cancels x_0), on top of those of c_skip |x_0| + c_out (|F_∅| + 3 |F_c - F_∅|).
TEST(Sampling, EdmGenerateIsThePreconditionedGuidedDenoiser) {
  auto model = tiny(4);
  model->eval();
  SamplingOptions o = opts(Sampler::euler, 1);
  o.num_samples = 2, o.class_labels = {1, 3}, o.guidance_scale = 3.0, o.seed = 9;
  const EDMConfig edm;
  const auto got = generate(model, edm, o, torch::kCPU);
  torch::NoGradGuard no_grad;
  auto gen = at::globalContext().defaultGenerator(torch::kCPU).clone();
  gen.set_current_seed(9);
  const auto x0 = torch::randn({2, 1, 8, 8}, gen) * 80.0f;
  const auto c = edm_preconditioning(torch::full({}, 80.0f), edm.sigma_data);
  const auto t = c.c_noise.expand({2}).contiguous(), y = torch::tensor({1L, 3L});
  const auto both = model->forward(torch::cat({x0, x0}) * c.c_in.item<float>(), torch::cat({t, t}),
                                   torch::cat({y, torch::full({2}, 4L)}));  // (2B, C, H, W)
  const auto fc = both.slice(0, 0, 2), fu = both.slice(0, 2);
  const auto want = c.c_skip * x0 + c.c_out * (fu + 3.0 * (fc - fu));
  const auto scale = x0.abs() + c.c_out.item<double>() * (fu.abs() + 3 * (fc - fu).abs());
  EXPECT_TRUE(test::within_ulps(got, want, scale.to(torch::kDouble), 8));
  EXPECT_TRUE(torch::equal(got, generate(model, edm, o, torch::kCPU))) << "the seed fixes the result";
  EXPECT_EQ(sampler_nfe(o), 1);
  o.sampler = Sampler::heun, o.num_inference_steps = 18;
  EXPECT_EQ(sampler_nfe(o), 35);
  EXPECT_THROW(generate(model, SchedulerConfig{}, o, torch::kCPU), c10::Error) << "heun is not a DDPM sampler";
  o.sampler = Sampler::ddim;
  EXPECT_THROW(generate(model, edm, o, torch::kCPU), c10::Error) << "ddim is not an EDM sampler";
}

TEST(Sampling, BadLabelsAreRejected) {
  auto uncond = tiny(), cond = tiny(4);
  SamplingOptions o = opts(Sampler::ddim, 2);
  o.class_labels = {1};
  EXPECT_THROW(generate(uncond, SchedulerConfig{}, o, torch::kCPU), c10::Error);
  o.class_labels = {4};  // the null class is not a label
  EXPECT_THROW(generate(cond, SchedulerConfig{}, o, torch::kCPU), c10::Error);
  o.class_labels = {};
  o.guidance_scale = 2.0;
  EXPECT_THROW(generate(uncond, SchedulerConfig{}, o, torch::kCPU), c10::Error);
}

TEST(Sampling, Uint8LikeDiffusersPipelines) {
  const auto u = to_uint8(torch::tensor({-2.0f, -1.0f, 0.0f, 0.5f, 1.0f, 3.0f}));
  // (x/2 + 0.5).clamp(0, 1) * 255, rounded half to even: 0.5 -> 191.25 -> 191, 0 -> 127.5 -> 128.
  EXPECT_EQ(std::vector<uint8_t>(u.data_ptr<uint8_t>(), u.data_ptr<uint8_t>() + 6), (std::vector<uint8_t>{0, 0, 128, 191, 255, 255}));
}

TEST(Sampling, GridLaysOutLikeTorchvision) {
  const auto images = torch::arange(1, 6, torch::kByte).view({5, 1, 1, 1}).expand({5, 1, 3, 2}).contiguous();
  const auto grid = make_grid(images, /*nrow=*/2, /*padding=*/1);
  EXPECT_EQ(grid.sizes(), (std::vector<int64_t>{1, 3 * (3 + 1) + 1, 2 * (2 + 1) + 1}));
  EXPECT_EQ(grid[0][1][1].item<int>(), 1);       // first image, top-left
  EXPECT_EQ(grid[0][1][4].item<int>(), 2);       // second image, same row
  EXPECT_EQ(grid[0][5][1].item<int>(), 3);       // third image starts the second row
  EXPECT_EQ(grid[0][9][4].item<int>(), 0);       // the sixth cell is empty padding
  EXPECT_EQ(grid[0][0][0].item<int>(), 0);
  EXPECT_THROW(make_grid(images, /*nrow=*/0), c10::Error);
}

}  // namespace
}  // namespace difftrain

// group_norm_silu on the CPU (the reference the CUDA kernels are tested against) against autograd
// of at::group_norm + at::silu: the output and the gradients in x, γ and β, in float64, float32
// and bf16, NCHW and channels-last; under autocast; and the UNet with the switch on against off.
// Tolerances: groupnorm_silu_scales.h.
#include <cmath>

#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/amp.h"
#include "difftrain/groupnorm_silu.h"
#include "difftrain/unet.h"
#include "groupnorm_silu_scales.h"
#include "numerics.h"

namespace difftrain {
namespace {

using test::close;
using test::scales_of;

struct Case {
  std::vector<int64_t> shape;  // (N, C, *)
  int64_t groups;
};
// Several groups and samples, one channel per group, one group, odd spatial sizes, a 1-D input, and
// the CIFAR-10 preset's 128 channels in 32 groups at 32x32 (a batch of 2).
const std::vector<Case> kCases = {{{2, 8, 6, 5}, 2}, {{3, 12, 5, 7}, 4}, {{1, 32, 4, 4}, 32},
                                  {{4, 6, 3, 3}, 1}, {{2, 16, 9}, 4},    {{2, 128, 32, 32}, 32}};

struct Grads {
  at::Tensor y, dx, dw, db;
};

// y and the gradients of Σ y·dy, through `f`.
template <class F> Grads run(F f, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& dy) {
  auto xv = x.detach().clone().requires_grad_(true), wv = w.detach().clone().requires_grad_(true);
  auto bv = b.detach().clone().requires_grad_(true);
  auto y = f(xv, wv, bv);
  y.backward(dy);
  return {y.detach(), xv.grad(), wv.grad(), bv.grad()};
}

Grads fused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& dy, int64_t groups) {
  return run([&](auto& xv, auto& wv, auto& bv) { return group_norm_silu(xv, groups, wv, bv, test::kGroupNormEps); }, x, w, b, dy);
}
Grads unfused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& dy, int64_t groups) {
  return run([&](auto& xv, auto& wv, auto& bv) { return at::silu(at::group_norm(xv, groups, wv, bv, test::kGroupNormEps)); }, x,
             w, b, dy);
}

struct Inputs {
  at::Tensor x, w, b, dy;  // float64
};
Inputs inputs(const Case& c, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t C = c.shape[1];
  // An offset and a spread per channel, as activations have: the mean matters to the variance.
  auto x = at::randn(c.shape, gen, f64) * 2.0 + 0.5;
  auto w = 1.0 + 0.5 * at::randn({C}, gen, f64), b = 0.5 * at::randn({C}, gen, f64);
  return {x, w, b, at::randn(c.shape, gen, f64)};
}

// float64: the same formulas in another summation order (ATen's Welford-style moments, ours two
// passes): a few ulps per rounding, a reduction of D terms at most D of them (the worst case).
TEST(GroupNormSiLU, Float64MatchesAutogradOfGroupNormAndSiLU) {
  constexpr double eps64 = 0x1p-52;
  for (const auto& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "shape " << at::IntArrayRef(c.shape) << ", " << c.groups << " groups");
    const auto in = inputs(c, 1);
    const auto s = scales_of(in.x, in.w, in.b, in.dy, c.groups);
    const auto got = fused(in.x, in.w, in.b, in.dy, c.groups), want = unfused(in.x, in.w, in.b, in.dy, c.groups);
    const double ulps_d = 4.0 * static_cast<double>(s.group_size) + 16, ulps_c = 4.0 * static_cast<double>(s.channel_terms) + 16;
    EXPECT_TRUE(close("y", got.y, want.y, s.y, ulps_d, eps64));
    EXPECT_TRUE(close("dx", got.dx, want.dx, s.dx, ulps_d, eps64));
    EXPECT_TRUE(close("dγ", got.dw, want.dw, s.dw, ulps_c, eps64));
    EXPECT_TRUE(close("dβ", got.db, want.db, s.db, ulps_c, eps64));
  }
}

// float32 inputs against the float64 value of the same inputs (the exact answer to float64
// precision): float32 statistics and arithmetic, so 2√D + 16 ulps (two passes over the group: √D
// each for random rounding; the element-wise chain, above) for y and dx, and 2√(N·HW) + 16 for
// the per-channel sums.
TEST(GroupNormSiLU, Float32WithinItsRoundingOfFloat64) {
  for (const auto& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "shape " << at::IntArrayRef(c.shape) << ", " << c.groups << " groups");
    const auto in = inputs(c, 2);
    const auto x = in.x.to(at::kFloat), w = in.w.to(at::kFloat), b = in.b.to(at::kFloat), dy = in.dy.to(at::kFloat);
    const auto s = scales_of(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    const auto got = fused(x, w, b, dy, c.groups);
    const auto want = unfused(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    ASSERT_EQ(got.y.scalar_type(), at::kFloat);
    const double ulps_d = 2 * std::sqrt(static_cast<double>(s.group_size)) + 16;
    const double ulps_c = 2 * std::sqrt(static_cast<double>(s.channel_terms)) + 16;
    EXPECT_TRUE(close("y", got.y, want.y, s.y, ulps_d, test::kFloatEps));
    EXPECT_TRUE(close("dx", got.dx, want.dx, s.dx, ulps_d, test::kFloatEps));
    EXPECT_TRUE(close("dγ", got.dw, want.dw, s.dw, ulps_c, test::kFloatEps));
    EXPECT_TRUE(close("dβ", got.db, want.db, s.db, ulps_c, test::kFloatEps));
  }
}

// bf16 x and dy (γ, β float32, as under autocast) against float64 of the same values: y and dx are
// rounded to bf16 once at the end (bf16's unit roundoff 2⁻⁸ = 3.9e-3 relative, an 8-bit significand),
// dγ and dβ are float32; 1e-2 of the scale is 2.5 times that rounding, room for the float32 error.
TEST(GroupNormSiLU, Bf16WithinBf16RoundingOfFloat64) {
  for (const auto& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "shape " << at::IntArrayRef(c.shape) << ", " << c.groups << " groups");
    const auto in = inputs(c, 3);
    const auto x = in.x.to(at::kBFloat16), dy = in.dy.to(at::kBFloat16), w = in.w.to(at::kFloat), b = in.b.to(at::kFloat);
    const auto s = scales_of(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    const auto got = fused(x, w, b, dy, c.groups);
    const auto want = unfused(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    EXPECT_EQ(got.y.scalar_type(), at::kBFloat16);
    EXPECT_EQ(got.dx.scalar_type(), at::kBFloat16);
    EXPECT_EQ(got.dw.scalar_type(), at::kFloat);
    EXPECT_TRUE(close("y", got.y, want.y, s.y, 1e-2, 1.0));
    EXPECT_TRUE(close("dx", got.dx, want.dx, s.dx, 1e-2, 1.0));
    EXPECT_TRUE(close("dγ", got.dw, want.dw, s.dw, 1e-2, 1.0));
    EXPECT_TRUE(close("dβ", got.db, want.db, s.db, 1e-2, 1.0));
  }
}

// Channels-last in, channels-last out, the same numbers up to summation order: reshaping an NHWC
// tensor to (N, G, D) may give a strided view, whose reductions ATen vectorizes in another order
// (float32 tolerance as above).
TEST(GroupNormSiLU, ChannelsLastEqualsNchw) {
  for (const auto& c : kCases) {
    if (c.shape.size() != 4) continue;
    SCOPED_TRACE(::testing::Message() << "shape " << at::IntArrayRef(c.shape) << ", " << c.groups << " groups");
    const auto in = inputs(c, 4);
    const auto x = in.x.to(at::kFloat), w = in.w.to(at::kFloat), b = in.b.to(at::kFloat), dy = in.dy.to(at::kFloat);
    const auto s = scales_of(in.x, in.w, in.b, in.dy, c.groups);
    const auto nchw = fused(x, w, b, dy, c.groups);
    const auto nhwc =
        fused(x.contiguous(at::MemoryFormat::ChannelsLast), w, b, dy.contiguous(at::MemoryFormat::ChannelsLast), c.groups);
    EXPECT_TRUE(nhwc.y.is_contiguous(at::MemoryFormat::ChannelsLast));
    EXPECT_TRUE(nhwc.dx.is_contiguous(at::MemoryFormat::ChannelsLast));
    const double ulps_d = 2 * std::sqrt(static_cast<double>(s.group_size)) + 16;
    const double ulps_c = 2 * std::sqrt(static_cast<double>(s.channel_terms)) + 16;
    EXPECT_TRUE(close("y", nhwc.y, nchw.y, s.y, ulps_d, test::kFloatEps));
    EXPECT_TRUE(close("dx", nhwc.dx, nchw.dx, s.dx, ulps_d, test::kFloatEps));
    EXPECT_TRUE(close("dγ", nhwc.dw, nchw.dw, s.dw, ulps_c, test::kFloatEps));
    EXPECT_TRUE(close("dβ", nhwc.db, nchw.db, s.db, ulps_c, test::kFloatEps));
  }
}

// Under autocast the op reads bf16, computes in float32 and rounds once to bf16: within bf16's unit
// roundoff 2⁻⁸ of the exact value, plus the float32 error (2√D + 16 ulps of the scale, as above).
// (CUDA autocast runs group_norm in float32 and leaves the cast to the convolution: one rounding
// too. CPU autocast runs it in bf16, then silu in bf16: two.)
TEST(GroupNormSiLU, UnderAutocastOneBf16Rounding) {
  const Case c{{2, 16, 8, 8}, 4};
  const auto in = inputs(c, 5);
  const auto x = in.x.to(at::kBFloat16), w = in.w.to(at::kFloat), b = in.b.to(at::kFloat);
  at::Tensor y;
  {
    AutocastScope autocast(c10::DeviceType::CPU, at::kBFloat16);
    y = group_norm_silu(x, c.groups, w, b, test::kGroupNormEps);
  }
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  const auto x64 = x.to(at::kDouble), w64 = w.to(at::kDouble), b64 = b.to(at::kDouble);
  const auto exact = at::silu(at::group_norm(x64, c.groups, w64, b64, test::kGroupNormEps));
  const auto s = scales_of(x64, w64, b64, at::ones_like(x64), c.groups);
  const double ulps = 2 * std::sqrt(static_cast<double>(s.group_size)) + 16;
  const auto err = (y.to(at::kDouble) - exact).abs();
  EXPECT_TRUE((err <= 0x1p-8 * exact.abs() + ulps * test::kFloatEps * s.y).all().item<bool>())
      << "max error " << err.max().item<double>();
}

// ---------------------------------------------------------------------------------------------
// The UNet with the switch on computes the same function as with it off.

ModelConfig small_unet() {
  ModelConfig m;
  m.in_channels = m.out_channels = 1;
  m.sample_size = 16;
  m.block_out_channels = {32, 64};
  m.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  m.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  m.norm_num_groups = 8;
  return m;
}

struct Pass {
  at::Tensor out;
  std::vector<at::Tensor> grads;
};
Pass unet_pass(UNet2DModel& model, bool fused_on, const at::Tensor& sample, const at::Tensor& t, const at::Tensor& dout) {
  model->set_fused_groupnorm_silu(fused_on);
  model->zero_grad();
  const auto out = model->forward(sample, t);
  out.backward(dout);
  Pass p{out.detach().clone(), {}};
  for (const auto& param : model->parameters()) p.grads.push_back(param.grad().clone());
  return p;
}

// A deep network has no a-priori error bound (numerics.h), but the fused and unfused float32
// forwards round the same values by the same few ulps per op: the fused one must be as close to
// float64 as the unfused one is (as_accurate_as, factor 4). In float64 the two differ by the same
// amplification of float64's rounding: at most 4 · (the float32 error / ε32) · ε64 of the output.
void expect_same_function(const at::Tensor& sample, c10::MemoryFormat format, int scale_shift) {
  auto cfg = small_unet();
  if (scale_shift) cfg.resnet_time_scale_shift = TimeScaleShift::scale_shift;
  torch::manual_seed(7);
  UNet2DModel m32(cfg);
  UNet2DModel m64(cfg);
  {
    torch::NoGradGuard no_grad;
    const auto p32 = m32->parameters(), p64 = m64->parameters();
    for (size_t i = 0; i < p32.size(); ++i) p64[i].copy_(p32[i]);
  }
  m64->to(at::kDouble);
  const auto x = sample.contiguous(format);
  const auto t = torch::tensor({10, 700}, torch::kLong);
  const auto dout = torch::randn(sample.sizes());
  const auto unfused32 = unet_pass(m32, false, x, t, dout), fused32 = unet_pass(m32, true, x, t, dout);
  const auto exact = unet_pass(m64, false, x.to(at::kDouble), t, dout.to(at::kDouble));
  const auto fused64 = unet_pass(m64, true, x.to(at::kDouble), t, dout.to(at::kDouble));
  if (format == c10::MemoryFormat::ChannelsLast) {
    EXPECT_TRUE(fused32.out.is_contiguous(format));
  }
  EXPECT_TRUE(test::as_accurate_as(fused32.out, unfused32.out, exact.out)) << "output";
  const auto names = m32->named_parameters().keys();
  auto float64_bound = [](const at::Tensor& ours32, const at::Tensor& exact64) {
    const double err32 = (ours32.to(at::kDouble) - exact64).abs().max().item<double>();
    return 4 * (err32 / test::kFloatEps) * 0x1p-52 + 2 * 0x1p-52 * exact64.abs().max().item<double>();
  };
  EXPECT_LE((fused64.out - exact.out).abs().max().item<double>(), float64_bound(unfused32.out, exact.out)) << "output";
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_TRUE(test::as_accurate_as(fused32.grads[i], unfused32.grads[i], exact.grads[i])) << "d " << names[i];
    EXPECT_LE((fused64.grads[i] - exact.grads[i]).abs().max().item<double>(), float64_bound(unfused32.grads[i], exact.grads[i]))
        << "d " << names[i];
  }
}

TEST(GroupNormSiLU, UNetSwitchIsTheSameFunction) {
  torch::manual_seed(11);
  const auto sample = torch::randn({2, 1, 16, 16});
  for (int scale_shift : {0, 1}) {
    SCOPED_TRACE(scale_shift ? "scale_shift" : "default");
    expect_same_function(sample, c10::MemoryFormat::Contiguous, scale_shift);
  }
}

TEST(GroupNormSiLU, UNetSwitchIsTheSameFunctionChannelsLast) {
  torch::manual_seed(12);
  expect_same_function(torch::randn({2, 1, 16, 16}), c10::MemoryFormat::ChannelsLast, 0);
}

}  // namespace
}  // namespace difftrain

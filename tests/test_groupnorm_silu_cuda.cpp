// The CUDA kernels of group_norm_silu (src/cuda/groupnorm_silu.cu) against the CPU op (the
// reference, itself tested against autograd of at::group_norm + at::silu in test_groupnorm_silu.cpp)
// evaluated in float64 on the same values: the output and the gradients in x, γ and β, NCHW and
// channels-last, float32 and bf16. Label gpu: each test skips itself without a usable GPU.
//
// Tolerances, against the scales of groupnorm_silu_scales.h (each value's sum of magnitudes):
// float32 1e-5 (84 ε₃₂: the kernels' fixed-order sums round about √D times at most for D up to
// 10⁵ here, the element-wise chain about 10 times); bf16 1e-2 (y and dx are rounded to bf16 once,
// within bf16's unit roundoff 2⁻⁸ = 3.9e-3, with the float32 error above well inside).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/env.h"
#include "difftrain/groupnorm_silu.h"
#include "groupnorm_silu_scales.h"
#include "stand_in.h"

namespace difftrain {
namespace {

struct Grads {
  at::Tensor y, dx, dw, db;
};

Grads fused(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& dy, int64_t groups) {
  auto xv = x.detach().clone().requires_grad_(true), wv = w.detach().clone().requires_grad_(true);
  auto bv = b.detach().clone().requires_grad_(true);
  auto y = group_norm_silu(xv, groups, wv, bv, test::kGroupNormEps);
  y.backward(dy);
  return {y.detach(), xv.grad(), wv.grad(), bv.grad()};
}

struct Case {
  std::vector<int64_t> shape;  // (N, C, H, W)
  int64_t groups;
};
// The CIFAR-10 preset's 128 channels in 32 groups at 32x32 and its 256 channels at 8x8; odd sizes;
// one channel per group; one group; 40 channels (a partial 32-channel tile in NHWC); a large group.
const std::vector<Case> kCases = {{{4, 128, 32, 32}, 32}, {{8, 256, 8, 8}, 32}, {{3, 12, 5, 7}, 4}, {{5, 64, 17, 9}, 8},
                                  {{1, 32, 4, 4}, 32},    {{4, 6, 3, 3}, 1},    {{2, 40, 7, 7}, 8}, {{1, 64, 64, 64}, 2}};

void check(at::ScalarType x_dtype, at::ScalarType w_dtype, c10::MemoryFormat format, double tol) {
  const c10::Device cuda(c10::kCUDA, 0);
  uint64_t seed = 1;
  for (const auto& c : kCases) {
    SCOPED_TRACE(::testing::Message() << "shape " << at::IntArrayRef(c.shape) << ", " << c.groups << " groups, x " << x_dtype
                                      << ", γ " << w_dtype << (format == c10::MemoryFormat::ChannelsLast ? ", NHWC" : ", NCHW"));
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed++);
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    const int64_t C = c.shape[1];
    // Rounded to the tested dtypes first: both sides see the same values.
    const auto x = (at::randn(c.shape, gen, f64) * 2.0 + 0.5).to(x_dtype).contiguous(format);
    const auto dy = at::randn(c.shape, gen, f64).to(x_dtype).contiguous(format);
    const auto w = (1.0 + 0.5 * at::randn({C}, gen, f64)).to(w_dtype), b = (0.5 * at::randn({C}, gen, f64)).to(w_dtype);
    const auto want = fused(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    const auto got = fused(x.to(cuda), w.to(cuda), b.to(cuda), dy.to(cuda), c.groups);
    ASSERT_EQ(got.y.scalar_type(), x_dtype);
    ASSERT_EQ(got.dw.scalar_type(), w_dtype);
    EXPECT_TRUE(got.y.is_contiguous(format));
    EXPECT_TRUE(got.dx.is_contiguous(format));
    const auto s = test::scales_of(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble), dy.to(at::kDouble), c.groups);
    EXPECT_TRUE(test::close("y", got.y.cpu(), want.y, s.y, tol, 1.0));
    EXPECT_TRUE(test::close("dx", got.dx.cpu(), want.dx, s.dx, tol, 1.0));
    EXPECT_TRUE(test::close("dγ", got.dw.cpu(), want.dw, s.dw, tol, 1.0));
    EXPECT_TRUE(test::close("dβ", got.db.cpu(), want.db, s.db, tol, 1.0));
  }
}

TEST(GroupNormSiLUCuda, Float32Nchw) {
  DIFFTRAIN_REQUIRE_CUDA();
  check(at::kFloat, at::kFloat, c10::MemoryFormat::Contiguous, 1e-5);
}
TEST(GroupNormSiLUCuda, Float32ChannelsLast) {
  DIFFTRAIN_REQUIRE_CUDA();
  check(at::kFloat, at::kFloat, c10::MemoryFormat::ChannelsLast, 1e-5);
}
// bf16 activations with float32 γ, β: the autocast case.
TEST(GroupNormSiLUCuda, Bf16Nchw) {
  DIFFTRAIN_REQUIRE_CUDA();
  check(at::kBFloat16, at::kFloat, c10::MemoryFormat::Contiguous, 1e-2);
}
TEST(GroupNormSiLUCuda, Bf16ChannelsLast) {
  DIFFTRAIN_REQUIRE_CUDA();
  check(at::kBFloat16, at::kFloat, c10::MemoryFormat::ChannelsLast, 1e-2);
}
// A model cast to bf16 whole: γ and β bf16 too (dγ, dβ rounded to bf16 once).
TEST(GroupNormSiLUCuda, Bf16WeightsChannelsLast) {
  DIFFTRAIN_REQUIRE_CUDA();
  check(at::kBFloat16, at::kBFloat16, c10::MemoryFormat::ChannelsLast, 1e-2);
}

// The kernels write every element: a tensor that is neither NCHW- nor NHWC-contiguous (a slice)
// is made contiguous first and gives the same numbers as its copy; the output is deterministic.
TEST(GroupNormSiLUCuda, StridedInputAndDeterminism) {
  DIFFTRAIN_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
  const auto big = at::randn({2, 64, 16, 32}, gen).to(cuda);
  const auto x = big.slice(/*dim=*/3, 0, 32, /*step=*/2);  // (2, 64, 16, 16), not contiguous
  const auto w = at::randn({64}, gen).to(cuda), b = at::randn({64}, gen).to(cuda);
  const auto y1 = group_norm_silu(x, 8, w, b, test::kGroupNormEps), y2 = group_norm_silu(x.contiguous(), 8, w, b, 1e-5);
  EXPECT_TRUE(at::equal(y1, y2));
  EXPECT_TRUE(at::equal(y1, group_norm_silu(x, 8, w, b, test::kGroupNormEps)));
}

}  // namespace
}  // namespace difftrain

// The error scales of SiLU(GroupNorm(x)) and its gradients, shared by test_groupnorm_silu.cpp
// (the CPU op against autograd of at::group_norm + at::silu) and test_groupnorm_silu_cuda.cpp
// (the kernels against the CPU op).
//
// Tolerances. Every element's error is measured against a scale: the magnitudes its formula adds
// (numerics.h). With r = rstd, x̂ the normalized input, dz = dy SiLU'(z) and |SiLU'| <= 1.1
// (its maximum, at z ≈ 2.4):
//   x̂ = (x - μ) r:  (|x| + |μ|) r, the magnitudes of the subtraction (where x̂ ≈ 0 too);
//   y:  that times |γ|, plus |β| (SiLU(z) = z σ(z) is at most |z|);
//   dβ_c: Σ_{n,hw} 1.1 |dy|,   dγ_c: Σ_{n,hw} 1.1 |dy| (|x| + |μ|) r   (sums of N·HW terms);
//   dx: r (|γ dz| + mean|γ dz| + |x̂| mean|γ dz x̂|) with |x̂| as above, its largest value over the tensor.
// A sum of D terms rounds D times: its error is at most D·u of the sum of magnitudes in the worst
// case (Higham, Accuracy and Stability, §4.2), about √D·u for rounding errors of random sign
// (§2.8), and ATen's cascade sums do better still. The element-wise chain (subtract, two multiplies,
// add, exp, add, divide, multiply) adds about 10 roundings, and the transcendental 1 ulp.
#pragma once

#include <cstdint>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace difftrain::test {

inline constexpr double kGroupNormEps = 1e-5;  // diffusers UNet2DModel's default norm_eps

// The scales of the header comment, from the float64 values.
struct Scales {
  at::Tensor y, dx, dw, db;
  int64_t group_size, channel_terms;  // D = C/G · HW, N · HW
};
inline Scales scales_of(const at::Tensor& x64, const at::Tensor& w64, const at::Tensor& b64, const at::Tensor& dy64,
                        int64_t groups) {
  const int64_t N = x64.size(0), C = x64.size(1), HW = x64.numel() / (N * C);
  std::vector<int64_t> not_c{0}, bshape(static_cast<size_t>(x64.dim()), 1);
  for (int64_t d = 2; d < x64.dim(); ++d) not_c.push_back(d);
  bshape[1] = C;
  const auto stats = at::native_group_norm(x64, {}, {}, N, C, HW, groups, kGroupNormEps);  // (x̂, mean, rstd)
  const auto mean = std::get<1>(stats).reshape({N, groups, 1}), rstd = std::get<2>(stats).reshape({N, groups, 1});
  // x̂ = (x - μ) r adds |x| and |μ|: its error scales with (|x| + |μ|) r, not with |x̂|.
  const auto xhat_scale = ((x64.reshape({N, groups, -1}).abs() + mean.abs()) * rstd).reshape(x64.sizes());
  const auto gamma = w64.reshape(bshape).abs();
  const double r = rstd.max().item<double>();
  const auto gdz = (gamma * 1.1 * dy64.abs()).reshape({N, groups, -1});  // |γ dz|
  const auto xh = xhat_scale.reshape({N, groups, -1});
  const auto dx = r * (gdz + gdz.mean(-1, true) + xh * (gdz * xh).mean(-1, true));
  return {xhat_scale * gamma + b64.reshape(bshape).abs(),
          dx.max(),
          (1.1 * dy64.abs() * xhat_scale).sum(not_c),
          (1.1 * dy64.abs()).sum(not_c),
          C / groups * HW,
          N * HW};
}

// |got - want| <= ulps · eps · scale, element-wise.
inline ::testing::AssertionResult close(const char* what, const at::Tensor& got, const at::Tensor& want, const at::Tensor& scale,
                                        double ulps, double eps) {
  if (got.sizes() != want.sizes())
    return ::testing::AssertionFailure() << what << ": shape " << got.sizes() << " != " << want.sizes();
  const auto err = (got.to(at::kDouble) - want.to(at::kDouble)).abs();
  const auto bound = (ulps * eps) * scale.to(at::kDouble).expand_as(err);
  if ((err <= bound).all().item<bool>()) return ::testing::AssertionSuccess();
  const auto worst = (err / bound.clamp_min(1e-300)).flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure() << what << ": element " << worst << " off by " << err.flatten()[worst].item<double>()
                                       << " > bound " << bound.flatten()[worst].item<double>() << " (max error "
                                       << err.max().item<double>() << ")";
}

}  // namespace difftrain::test

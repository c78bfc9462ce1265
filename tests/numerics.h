// Tolerances from the arithmetic rather than from a run that passed.
//
// A float32 operation rounds with a relative error of at most u = ε/2 (ε = 2^-23, IEEE 754
// round-to-nearest). Transcendentals are not correctly rounded: on CPUs PyTorch takes sqrt, exp
// and log from MKL's vector math (torch.sqrt differs from the correctly rounded sqrt in about
// 0.6% of floats on an Intel CPU, 19% with MKL_CBWR=COMPATIBLE, the code path MKL takes on AMD
// CPUs) or from Sleef, whose AVX2 and AVX-512 variants differ; each is within 1 ulp (ε
// relative). So two float32 evaluations of the same formula, ours and a reference's, differ by at
// most the sum of their rounding errors: (number of roundings) · u · (the magnitudes the formula
// adds), which is the bound each test states next to its formula. A formula that divides by a
// small number (x̂₀ = (x - √(1-ᾱ) ε)/√ᾱ at t = 999, √ᾱ ≈ 0.0064) has a large scale, and its bound
// grows with it (Higham, Accuracy and Stability of Numerical Algorithms, §2.2 and §3.1).
#pragma once

#include <string>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace difftrain::test {

inline constexpr double kFloatEps = 0x1p-23;            // ε of float32; one ulp of 1.0
inline constexpr double kUnitRoundoff = kFloatEps / 2;  // u: the largest relative error of one rounding

// Element-wise |got - want| <= ulps · ε · scale, where `scale` (a tensor broadcastable to got)
// holds each element's magnitudes: the sum of |term| over the terms its formula adds, divided
// by what it divides by. `ulps` is the count of ε the two evaluations can round by together.
inline ::testing::AssertionResult within_ulps(const at::Tensor& got, const at::Tensor& want, const at::Tensor& scale,
                                              double ulps) {
  if (got.sizes() != want.sizes()) return ::testing::AssertionFailure() << "shape " << got.sizes() << " != " << want.sizes();
  const auto err = (got.to(at::kDouble) - want.to(at::kDouble)).abs();
  const auto bound = (ulps * kFloatEps) * scale.to(at::kDouble).expand_as(err);
  if ((err <= bound).all().item<bool>()) return ::testing::AssertionSuccess();
  const auto worst = (err / bound.clamp_min(1e-300)).flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure() << "max abs error " << err.max().item<double>() << "; worst element " << worst
                                       << ": error " << err.flatten()[worst].item<double>() << " > bound "
                                       << bound.flatten()[worst].item<double>() << " (" << ulps << " ulps of scale "
                                       << scale.to(at::kDouble).expand_as(err).flatten()[worst].item<double>() << ")";
}

// A float32 network forward, ours, against a reference's float32 and float64 forwards of the same
// weights and inputs. A deep network has no useful a-priori bound (each layer's error is γ_K|W||x|
// for its dot products of length K, then amplified by every layer after it), but both float32
// forwards make the same operations on the same values, so their rounding errors are of one size:
// ours must be as close to the float64 value as the reference's float32 is, up to `factor` for
// another summation order (oneDNN, MKL and ATen pick kernels by ISA and shape), plus 2ε of the
// largest output for a reference that happens to round well.
inline ::testing::AssertionResult as_accurate_as(const at::Tensor& ours, const at::Tensor& theirs32, const at::Tensor& exact64,
                                                 double factor = 4) {
  if (ours.sizes() != exact64.sizes() || theirs32.sizes() != exact64.sizes())
    return ::testing::AssertionFailure() << "shapes " << ours.sizes() << ", " << theirs32.sizes() << ", " << exact64.sizes();
  const auto exact = exact64.to(at::kDouble);
  const double ours_err = (ours.to(at::kDouble) - exact).abs().max().item<double>();
  const double their_err = (theirs32.to(at::kDouble) - exact).abs().max().item<double>();
  const double bound = factor * their_err + 2 * kFloatEps * exact.abs().max().item<double>();
  if (ours_err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error against float64 " << ours_err << " > " << bound << " (the reference's "
                                       << "float32 is off by " << their_err << ")";
}

}  // namespace difftrain::test

// Float32 scalars evaluated the way diffusers' schedulers evaluate them: by ATen, on a 0-dim CPU
// tensor (torch.log(self.sigmas[i]), (sigma**2 + 1) ** 0.5). ATen's pow, log, exp and expm1 round
// differently from the C library's (pow(x, 0.5) is not std::sqrt in about 0.6% of floats), so the
// schedulers call the same functions to agree with diffusers to the last bit. +, -, *, / are
// IEEE-754 operations and need no such help.
#pragma once

#include <ATen/ops/exp.h>
#include <ATen/ops/expm1.h>
#include <ATen/ops/log.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/scalar_tensor.h>

namespace difftrain::scalar_ops {

inline at::Tensor f32(float x) { return at::scalar_tensor(x, at::TensorOptions().dtype(at::kFloat)); }
inline float aten_pow(float x, double exponent) { return at::pow(f32(x), exponent).item<float>(); }
inline float aten_log(float x) { return at::log(f32(x)).item<float>(); }
inline float aten_exp(float x) { return at::exp(f32(x)).item<float>(); }
inline float aten_expm1(float x) { return at::expm1(f32(x)).item<float>(); }

}  // namespace difftrain::scalar_ops

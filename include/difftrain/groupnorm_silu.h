// SiLU(GroupNorm(x)) as one autograd op (train.fused_groupnorm_silu): GroupNorm (Wu & He 2018,
// "Group Normalization", eq. 1-3) followed by SiLU/Swish (Elfwing et al. 2017; Ramachandran et
// al. 2017), the pair in front of every convolution of diffusers' ResnetBlock2D. The statistics
// (mean, rstd per sample and group) are float32 (float64 for a float64 input) and saved for the
// backward; x may be float32, bfloat16 or float64, NCHW or channels-last (NHWC), and the output has
// x's dtype and memory format. Under CUDA autocast the unfused pair reads a bf16 x, upcasts it for
// group_norm (autocast's float32 list), and returns float32 for the next convolution to cast down
// again; this op reads bf16, accumulates in float32 and writes bf16 once: the same value reaches the
// convolution, without the two float32 copies. (CPU autocast runs group_norm and silu in bf16.)
//
// CUDA tensors run the kernels of src/cuda/groupnorm_silu.cu; CPU tensors run the same formulas in
// ATen ops, the reference those kernels are tested against.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace difftrain {

// x (N, C, H, W) or (N, C, *), C divisible by num_groups; weight (γ) and bias (β): (C), of one
// dtype (float32 under autocast, or x's). Returns SiLU(GroupNorm(x)) in x's dtype and memory format,
// differentiable in x, weight and bias.
at::Tensor group_norm_silu(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace difftrain

// The CUDA kernels of SiLU(GroupNorm(x)) (include/difftrain/groupnorm_silu.h), on raw device
// pointers so that nvcc sees no LibTorch header. Built only against a CUDA LibTorch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace difftrain::cuda {

enum class GnDtype { f32, bf16 };

struct GroupNormSiLUShape {
  int64_t N = 0, C = 0, HW = 0, G = 0;  // x is (N, C, HW) in memory, or (N, HW, C) when channels_last
  bool channels_last = false;
  GnDtype x_dtype = GnDtype::f32;  // x, y, dy, dx
  GnDtype w_dtype = GnDtype::f32;  // weight, bias and their gradients
};

// y = SiLU((x - mean) · rstd · γ + β); mean and rstd (N, G) float32 are written for the backward.
// workspace: 2·N·C floats. Returns the launch error (cudaSuccess when all kernels were queued).
cudaError_t group_norm_silu_forward(const GroupNormSiLUShape& s, const void* x, const void* weight, const void* bias, double eps,
                                    void* y, float* mean, float* rstd, float* workspace, cudaStream_t stream);

// dx, dγ, dβ from dy and the forward's x, mean, rstd (z and σ(z) are recomputed).
// workspace: 2·N·C + 2·N·G floats.
cudaError_t group_norm_silu_backward(const GroupNormSiLUShape& s, const void* dy, const void* x, const float* mean,
                                     const float* rstd, const void* weight, const void* bias, void* dx, void* dweight,
                                     void* dbias, float* workspace, cudaStream_t stream);

}  // namespace difftrain::cuda

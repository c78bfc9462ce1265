// SiLU(GroupNorm(x)) forward and backward on a GPU; the formulas and their notation are in
// src/groupnorm_silu.cpp, whose ATen version is the reference these kernels are tested against
// (tests/test_groupnorm_silu_cuda.cpp). All arithmetic is float32; bf16 is only loaded and stored.
//
// Forward:  1. per (n, c): the channel mean and M2 = Σ_hw (x - mean_c)², two passes over the slice
//           2. per (n, g): μ and r from the channel moments (Chan, Golub & LeVeque 1979: the group's
//              M2 = Σ_c [M2_c + HW (mean_c - μ)²], no cancellation)
//           3. per element: y = SiLU((x - μ) r γ + β)
// Backward: 1. per (n, c): db = Σ_hw dz, ds = Σ_hw dz x̂ (z and σ(z) recomputed from x)
//           2. per c: dγ = Σ_n ds, dβ = Σ_n db; per (n, g): mean_g(dx̂) and mean_g(dx̂ x̂)
//           3. per element: dx = r (γ dz - mean_g(dx̂) - x̂ mean_g(dx̂ x̂))
// A (n, c) slice is reduced by one block of 256 threads: in NCHW one channel, the threads along its
// contiguous HW; in NHWC 32 consecutive channels (coalesced loads), 8 threads along HW for each.
// Every sum has a fixed order: the results are deterministic.
#include "cuda/groupnorm_silu.h"

#include <cuda_bf16.h>

namespace difftrain::cuda {
namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

constexpr int kTx = 32, kTy = 8;  // the reduction block: 256 threads

template <bool kNhwc> __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t hw, int64_t C, int64_t HW) {
  return kNhwc ? (n * HW + hw) * C + c : (n * C + c) * HW + hw;
}

// The (n, c) slice this thread reads and its first hw and stride.
struct Slice {
  int64_t n, c, hw0, hw_step;
  bool valid;
};
template <bool kNhwc> __device__ Slice block_slice(int64_t C) {
  if constexpr (kNhwc) {
    const int64_t tiles = (C + kTx - 1) / kTx;
    const int64_t n = blockIdx.x / tiles, c = (blockIdx.x % tiles) * kTx + threadIdx.x;
    return {n, c, threadIdx.y, kTy, c < C};
  }
  return {blockIdx.x / C, blockIdx.x % C, threadIdx.y * kTx + threadIdx.x, kTx * kTy, true};
}
template <bool kNhwc> int64_t reduction_blocks(int64_t N, int64_t C) { return kNhwc ? N * ((C + kTx - 1) / kTx) : N * C; }

// Sums a and b over the threads of each slice in the block. Returns true in the thread holding a
// slice's totals: threadIdx.y == 0 (NHWC, one per channel) or thread 0 (NCHW). Every thread calls it.
template <bool kNhwc> __device__ bool block_sum2(float& a, float& b) {
  __shared__ float sa[kTy][kTx + 1], sb[kTy][kTx + 1];
  __syncthreads();  // the previous call's readers are done
  sa[threadIdx.y][threadIdx.x] = a, sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0) return false;
  a = b = 0.0f;
  for (int y = 0; y < kTy; ++y) a += sa[y][threadIdx.x], b += sb[y][threadIdx.x];
  if constexpr (kNhwc) {
    return true;
  } else {
    for (int o = kTx / 2; o > 0; o /= 2)  // warp 0 = the threads with threadIdx.y == 0
      a += __shfl_down_sync(0xffffffffu, a, o), b += __shfl_down_sync(0xffffffffu, b, o);
    return threadIdx.x == 0;
  }
}

// Forward 1: mean_c and M2_c of each (n, c) slice, (N, C) each.
template <class T, bool kNhwc> __global__ void channel_moments(const T* x, int64_t C, int64_t HW, float* mean_c, float* m2_c) {
  const Slice s = block_slice<kNhwc>(C);
  __shared__ float s_mean[kTx];
  float sum = 0.0f, unused = 0.0f;
  if (s.valid)
    for (int64_t hw = s.hw0; hw < HW; hw += s.hw_step) sum += load(x, offset<kNhwc>(s.n, s.c, hw, C, HW));
  if (block_sum2<kNhwc>(sum, unused)) s_mean[threadIdx.x] = sum / static_cast<float>(HW);
  __syncthreads();
  const float mu = s_mean[kNhwc ? threadIdx.x : 0];
  float m2 = 0.0f;
  if (s.valid)
    for (int64_t hw = s.hw0; hw < HW; hw += s.hw_step) {
      const float d = load(x, offset<kNhwc>(s.n, s.c, hw, C, HW)) - mu;
      m2 += d * d;
    }
  if (block_sum2<kNhwc>(m2, unused) && s.valid) mean_c[s.n * C + s.c] = mu, m2_c[s.n * C + s.c] = m2;
}

// Forward 2: μ and r = 1/√(σ² + eps) per (n, g) from the channel moments.
__global__ void group_moments(const float* mean_c, const float* m2_c, int64_t N, int64_t C, int64_t HW, int64_t G, float eps,
                              float* mean, float* rstd) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * G) return;
  const int64_t Cg = C / G, first = (i / G) * C + (i % G) * Cg;
  float mu = 0.0f;
  for (int64_t k = 0; k < Cg; ++k) mu += mean_c[first + k];
  mu /= static_cast<float>(Cg);
  float m2 = 0.0f;
  for (int64_t k = 0; k < Cg; ++k) {
    const float d = mean_c[first + k] - mu;
    m2 += m2_c[first + k] + static_cast<float>(HW) * d * d;
  }
  mean[i] = mu;
  rstd[i] = 1.0f / sqrtf(m2 / static_cast<float>(Cg * HW) + eps);
}

// n and c of the flat element index i.
template <bool kNhwc> __device__ __forceinline__ void coords(int64_t i, int64_t C, int64_t HW, int64_t& n, int64_t& c) {
  if constexpr (kNhwc) c = i % C, n = i / (HW * C);
  else c = (i / HW) % C, n = i / (C * HW);
}

// Forward 3: y = SiLU(x̂ γ + β).
template <class T, class W, bool kNhwc>
__global__ void forward_output(const T* x, const W* weight, const W* bias, const float* mean, const float* rstd, int64_t N,
                               int64_t C, int64_t HW, int64_t G, T* y) {
  const int64_t total = N * C * HW, Cg = C / G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c;
    coords<kNhwc>(i, C, HW, n, c);
    const int64_t ng = n * G + c / Cg;
    const float z = (load(x, i) - mean[ng]) * rstd[ng] * load(weight, c) + load(bias, c);
    store(y, i, z * sigmoid(z));
  }
}

// dz = dy · SiLU'(z) with x̂, from x and the statistics.
template <class T, class W>
__device__ __forceinline__ float grad_z(const T* dy, const T* x, int64_t i, float mu, float r, float gamma, float beta,
                                        float& xhat) {
  xhat = (load(x, i) - mu) * r;
  const float z = xhat * gamma + beta, s = sigmoid(z);
  return load(dy, i) * s * (1.0f + z * (1.0f - s));
}

// Backward 1: db = Σ_hw dz and ds = Σ_hw dz x̂ per (n, c).
template <class T, class W, bool kNhwc>
__global__ void channel_grad_sums(const T* dy, const T* x, const float* mean, const float* rstd, const W* weight,
                                  const W* bias, int64_t C, int64_t HW, int64_t G, float* db_c, float* ds_c) {
  const Slice s = block_slice<kNhwc>(C);
  float db = 0.0f, ds = 0.0f;
  if (s.valid) {
    const int64_t ng = s.n * G + s.c / (C / G);
    const float mu = mean[ng], r = rstd[ng], gamma = load(weight, s.c), beta = load(bias, s.c);
    for (int64_t hw = s.hw0; hw < HW; hw += s.hw_step) {
      float xhat;
      const float dz = grad_z<T, W>(dy, x, offset<kNhwc>(s.n, s.c, hw, C, HW), mu, r, gamma, beta, xhat);
      db += dz, ds += dz * xhat;
    }
  }
  if (block_sum2<kNhwc>(db, ds) && s.valid) db_c[s.n * C + s.c] = db, ds_c[s.n * C + s.c] = ds;
}

// Backward 2: threads [0, C) reduce dγ, dβ over n; threads [C, C + N G) make, per (n, g),
// a = mean_g(dx̂) = Σ_c γ_c db / D and b = mean_g(dx̂ x̂) = Σ_c γ_c ds / D.
template <class W>
__global__ void reduce_grad_sums(const float* db_c, const float* ds_c, const W* weight, int64_t N, int64_t C, int64_t HW,
                                 int64_t G, W* dweight, W* dbias, float* a, float* b) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < C) {
    float dg = 0.0f, dbeta = 0.0f;
    for (int64_t n = 0; n < N; ++n) dg += ds_c[n * C + i], dbeta += db_c[n * C + i];
    store(dweight, i, dg), store(dbias, i, dbeta);
  } else if (i < C + N * G) {
    const int64_t ng = i - C, Cg = C / G, first = (ng / G) * C + (ng % G) * Cg;
    float sa = 0.0f, sb = 0.0f;
    for (int64_t k = 0; k < Cg; ++k) {
      const float gamma = load(weight, (ng % G) * Cg + k);
      sa += gamma * db_c[first + k], sb += gamma * ds_c[first + k];
    }
    const float D = static_cast<float>(Cg * HW);
    a[ng] = sa / D, b[ng] = sb / D;
  }
}

// Backward 3: dx = r (γ dz - a - x̂ b).
template <class T, class W, bool kNhwc>
__global__ void backward_input(const T* dy, const T* x, const float* mean, const float* rstd, const W* weight, const W* bias,
                               const float* a, const float* b, int64_t N, int64_t C, int64_t HW, int64_t G, T* dx) {
  const int64_t total = N * C * HW, Cg = C / G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c;
    coords<kNhwc>(i, C, HW, n, c);
    const int64_t ng = n * G + c / Cg;
    const float gamma = load(weight, c);
    float xhat;
    const float dz = grad_z<T, W>(dy, x, i, mean[ng], rstd[ng], gamma, load(bias, c), xhat);
    store(dx, i, rstd[ng] * (gamma * dz - a[ng] - xhat * b[ng]));
  }
}

constexpr int kThreads = 256;
unsigned blocks_for(int64_t n) {  // grid-stride loops: at most 2^20 blocks
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (int64_t{1} << 20) ? (b > 0 ? b : 1) : (int64_t{1} << 20));
}

template <class T, class W, bool kNhwc>
cudaError_t forward(const GroupNormSiLUShape& s, const void* x, const void* weight, const void* bias, double eps, void* y,
                    float* mean, float* rstd, float* workspace, cudaStream_t stream) {
  float *mean_c = workspace, *m2_c = workspace + s.N * s.C;
  const dim3 block(kTx, kTy);
  channel_moments<T, kNhwc><<<static_cast<unsigned>(reduction_blocks<kNhwc>(s.N, s.C)), block, 0, stream>>>(
      static_cast<const T*>(x), s.C, s.HW, mean_c, m2_c);
  group_moments<<<blocks_for(s.N * s.G), kThreads, 0, stream>>>(mean_c, m2_c, s.N, s.C, s.HW, s.G, static_cast<float>(eps),
                                                                 mean, rstd);
  forward_output<T, W, kNhwc><<<blocks_for(s.N * s.C * s.HW), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), mean, rstd, s.N, s.C, s.HW, s.G,
      static_cast<T*>(y));
  return cudaGetLastError();
}

template <class T, class W, bool kNhwc>
cudaError_t backward(const GroupNormSiLUShape& s, const void* dy_, const void* x_, const float* mean, const float* rstd,
                     const void* weight_, const void* bias_, void* dx, void* dweight, void* dbias, float* workspace,
                     cudaStream_t stream) {
  const auto *dy = static_cast<const T*>(dy_), *x = static_cast<const T*>(x_);
  const auto *weight = static_cast<const W*>(weight_), *bias = static_cast<const W*>(bias_);
  float *db_c = workspace, *ds_c = db_c + s.N * s.C, *a = ds_c + s.N * s.C, *b = a + s.N * s.G;
  const dim3 block(kTx, kTy);
  channel_grad_sums<T, W, kNhwc><<<static_cast<unsigned>(reduction_blocks<kNhwc>(s.N, s.C)), block, 0, stream>>>(
      dy, x, mean, rstd, weight, bias, s.C, s.HW, s.G, db_c, ds_c);
  reduce_grad_sums<W><<<blocks_for(s.C + s.N * s.G), kThreads, 0, stream>>>(
      db_c, ds_c, weight, s.N, s.C, s.HW, s.G, static_cast<W*>(dweight), static_cast<W*>(dbias), a, b);
  backward_input<T, W, kNhwc><<<blocks_for(s.N * s.C * s.HW), kThreads, 0, stream>>>(dy, x, mean, rstd, weight, bias, a, b,
                                                                                      s.N, s.C, s.HW, s.G, static_cast<T*>(dx));
  return cudaGetLastError();
}

// Calls f.template operator()<T, W, kNhwc>() for the shape's dtypes and layout.
template <class F> cudaError_t dispatch(const GroupNormSiLUShape& s, const F& f) {
  auto layout = [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    return s.channels_last ? f.template operator()<T, W, true>() : f.template operator()<T, W, false>();
  };
  auto weight = [&](auto t) { return s.w_dtype == GnDtype::f32 ? layout(t, float{}) : layout(t, bf16{}); };
  return s.x_dtype == GnDtype::f32 ? weight(float{}) : weight(bf16{});
}

struct ForwardCall {
  const GroupNormSiLUShape& s;
  const void *x, *weight, *bias;
  double eps;
  void* y;
  float *mean, *rstd, *workspace;
  cudaStream_t stream;
  template <class T, class W, bool kNhwc> cudaError_t operator()() const {
    return forward<T, W, kNhwc>(s, x, weight, bias, eps, y, mean, rstd, workspace, stream);
  }
};

struct BackwardCall {
  const GroupNormSiLUShape& s;
  const void *dy, *x;
  const float *mean, *rstd;
  const void *weight, *bias;
  void *dx, *dweight, *dbias;
  float* workspace;
  cudaStream_t stream;
  template <class T, class W, bool kNhwc> cudaError_t operator()() const {
    return backward<T, W, kNhwc>(s, dy, x, mean, rstd, weight, bias, dx, dweight, dbias, workspace, stream);
  }
};

}  // namespace

cudaError_t group_norm_silu_forward(const GroupNormSiLUShape& s, const void* x, const void* weight, const void* bias,
                                    double eps, void* y, float* mean, float* rstd, float* workspace, cudaStream_t stream) {
  if (s.N * s.C * s.HW == 0) return cudaSuccess;
  return dispatch(s, ForwardCall{s, x, weight, bias, eps, y, mean, rstd, workspace, stream});
}

cudaError_t group_norm_silu_backward(const GroupNormSiLUShape& s, const void* dy, const void* x, const float* mean,
                                     const float* rstd, const void* weight, const void* bias, void* dx, void* dweight,
                                     void* dbias, float* workspace, cudaStream_t stream) {
  if (s.N * s.C * s.HW == 0) return cudaSuccess;
  return dispatch(s, BackwardCall{s, dy, x, mean, rstd, weight, bias, dx, dweight, dbias, workspace, stream});
}

}  // namespace difftrain::cuda

#include "difftrain/groupnorm_silu.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef DIFFTRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/groupnorm_silu.h"
#endif

// Notation, per sample n and group g of D = (C / G) · HW elements:
//   μ = mean(x),  σ² = mean((x - μ)²) (biased),  r = 1 / √(σ² + eps),  x̂ = (x - μ) · r
//   z = γ_c x̂ + β_c,   y = SiLU(z) = z · s,  s = σ(z) = 1 / (1 + e⁻ᶻ)        (Wu & He 2018, eq. 1-3)
// Backward, dy given:
//   dz = dy · SiLU'(z),  SiLU'(z) = s (1 + z (1 - s))                          (Elfwing et al. 2017)
//   dβ_c = Σ_{n,hw} dz,   dγ_c = Σ_{n,hw} dz · x̂
//   dx̂ = γ_c dz,   dx = r · (dx̂ - mean_g(dx̂) - x̂ · mean_g(dx̂ · x̂))
// The last line is ATen's group_norm_backward (aten/src/ATen/native/cpu/group_norm_kernel.cpp)
// written in x̂: with ds_nc = Σ_hw dz·x, db_nc = Σ_hw dz it is dx = c1·dz + c2·x + c3, where
// c1 = r γ_c, c2 = (Σ_c db_nc γ_c μ - Σ_c ds_nc γ_c) r³ / D, c3 = -c2 μ - Σ_c db_nc γ_c r / D.

namespace difftrain {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Shape {
  int64_t N, C, HW, G;
  at::MemoryFormat format;  // of x: the output's and the kernels' layout
};

Shape shape_of(const at::Tensor& x, int64_t G, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, *), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, "group_norm_silu: ", C, " channels are not divisible into ", G, " groups");
  TORCH_CHECK(weight.defined() && bias.defined() && weight.numel() == C && bias.numel() == C,
              "group_norm_silu: weight and bias must have ", C, " elements");
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type(), "group_norm_silu: weight and bias differ in dtype");
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(), "group_norm_silu: weight, bias and x on ",
              "different devices");
  const int64_t HW = N * C == 0 ? 0 : x.numel() / (N * C);
  return {N, C, HW, G, x.suggest_memory_format()};
}

// The float type of the statistics and arithmetic: float32, or float64 for a float64 x.
at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (C) -> (1, C, 1, ...) to broadcast against x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x, at::ScalarType dtype) {
  std::vector<int64_t> s(static_cast<size_t>(x.dim()), 1);
  s[1] = v.numel();
  return v.to(dtype).reshape(s);
}

// x̂ in the accumulation type, (N, C, *), from x and the saved (N, G) statistics.
at::Tensor normalized(const at::Tensor& x, const Shape& s, const at::Tensor& mean, const at::Tensor& rstd) {
  const auto xg = x.to(acc_type(x)).reshape({s.N, s.G, -1});  // (N, G, D)
  return ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.sizes());
}

// The reference: the formulas above in ATen ops. Returns y, mean, rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_aten(const at::Tensor& x, const Shape& s, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps) {
  const auto acc = acc_type(x);
  const auto xg = x.to(acc).reshape({s.N, s.G, -1});                                                      // (N, G, D)
  const auto mean = xg.mean(-1);                                                                          // (N, G)
  const auto var = (xg - mean.unsqueeze(-1)).square().mean(-1);                                           // two-pass, biased
  const auto rstd = (var + eps).rsqrt();                                                                  // (N, G)
  const auto z = normalized(x, s, mean, rstd) * per_channel(weight, x, acc) + per_channel(bias, x, acc);  // (N, C, *)
  const auto y = z * at::sigmoid(z);
  return {y.to(x.scalar_type()).contiguous(s.format), mean, rstd};
}

// Returns dx, dγ, dβ.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_aten(const at::Tensor& dy, const at::Tensor& x, const Shape& s,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             const at::Tensor& weight, const at::Tensor& bias) {
  const auto acc = acc_type(x);
  const auto xhat = normalized(x, s, mean, rstd);  // (N, C, *)
  const auto gamma = per_channel(weight, x, acc);
  const auto z = xhat * gamma + per_channel(bias, x, acc);
  const auto sig = at::sigmoid(z);
  const auto dz = dy.to(acc) * sig * (1 + z * (1 - sig));  // dy · SiLU'(z)
  std::vector<int64_t> not_c{0};
  for (int64_t d = 2; d < x.dim(); ++d) not_c.push_back(d);
  const auto dbeta = dz.sum(not_c);                     // (C)
  const auto dgamma = (dz * xhat).sum(not_c);           // (C)
  const auto g = (dz * gamma).reshape({s.N, s.G, -1});  // dx̂, (N, G, D)
  const auto xg = xhat.reshape({s.N, s.G, -1});
  const auto dx = rstd.unsqueeze(-1) * (g - g.mean(-1, /*keepdim=*/true) - xg * (g * xg).mean(-1, /*keepdim=*/true));
  return {dx.reshape(x.sizes()).to(x.scalar_type()).contiguous(s.format), dgamma.to(weight.scalar_type()),
          dbeta.to(bias.scalar_type())};
}

#ifdef DIFFTRAIN_WITH_CUDA
cuda::GroupNormSiLUShape cuda_shape(const Shape& s, const at::Tensor& x, const at::Tensor& weight) {
  auto dtype = [](at::ScalarType t) {
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "group_norm_silu: the CUDA kernels take float32 and bfloat16, got ", t);
    return t == at::kFloat ? cuda::GnDtype::f32 : cuda::GnDtype::bf16;
  };
  const bool nhwc = s.format == at::MemoryFormat::ChannelsLast || s.format == at::MemoryFormat::ChannelsLast3d;
  return {s.N, s.C, s.HW, s.G, nhwc, dtype(x.scalar_type()), dtype(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, const Shape& s, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto cs = cuda_shape(s, x, weight);
  const auto f32 = x.options().dtype(at::kFloat);
  auto y = at::empty_like(x, x.options(), s.format);
  auto mean = at::empty({s.N, s.G}, f32), rstd = at::empty({s.N, s.G}, f32);
  auto workspace = at::empty({2 * s.N * s.C}, f32);
  const auto w = weight.contiguous(), b = bias.contiguous();
  const auto err = cuda::group_norm_silu_forward(cs, x.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr(), eps,
                                                 y.mutable_data_ptr(), mean.mutable_data_ptr<float>(),
                                                 rstd.mutable_data_ptr<float>(), workspace.mutable_data_ptr<float>(),
                                                 c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "group_norm_silu: CUDA forward failed: ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& dy, const at::Tensor& x, const Shape& s,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             const at::Tensor& weight, const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto cs = cuda_shape(s, x, weight);
  auto dx = at::empty_like(x, x.options(), s.format);
  auto dgamma = at::empty({s.C}, weight.options()), dbeta = at::empty({s.C}, bias.options());
  auto workspace = at::empty({2 * s.N * s.C + 2 * s.N * s.G}, x.options().dtype(at::kFloat));
  const auto w = weight.contiguous(), b = bias.contiguous();
  const auto err = cuda::group_norm_silu_backward(
      cs, dy.const_data_ptr(), x.const_data_ptr(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), w.const_data_ptr(),
      b.const_data_ptr(), dx.mutable_data_ptr(), dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr(),
      workspace.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "group_norm_silu: CUDA backward failed: ", cudaGetErrorString(err));
  return {dx, dgamma.view(weight.sizes()), dbeta.view(bias.sizes())};
}
#endif

struct GroupNormSiLU : torch::autograd::Function<GroupNormSiLU> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, int64_t num_groups, const at::Tensor& weight,
                            const at::Tensor& bias, double eps) {
    // The formulas fix their own precision: autocast must not recast the ops inside.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Shape s = shape_of(x_in, num_groups, weight, bias);
    const auto x = x_in.contiguous(s.format);
    at::Tensor y, mean, rstd;
    if (x.numel() == 0) {
      y = at::empty_like(x), mean = rstd = at::empty({s.N, s.G}, x.options().dtype(acc_type(x)));
#ifdef DIFFTRAIN_WITH_CUDA
    } else if (x.is_cuda()) {
      std::tie(y, mean, rstd) = forward_cuda(x, s, weight, bias, eps);
#endif
    } else {
      std::tie(y, mean, rstd) = forward_aten(x, s, weight, bias, eps);
    }
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const Shape s = shape_of(x, ctx->saved_data["num_groups"].toInt(), weight, bias);
    const auto dy = grad_outputs[0].to(x.scalar_type()).contiguous(s.format);
    at::Tensor dx, dgamma, dbeta;
    if (x.numel() == 0) {
      dx = at::empty_like(x), dgamma = weight.new_zeros(weight.sizes()), dbeta = bias.new_zeros(bias.sizes());
#ifdef DIFFTRAIN_WITH_CUDA
    } else if (x.is_cuda()) {
      std::tie(dx, dgamma, dbeta) = backward_cuda(dy, x, s, mean, rstd, weight, bias);
#endif
    } else {
      std::tie(dx, dgamma, dbeta) = backward_aten(dy, x, s, mean, rstd, weight, bias);
    }
    return {dx, at::Tensor(), dgamma, dbeta, at::Tensor()};  // x, num_groups, weight, bias, eps
  }
};

}  // namespace

at::Tensor group_norm_silu(const at::Tensor& x, int64_t num_groups, const at::Tensor& weight, const at::Tensor& bias,
                           double eps) {
  return GroupNormSiLU::apply(x, num_groups, weight, bias, eps);
}

}  // namespace difftrain

#include "difftrain/amp.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include <fstream>
#include <sstream>

#include "difftrain/env.h"
#include "difftrain/errors.h"

namespace difftrain {

namespace {
// Native bf16 arithmetic on this CPU: x86 AVX512-BF16 or AMX-BF16, or Arm's BF16 extension.
// Read from /proc/cpuinfo, which every Linux has (LibTorch's own query changed between versions).
bool cpu_has_native_bf16() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0 && line.rfind("Features", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;)
      if (w == "avx512_bf16" || w == "amx_bf16" || w == "bf16") return true;
    return false;
  }
  return false;
}
}  // namespace

std::optional<c10::ScalarType> autocast_dtype(MixedPrecision mp, const c10::Device& device) {
  switch (mp) {
    case MixedPrecision::no: return std::nullopt;
    case MixedPrecision::fp16:
      if (!device.is_cuda())
        throw UsageError(fmt::format("train.mixed_precision = fp16 needs CUDA (training on {}); use bf16 or no", device.str()));
      return c10::kHalf;
    case MixedPrecision::bf16:
      if (device.is_cpu() && !cpu_has_native_bf16())
        throw UsageError("train.mixed_precision = bf16 on the CPU needs AVX512-BF16 or AMX, which this CPU lacks (bf16 "
                         "would be emulated and slower than fp32); use no");
#if defined(__x86_64__)
      // LibTorch's bf16 kernels (oneDNN's VNNI packing) need its AVX-512 code path, which
      // ATEN_CPU_CAPABILITY=avx2 or =default turns off on a CPU that has it.
      if (device.is_cpu() && cpu_capability() != "AVX512")
        throw UsageError(
            "train.mixed_precision = bf16 on the CPU needs LibTorch's AVX-512 kernels, but ATEN_CPU_CAPABILITY "
            "limits them to a lower level on this CPU; unset it, or use no");
#endif
      return c10::kBFloat16;
  }
  return std::nullopt;
}

AutocastScope::AutocastScope(c10::DeviceType device_type, std::optional<c10::ScalarType> dtype) : type_(device_type) {
  if (!dtype) return;
  active_ = true;
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, *dtype);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();  // as torch.autocast.__exit__
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
}

GradScaler::GradScaler(GradScalerOptions opts, const c10::Device& device)
    : opts_(opts),
      scale_(at::full({}, opts.init_scale, at::TensorOptions().dtype(at::kFloat).device(device))),
      growth_tracker_(at::zeros({}, at::TensorOptions().dtype(at::kInt).device(device))) {}

at::Tensor GradScaler::unscale_(const std::vector<at::Tensor>& grads) const {
  c10::NoGradGuard no_grad;
  auto found_inf = at::zeros({}, scale_.options());
  const auto inv_scale = scale_.to(at::kDouble).reciprocal().to(at::kFloat);  // in double, as GradScaler.unscale_
  at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
  return found_inf;
}

void GradScaler::update(const at::Tensor& found_inf) {
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf, opts_.growth_factor, opts_.backoff_factor,
                         opts_.growth_interval);
}

NamedTensors GradScaler::state_dict() const {
  return {{"scaler.scale", scale_}, {"scaler.growth_tracker", growth_tracker_}};
}

void GradScaler::load_state_dict(const std::map<std::string, at::Tensor>& state) {
  for (auto [key, dst] : {std::pair{"scaler.scale", scale_}, std::pair{"scaler.growth_tracker", growth_tracker_}}) {
    const auto it = state.find(key);
    if (it == state.end()) throw RuntimeError(fmt::format("loss-scaler state: missing {}", key));
    dst.copy_(it->second);
  }
}

}  // namespace difftrain

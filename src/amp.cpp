#include "difftrain/amp.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "difftrain/env.h"
#include "difftrain/errors.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_probe.h"
#endif

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

// Why bf16 cannot run natively on this CPU, or "" when it can.
std::string cpu_bf16_obstacle() {
  if (!cpu_has_native_bf16()) return "this CPU lacks AVX512-BF16 and AMX (bf16 would be emulated and slower than fp32)";
#if defined(__x86_64__)
  // LibTorch's bf16 kernels (oneDNN's VNNI packing) need its AVX-512 code path, which
  // ATEN_CPU_CAPABILITY=avx2 or =default turns off on a CPU that has it.
  if (cpu_capability() != "AVX512")
    return "LibTorch's AVX-512 kernels are off (ATEN_CPU_CAPABILITY limits them to " + cpu_capability() + ")";
#endif
  return "";
}

// Why bf16 cannot run natively on this GPU, or "" when it can: tensor-core bf16 needs sm_80+.
std::string cuda_bf16_obstacle([[maybe_unused]] const c10::Device& device) {
#ifdef DIFFTRAIN_WITH_CUDA
  const auto status = cuda::probe();
  const auto index = static_cast<size_t>(std::max<c10::DeviceIndex>(device.index(), 0));
  if (index < status.gpus.size() && status.gpus[index].major < 8)
    return fmt::format("GPU {} has compute capability {}.{}; bf16 needs 8.0 or newer", index, status.gpus[index].major,
                       status.gpus[index].minor);
#endif
  return "";
}
}  // namespace

std::optional<c10::ScalarType> autocast_dtype(MixedPrecision mp, const c10::Device& device, std::string* reason) {
  const auto say = [&](std::string why) {
    if (reason) *reason = std::move(why);
  };
  switch (mp) {
    case MixedPrecision::no: say("train.mixed_precision = no"); return std::nullopt;
    case MixedPrecision::fp16:
      if (!device.is_cuda())
        throw UsageError(fmt::format("train.mixed_precision = fp16 needs CUDA (training on {}); use bf16 or no", device.str()));
      say("train.mixed_precision = fp16");
      return c10::kHalf;
    case MixedPrecision::bf16: {
      if (device.is_cpu()) {
        if (const auto why = cpu_bf16_obstacle(); !why.empty())
          throw UsageError("train.mixed_precision = bf16 on the CPU is not possible here: " + why + "; use no or auto");
      }
      say("train.mixed_precision = bf16");
      return c10::kBFloat16;
    }
    case MixedPrecision::auto_: {
      const auto why = device.is_cpu()    ? cpu_bf16_obstacle()
                       : device.is_cuda() ? cuda_bf16_obstacle(device)
                                          : "not a CPU or CUDA device";
      if (!why.empty()) {
        say("train.mixed_precision = auto: fp32, because " + why);
        return std::nullopt;
      }
      say(device.is_cpu()
              ? "train.mixed_precision = auto: bf16 autocast (the CPU has native bf16 and LibTorch uses its AVX-512 kernels)"
              : "train.mixed_precision = auto: bf16 autocast (the GPU has bf16 tensor cores)");
      return c10::kBFloat16;
    }
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

// Mixed precision: autocast scopes (bf16 / fp16) and the dynamic loss scaler for fp16, as
// torch.autocast and torch.amp.GradScaler do them.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "difftrain/enums.h"
#include "difftrain/named_tensors.h"

namespace difftrain {

// The autocast dtype for a mixed_precision setting on a device (nullopt = full fp32). Throws
// UsageError when the device cannot do it: fp16 is CUDA-only, bf16 on a CPU needs AVX512-BF16
// or AMX (elsewhere it is emulated and slower than fp32). `auto` is bf16 where the hardware
// computes it natively (CUDA compute capability >= 8.0; a CPU with AVX512-BF16 or AMX and
// LibTorch's AVX-512 kernels) and fp32 elsewhere; `reason`, when given, receives why.
std::optional<c10::ScalarType> autocast_dtype(MixedPrecision mp, const c10::Device& device, std::string* reason = nullptr);

// Autocast on for the device type while in scope (torch.autocast(device_type, dtype)); the
// previous state comes back on exit and the cast cache is cleared with the outermost scope.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device_type, std::optional<c10::ScalarType> dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool active_ = false, prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::ScalarType::Undefined;
};

// Dynamic loss scaling (Micikevicius et al. 2018, §3.2), torch.amp.GradScaler's state machine:
// on inf/NaN gradients the step is skipped and the scale multiplied by backoff_factor; after
// growth_interval clean steps in a row it is multiplied by growth_factor. State lives on the
// device and is updated there (no host sync).
struct GradScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

class GradScaler {
 public:
  GradScaler(GradScalerOptions opts, const c10::Device& device);

  at::Tensor scale(const at::Tensor& loss) const { return loss.mul(scale_); }  // before backward
  // Divides the gradients by the scale in place; returns found_inf (0-d float: 1 if any is inf/NaN).
  at::Tensor unscale_(const std::vector<at::Tensor>& grads) const;
  // Backs off or grows the scale (torch._amp_update_scale_).
  void update(const at::Tensor& found_inf);

  const at::Tensor& scale_tensor() const { return scale_; }          // 0-d float
  const at::Tensor& growth_tracker() const { return growth_tracker_; }  // 0-d int32: clean steps in a row

  NamedTensors state_dict() const;  // "scaler.scale", "scaler.growth_tracker"
  void load_state_dict(const std::map<std::string, at::Tensor>& state);

 private:
  GradScalerOptions opts_;
  at::Tensor scale_, growth_tracker_;
};

}  // namespace difftrain

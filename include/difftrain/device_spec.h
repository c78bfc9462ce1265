// run.device's grammar, without LibTorch (config.cpp checks it; env.h resolves it).
#pragma once

#include <optional>
#include <string_view>

namespace difftrain {

// The one device grammar, of run.device and of every --device: "auto", "cpu", "cuda" or "cuda:N"
// with N one to three decimal digits (0 .. kMaxCudaDeviceIndex; no sign, no spaces). Whether GPU N
// exists is resolve_device's question, not the grammar's.
inline constexpr int kMaxCudaDeviceIndex = 999;
inline constexpr const char* kDeviceGrammar = "auto | cpu | cuda | cuda:N (N = 0..999)";  // for error messages
struct DeviceSpec {
  enum class Kind { auto_, cpu, cuda } kind = Kind::auto_;
  std::optional<int> index;  // N of "cuda:N"; nullopt for "cuda", "auto" and "cpu"
};
std::optional<DeviceSpec> parse_device_spec(std::string_view spec);  // nullopt: not in the grammar

}  // namespace difftrain

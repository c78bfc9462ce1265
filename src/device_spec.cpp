#include "difftrain/device_spec.h"

#include <algorithm>
#include <charconv>

namespace difftrain {

std::optional<DeviceSpec> parse_device_spec(std::string_view spec) {
  if (spec == "auto") return DeviceSpec{DeviceSpec::Kind::auto_, std::nullopt};
  if (spec == "cpu") return DeviceSpec{DeviceSpec::Kind::cpu, std::nullopt};
  if (spec == "cuda") return DeviceSpec{DeviceSpec::Kind::cuda, std::nullopt};
  constexpr std::string_view prefix = "cuda:";
  if (spec.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::string_view digits = spec.substr(prefix.size());
  if (digits.empty() || digits.size() > 3 ||  // three digits: N <= kMaxCudaDeviceIndex = 999
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  int index = 0;
  std::from_chars(digits.data(), digits.data() + digits.size(), index);  // cannot fail: 1..3 digits
  return DeviceSpec{DeviceSpec::Kind::cuda, index};
}

}  // namespace difftrain

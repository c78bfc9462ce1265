#include "cuda/cuda_memory.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <fmt/format.h>

namespace difftrain::cuda {

MemoryStats memory_stats(int device_index) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
  constexpr size_t kAggregate = 0;  // StatType::AGGREGATE, all pools together
  return {stats.allocated_bytes[kAggregate].current, stats.reserved_bytes[kAggregate].current,
          stats.allocated_bytes[kAggregate].peak};
}

void reset_peak_memory(int device_index) {
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
}

std::string add_memory_scalars(int device_index, std::vector<std::pair<std::string, double>>& scalars) {
  const auto m = memory_stats(device_index);
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  scalars.emplace_back("system/gpu_mem_allocated_gb", static_cast<double>(m.allocated_bytes) / kGiB);
  scalars.emplace_back("system/gpu_mem_reserved_gb", static_cast<double>(m.reserved_bytes) / kGiB);
  scalars.emplace_back("system/gpu_mem_peak_gb", static_cast<double>(m.peak_allocated_bytes) / kGiB);
  return fmt::format(" | GPU {:.2f}/{:.2f} GiB", static_cast<double>(m.allocated_bytes) / kGiB,
                     static_cast<double>(m.reserved_bytes) / kGiB);
}

void set_device(int device_index) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index)); }

}  // namespace difftrain::cuda

#include "cuda/cuda_memory.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

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

void set_device(int device_index) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index)); }

}  // namespace difftrain::cuda

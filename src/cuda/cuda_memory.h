// GPU memory as LibTorch's caching allocator sees it (torch.cuda.memory_allocated / _reserved /
// max_memory_allocated). Built only against a CUDA LibTorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace difftrain::cuda {

struct MemoryStats {
  int64_t allocated_bytes = 0;       // held by live tensors
  int64_t reserved_bytes = 0;        // held by the allocator's cache
  int64_t peak_allocated_bytes = 0;  // since start or the last reset
};

MemoryStats memory_stats(int device_index);
void reset_peak_memory(int device_index);
// memory_stats as the system/gpu_mem_{allocated,reserved,peak}_gb scalars (GiB), appended to
// `scalars`; returns " | GPU <allocated>/<reserved> GiB" for the log line.
std::string add_memory_scalars(int device_index, std::vector<std::pair<std::string, double>>& scalars);
// Makes `device_index` the current CUDA device of this thread (before any CUDA work: NCCL binds to it).
void set_device(int device_index);

}  // namespace difftrain::cuda

// Environment report (`difftrain env`) and device selection. The point: never train on the CPU
// by accident because the CUDA stack is broken; say which part is missing instead.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <c10/core/Device.h>
#include <nlohmann/json_fwd.hpp>

#include "difftrain/device_spec.h"  // run.device's grammar

namespace difftrain {

struct GpuInfo {
  int index = 0;
  std::string name;
  uint64_t total_memory_bytes = 0;
  int major = 0, minor = 0;        // compute capability
  int multiprocessor_count = 0;
};

// Why CUDA is or is not usable, in the order a user would fix things.
enum class CudaState { ok, not_built, no_driver, driver_too_old, no_device, error };
const char* to_string(CudaState s);

struct CudaStatus {
  CudaState state = CudaState::not_built;
  std::string detail;              // the CUDA error name and text, when there is one
  int runtime_version = 0;         // cudaRuntimeGetVersion, e.g. 13000
  int driver_version = 0;          // cudaDriverGetVersion; 0 = no driver
  std::vector<GpuInfo> gpus;
};

struct EnvReport {
  std::string difftrain_version;
  std::string compiler;
  std::string torch_version_built;    // headers we compiled against
  std::string torch_version_runtime;  // the library we run with (at::show_config)
  bool torch_cuda_built = false;      // libtorch_cuda was linked in
  int torch_cuda_compiled = 0;        // CUDA version LibTorch was built for, e.g. 13000
  CudaStatus cuda;
  std::string cudnn_version;          // runtime cudnnGetVersion, "" when not loaded
  std::string nccl_version;           // runtime ncclGetVersion, "" when not loaded
  std::string nccl_compiled_version;  // the nccl.h the NCCL backend was built with, "" without the backend
  bool gloo_available = false;
  bool nccl_available = false;
  bool mpi_available = false;
  int hardware_threads = 0;           // std::thread::hardware_concurrency
  int torch_threads = 0;              // at::get_num_threads
  std::string cpu_capability;         // AVX2, AVX512, ...
};

EnvReport collect_env();
std::string format_env(const EnvReport& env);
nlohmann::ordered_json env_to_json(const EnvReport& env);

// The CPU kernel level LibTorch dispatches to: "DEFAULT", "AVX2", "AVX512" (x86), as at::show_config() names it.
std::string cpu_capability();

// Set LibTorch's intra-op threads: 0 = all hardware threads. Returns the count in effect.
int configure_threads(int num_threads);

// Resolves a device spelling (run.device's grammar above) against the environment.
// "cuda*" without usable CUDA throws UsageError naming the cause; "auto" falls back to the CPU
// and explains why in `note`. A spelling outside the grammar is a UsageError too.
struct DeviceChoice {
  c10::Device device{c10::kCPU};
  std::string note;
};
DeviceChoice resolve_device(const std::string& spec, const CudaStatus& cuda);

// The GPU of one rank of a distributed run: rank `local_rank` of the `local_world_size` ranks on
// this node, which sees `device_count` CUDA devices (after CUDA_VISIBLE_DEVICES). `requested` is
// N of run.device = "cuda:N", nullopt for "cuda" and "auto". `launcher` ("torchrun" or "slurm")
// picks the variable names in errors.
//  - device_count >= local_world_size: GPU local_rank (torchrun, or srun with the node's GPUs visible);
//  - exactly one visible: GPU 0 (srun --gpus-per-task=1 shows each task only its own GPU);
//  - otherwise a UsageError naming the variables and the count.
// cuda:N is taken only where it cannot put two ranks on one GPU: one rank on the node, or one
// visible device.
int local_cuda_device(int64_t local_rank, int64_t local_world_size, int device_count, std::optional<int> requested,
                      const std::string& launcher = "torchrun");

}  // namespace difftrain

#include "cuda/cuda_probe.h"

#include <cuda_runtime_api.h>

namespace difftrain::cuda {

namespace {
std::string describe(cudaError_t err) { return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err); }
}  // namespace

CudaStatus probe() {
  CudaStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);
  cudaDriverGetVersion(&s.driver_version);  // leaves 0 when no driver is installed

  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    s.detail = describe(err);
    (void)cudaGetLastError();  // clear the sticky error for whoever asks next
    if (s.driver_version == 0) s.state = CudaState::no_driver;
    else if (err == cudaErrorInsufficientDriver) s.state = CudaState::driver_too_old;
    else if (err == cudaErrorNoDevice) s.state = CudaState::no_device;
    else s.state = CudaState::error;
    return s;
  }
  if (count == 0) {
    s.state = CudaState::no_device;
    return s;
  }
  s.state = CudaState::ok;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    s.gpus.push_back(GpuInfo{i, p.name, static_cast<uint64_t>(p.totalGlobalMem), p.major, p.minor, p.multiProcessorCount});
  }
  return s;
}

}  // namespace difftrain::cuda

#include "cuda/nccl_backend.h"

#include <nccl.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace difftrain::cuda {

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                                    const c10::Device& device, std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;  // the watchdog's limit for every collective, and for abort()
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(rank), static_cast<int>(size), opts);
  // The bound device is what barrier() and a failure's abort use instead of guessing GPU
  // rank % device count; the eager connect makes a bad peer fail here, not at the first step.
  pg->setBoundDeviceId(device);
  pg->eagerConnectSingleDevice(device);
  return pg;
}

int nccl_header_version() { return NCCL_VERSION_CODE; }

}  // namespace difftrain::cuda

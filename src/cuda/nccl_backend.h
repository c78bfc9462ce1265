// ProcessGroupNCCL, kept apart so that only this file needs nccl.h and the CUDA headers.
#pragma once

#include <chrono>
#include <cstdint>

#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace difftrain::cuda {

// NCCL bound to `device` (the rank's GPU), its communicator created now rather than at the
// first collective, as init_process_group(device_id=...) does. Collectives older than `timeout`
// are aborted by NCCL's watchdog, which ends the process with an error.
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
                                                    const c10::Device& device, std::chrono::milliseconds timeout);

// The NCCL version of the nccl.h this file was compiled with (NCCL_VERSION_CODE, e.g. 22809).
int nccl_header_version();

}  // namespace difftrain::cuda

// Traces of training steps with LibTorch's profiler (Kineto), the trace torch.profiler writes: a
// Chrome trace JSON of every ATen op (and CUDA kernel) that Perfetto, chrome://tracing and
// TensorBoard's profile plugin open; scripts/bench/profile_ops.py sums it by op type.
#pragma once

#include <cstdint>
#include <filesystem>

namespace difftrain {

class StepProfiler {
 public:
  // Traces steps first_step .. first_step + num_steps - 1 (1-based, as the log counts them) into
  // `path`; first_step 0 = off. `cuda` adds CUDA kernels and memory copies.
  StepProfiler(int64_t first_step, int64_t num_steps, std::filesystem::path path, bool cuda);
  ~StepProfiler();  // a trace still running (a stop before its last step) is dropped
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  void before_step(int64_t step);  // `step` is about to run: starts the trace at first_step
  // `step` has run: at the last traced step, stops and writes the trace; returns true then.
  bool after_step(int64_t step);
  const std::filesystem::path& path() const { return path_; }

 private:
  int64_t first_, last_;
  std::filesystem::path path_;
  bool cuda_, active_ = false;
};

}  // namespace difftrain

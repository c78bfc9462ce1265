// Peak dense TFLOP/s of known GPUs (vendor datasheets), the denominator of train/mfu, and the
// choice between run.peak_tflops and that table.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace difftrain {

// The arithmetic a training step's matrix work runs in: bf16 or fp16 tensor cores (autocast),
// TF32 tensor cores (fp32 with train.allow_tf32), or plain fp32 (CUDA cores).
enum class PeakPrecision { bf16, fp16, tf32, fp32 };
const char* to_string(PeakPrecision p);

// Dense (not 2:4-sparse) peak TFLOP/s of one GPU in `precision`, looked up by the name CUDA
// reports (cudaDeviceProp::name, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB",
// "Tesla V100-SXM2-32GB"). The name is matched by its tokens (split at spaces and hyphens,
// case-insensitive): the model ("H100", "A100", "L40S", "4090") and, where the model comes in
// variants of different peaks, the variant ("PCIe", "NVL"); other tokens (memory size,
// "NVIDIA", "GeForce", "Tesla") are ignored. nullopt: the GPU is not in the table, or it lacks
// that precision (bf16 on Volta and Turing). Where TF32 does not exist (before Ampere),
// allow_tf32 changes nothing and the tf32 entry is the fp32 peak.
std::optional<double> peak_tflops(std::string_view gpu_name, PeakPrecision precision);

// The peak train/mfu divides by, and where it came from (for the log).
struct Peak {
  double tflops = 0;
  std::string source;  // "run.peak_tflops", or "the table: NVIDIA H200, bf16"
};
// run.peak_tflops when > 0; else the table entry of the training GPU (gpu_name; nullopt on a
// CPU) in `precision`; else nullopt (no MFU).
std::optional<Peak> choose_peak(double configured_tflops, const std::optional<std::string>& gpu_name, PeakPrecision precision);

}  // namespace difftrain

#include "difftrain/peak.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <vector>

#include <fmt/format.h>

namespace difftrain {

const char* to_string(PeakPrecision p) {
  switch (p) {
    case PeakPrecision::bf16: return "bf16";
    case PeakPrecision::fp16: return "fp16";
    case PeakPrecision::tf32: return "tf32";
    case PeakPrecision::fp32: return "fp32";
  }
  return "?";
}

namespace {

constexpr double kNone = -1;  // the GPU has no such tensor-core precision

struct Entry {
  std::string_view model;         // a token of the CUDA name, lower case
  std::string_view variant;       // a second token that must be there too; "" = any (list variants first)
  std::string_view label;         // for the log
  double bf16, fp16, tf32, fp32;  // dense TFLOP/s
};

// Dense peak TFLOP/s from the vendors' datasheets. Where a datasheet gives only the 2:4-sparse
// figure (marked "with sparsity"), the dense one is half of it. fp16 and bf16 are tensor-core
// rates with FP32 accumulation (what cuBLAS and cuDNN use under autocast; GeForce cards run
// FP16 accumulation at twice that); tf32 is the TF32 tensor-core rate; fp32 the CUDA-core rate.
constexpr std::array kTable = {
    // NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM FP32 67, TF32 989*, BF16/FP16 1,979*;
    // NVL FP32 60, TF32 835*, BF16/FP16 1,671* (* with sparsity).
    Entry{"h200", "nvl", "H200 NVL", 835.5, 835.5, 417.5, 60},
    Entry{"h200", "", "H200 SXM", 989.5, 989.5, 494.5, 67},
    // NVIDIA GH200 Grace Hopper Superchip datasheet: the H100-class GPU at FP32 67, TF32 494, BF16/FP16 990 (dense).
    Entry{"gh200", "", "GH200", 989.5, 989.5, 494.5, 67},
    // NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM FP32 67, TF32 989*, BF16/FP16 1,979*;
    // PCIe FP32 51, TF32 756*, BF16/FP16 1,513*; NVL FP32 60, TF32 835*, BF16/FP16 1,671*. CUDA names the
    // SXM part "NVIDIA H100 80GB HBM3".
    Entry{"h100", "pcie", "H100 PCIe", 756.5, 756.5, 378, 51},
    Entry{"h100", "nvl", "H100 NVL", 835.5, 835.5, 417.5, 60},
    Entry{"h100", "", "H100 SXM", 989.5, 989.5, 494.5, 67},
    // NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), every A100 (40/80 GB, PCIe/SXM):
    // FP32 19.5, TF32 156, BF16/FP16 312 (dense).
    Entry{"a100", "", "A100", 312, 312, 156, 19.5},
    // NVIDIA L40S datasheet: FP32 91.6, TF32 183, BF16/FP16 362.05 (dense).
    Entry{"l40s", "", "L40S", 362.05, 362.05, 183, 91.6},
    // NVIDIA L40 datasheet: FP32 90.5, TF32 90.5, BF16/FP16 181.05 (dense).
    Entry{"l40", "", "L40", 181.05, 181.05, 90.5, 90.5},
    // NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*.
    Entry{"l4", "", "L4", 121, 121, 60, 30.3},
    // NVIDIA A40 datasheet: FP32 37.4, TF32 74.8, BF16/FP16 149.7 (dense).
    Entry{"a40", "", "A40", 149.7, 149.7, 74.8, 37.4},
    // NVIDIA A10 datasheet: FP32 31.2, TF32 62.5, BF16/FP16 125 (dense).
    Entry{"a10", "", "A10", 125, 125, 62.5, 31.2},
    // NVIDIA A10G for AWS datasheet (NVIDIA_AWS_A10G_DataSheet_FINAL_02_17_2022.pdf): FP32 35, TF32 35, BF16/FP16 70
    // (dense); a different tensor-core configuration from the A10.
    Entry{"a10g", "", "A10G", 70, 70, 35, 35},
    // NVIDIA Ampere GA102 GPU architecture whitepaper, appendix: RTX A6000 FP32 38.7, TF32 77.4,
    // BF16/FP16 (FP32 accumulate) 154.8 (dense).
    Entry{"a6000", "", "RTX A6000", 154.8, 154.8, 77.4, 38.7},
    // NVIDIA Ada GPU architecture whitepaper, appendix A: RTX 4090 FP32 82.6, TF32 82.6, BF16/FP16 with FP32
    // accumulate 165.2 (dense).
    Entry{"4090", "", "GeForce RTX 4090", 165.2, 165.2, 82.6, 82.6},
    // NVIDIA V100 datasheet: SXM2 FP32 15.7, tensor (FP16) 125; PCIe 14 / 112; V100S PCIe 16.4 / 130. No bf16, no TF32.
    Entry{"v100s", "", "V100S PCIe", kNone, 130, 16.4, 16.4},
    Entry{"v100", "pcie", "V100 PCIe", kNone, 112, 14, 14},
    Entry{"v100", "", "V100 SXM2", kNone, 125, 15.7, 15.7},
    // NVIDIA T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65. No bf16, no TF32.
    Entry{"t4", "", "T4", kNone, 65, 8.1, 8.1},
};

std::vector<std::string> tokens(std::string_view name) {
  std::vector<std::string> out(1);
  for (const char ch : name) {
    if (ch == ' ' || ch == '-' || ch == '_') {
      if (!out.back().empty()) out.emplace_back();
    } else {
      out.back() += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    }
  }
  if (out.back().empty()) out.pop_back();
  return out;
}

const Entry* find_entry(std::string_view gpu_name) {
  const auto t = tokens(gpu_name);
  const auto has = [&](std::string_view s) { return std::find(t.begin(), t.end(), s) != t.end(); };
  for (const auto& e : kTable)
    if (has(e.model) && (e.variant.empty() || has(e.variant))) return &e;
  return nullptr;
}

double value(const Entry& e, PeakPrecision p) {
  switch (p) {
    case PeakPrecision::bf16: return e.bf16;
    case PeakPrecision::fp16: return e.fp16;
    case PeakPrecision::tf32: return e.tf32;
    case PeakPrecision::fp32: return e.fp32;
  }
  return kNone;
}

}  // namespace

std::optional<double> peak_tflops(std::string_view gpu_name, PeakPrecision precision) {
  const Entry* e = find_entry(gpu_name);
  if (!e || value(*e, precision) <= 0) return std::nullopt;
  return value(*e, precision);
}

std::optional<Peak> choose_peak(double configured_tflops, const std::optional<std::string>& gpu_name, PeakPrecision precision) {
  if (configured_tflops > 0) return Peak{configured_tflops, "run.peak_tflops"};
  if (!gpu_name) return std::nullopt;
  const auto v = peak_tflops(*gpu_name, precision);
  if (!v) return std::nullopt;
  return Peak{*v, fmt::format("the table: {} as {}, {}", *gpu_name, find_entry(*gpu_name)->label, to_string(precision))};
}

}  // namespace difftrain

// Generating images from a model and a scheduler in diffusers' canonical loop (DDPMPipeline,
// DDIMPipeline, and the same loop with DPMSolverMultistep, UniPCMultistep and EulerAncestralDiscrete
// schedulers), with optional class labels and classifier-free guidance (Ho & Salimans 2022).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "difftrain/config.h"
#include "difftrain/edm.h"
#include "difftrain/scheduler.h"
#include "difftrain/unet.h"

namespace difftrain {

struct SamplingOptions {
  Sampler sampler = Sampler::ddim;  // ddpm | ddim | dpm_solver_multistep | unipc_multistep | euler_ancestral; EDM: heun | euler
  int64_t num_inference_steps = 50;      // DDPM usually T; DDIM 50; DPM-Solver++ / UniPC 10-25
  double eta = 0.0;                      // DDIM η
  int64_t solver_order = 2;              // DPM-Solver++ / UniPC order, 1..3
  bool use_karras_sigmas = false;        // DPM-Solver++ / UniPC: Karras et al. σ schedule
  int64_t num_samples = 16;
  int64_t batch_size = 16;               // images denoised at once
  double guidance_scale = 1.0;           // ε = ε_∅ + s (ε_c - ε_∅); 1 = plain conditional
  int64_t seed = 0;                      // fixes the result for a given batch_size and device
  std::vector<int64_t> class_labels;     // per sample, or one for all; empty: cycle through the classes
  EDMSamplerOptions edm;                 // heun / euler: Algorithm 2's churn (its `heun` follows `sampler`)

  static SamplingOptions from(const SamplingConfig& s);
};

// Denoises num_samples images of the model's shape in diffusers' loop: x = randn · init_noise_sigma,
// then for each t: out = model(scale_model_input(x, t), t), x = step(out, t, x, generator). Returns float samples (N, C, H, W) in
// about [-1, 1] on `device`. The model is put in eval mode and run without gradients. DDPM samplers.
at::Tensor generate(UNet2DModel& model, const SchedulerConfig& scheduler, const SamplingOptions& opts,
                    const c10::Device& device);
// The same for an EDM model (heun or euler): x_0 = σ_0 z, then edm_sample with the preconditioned
// denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise) and guidance on F.
at::Tensor generate(UNet2DModel& model, const EDMConfig& edm, const SamplingOptions& opts, const c10::Device& device);
// Either, by diffusion.formulation.
at::Tensor generate(UNet2DModel& model, const DiffusionConfig& diffusion, const SamplingOptions& opts, const c10::Device& device);
// Network evaluations per image of one generate() (guidance runs each as one batch of 2B): the
// steps, but heun's 2N - 1.
int64_t sampler_nfe(const SamplingOptions& opts);

// The model output with classifier-free guidance: (B, C, H, W) for labels (B); scale 1 runs the
// conditional pass only.
at::Tensor guided_model_output(UNet2DModel& model, const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels,
                               double guidance_scale);

// [-1, 1] floats -> uint8 in [0, 255], as diffusers' pipelines round them.
at::Tensor to_uint8(const at::Tensor& images);
// A (C, rows (H + pad) + pad, cols (W + pad) + pad) grid of (N, C, H, W) images, `nrow` per row,
// as torchvision's make_grid lays it out.
at::Tensor make_grid(const at::Tensor& images, int64_t nrow, int64_t padding = 2, int64_t pad_value = 0);

// Writes a (C, H, W) uint8 image (C = 1 or 3) as a PNG, creating the directory.
void write_png(const std::filesystem::path& path, const at::Tensor& image);
// Writes (N, C, H, W) uint8 images as dir/000000.png, 000001.png, ... and dir/grid.png (all of
// them, ⌈√N⌉ per row).
void save_sample_folder(const std::filesystem::path& dir, const at::Tensor& images);
// A grid (⌈√N⌉ per row) of (N, C, H, W) uint8 images, written as a PNG at `path`; returns it,
// (C, H', W') uint8 on the CPU, for TensorBoard.
at::Tensor save_sample_grid(const std::filesystem::path& path, const at::Tensor& images);

}  // namespace difftrain

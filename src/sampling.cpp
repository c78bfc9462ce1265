#include "difftrain/sampling.h"

#include <cmath>
#include <fstream>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include "difftrain/data_formats.h"
#include "difftrain/edm.h"
#include "difftrain/errors.h"
#include "difftrain/euler_ancestral.h"
#include "difftrain/multistep.h"
#include "difftrain/scalar_ops.h"

namespace difftrain {

SamplingOptions SamplingOptions::from(const SamplingConfig& s) {
  SamplingOptions o;
  o.sampler = s.sampler;
  o.num_inference_steps = s.num_inference_steps;
  o.eta = s.eta;
  o.solver_order = s.solver_order;
  o.use_karras_sigmas = s.use_karras_sigmas;
  o.num_samples = s.num_samples;
  o.batch_size = s.batch_size;
  o.guidance_scale = s.guidance_scale;
  o.seed = s.seed;
  o.edm = EDMSamplerOptions::from(s);
  return o;
}

at::Tensor guided_model_output(UNet2DModel& model, const at::Tensor& x, const at::Tensor& t, const at::Tensor& labels,
                               double guidance_scale) {
  if (!labels.defined() || guidance_scale == 1.0) return model->forward(x, t, labels);
  // One batch of 2B: conditional, then the null class (Ho & Salimans 2022, eq. 6).
  const auto null = at::full_like(labels, model->null_class());
  const auto out = model->forward(at::cat({x, x}), at::cat({t, t}), at::cat({labels, null}));  // (2B, C, H, W)
  const auto cond = out.slice(0, 0, x.size(0)), uncond = out.slice(0, x.size(0));
  return uncond + guidance_scale * (cond - uncond);
}

namespace {
// diffusers' canonical loop for one batch x_T ~ N(0, I) (B, C, H, W): scale by init_noise_sigma,
// then per timestep scale_model_input, the model, step. `step(out, t, x)` calls the scheduler's
// own step with its extra arguments; the model sees the timestep as the scheduler keeps it
// (int64, or float32 for Euler ancestral's fractional timesteps).
template <class Scheduler, class Model, class Step>
at::Tensor denoise(Scheduler& scheduler, int64_t num_inference_steps, at::Tensor x, const Model& model, const Step& step) {
  scheduler.set_timesteps(num_inference_steps);  // also resets a multistep solver's history
  x = x * scheduler.init_noise_sigma();
  for (const auto t : scheduler.timesteps()) {
    const auto model_input = scheduler.scale_model_input(x, t);
    const auto out = model(model_input, t);
    x = step(out, t, x);
  }
  return x;
}
}  // namespace

namespace {
// What every sampler shares: checks the options against the model, runs it in eval mode without
// gradients, and denoises the samples batch by batch from z ~ N(0, I) drawn with a private
// generator seeded by opts.seed. denoise_batch(z, unet, gen) returns the batch's x₀, where
// unet(x_in, t) is the guided model output for timesteps t (B) (float or int64).
template <class DenoiseBatch> at::Tensor sample_batches(UNet2DModel& model, const SamplingOptions& opts,
                                                        const c10::Device& device, const DenoiseBatch& denoise_batch) {
  const auto& mc = model->config();
  TORCH_CHECK(opts.num_samples >= 1 && opts.batch_size >= 1, "generate: num_samples and batch_size must be >= 1");
  const bool conditional = mc.num_class_embeds.has_value();
  TORCH_CHECK(conditional || opts.class_labels.empty(), "generate: class labels given to an unconditional model");
  TORCH_CHECK(conditional || opts.guidance_scale == 1.0, "generate: guidance needs a class-conditional model");
  TORCH_CHECK(opts.class_labels.empty() || opts.class_labels.size() == 1 ||
                  static_cast<int64_t>(opts.class_labels.size()) == opts.num_samples,
              "generate: give one class label, one per sample, or none");
  for (int64_t y : opts.class_labels)
    TORCH_CHECK(y >= 0 && y < *mc.num_class_embeds, "generate: class label ", y, " outside [0, ", *mc.num_class_embeds, ")");

  c10::NoGradGuard no_grad;
  struct RestoreMode {  // eval while sampling, the caller's mode afterwards, also on errors
    UNet2DModel& m;
    bool was_training;
    ~RestoreMode() { m->train(was_training); }
  } restore{model, model->is_training()};
  model->eval();

  auto gen = at::globalContext().defaultGenerator(device).clone();  // private stream of this call
  gen.set_current_seed(static_cast<uint64_t>(opts.seed));
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  std::vector<at::Tensor> batches;
  for (int64_t start = 0; start < opts.num_samples; start += opts.batch_size) {
    const int64_t b = std::min(opts.batch_size, opts.num_samples - start);
    at::Tensor labels;
    if (conditional) {
      std::vector<int64_t> y(static_cast<size_t>(b));
      for (int64_t i = 0; i < b; ++i) {
        const int64_t n = start + i;
        y[static_cast<size_t>(i)] = opts.class_labels.empty()       ? n % *mc.num_class_embeds
                                    : opts.class_labels.size() == 1 ? opts.class_labels[0]
                                                                    : opts.class_labels[static_cast<size_t>(n)];
      }
      labels = at::tensor(y, at::TensorOptions().dtype(at::kLong)).to(device);
    }
    const auto z = at::randn({b, mc.in_channels, mc.sample_size, mc.sample_size}, gen, options);  // z ~ N(0, I)
    const auto unet = [&](const at::Tensor& x_in, const at::Tensor& t) {                          // (B, C, H, W), t (B)
      return guided_model_output(model, x_in, t, labels, opts.guidance_scale);
    };
    batches.push_back(denoise_batch(z, unet, gen));
  }
  return at::cat(batches);  // (N, C, H, W)
}
}  // namespace

at::Tensor generate(UNet2DModel& model, const SchedulerConfig& scheduler_cfg, const SamplingOptions& opts,
                    const c10::Device& device) {
  TORCH_CHECK(!is_edm_sampler(opts.sampler), "generate: ", to_string(opts.sampler), " samples EDM models (an EDMConfig)");
  TORCH_CHECK(opts.solver_order >= 1 && opts.solver_order <= 3, "generate: solver_order must be 1, 2 or 3, got ",
              opts.solver_order);
  // diffusers' loop with `scheduler` for every batch; step(out, t, x, gen) is its step().
  const auto sample_all = [&](auto& scheduler, const auto& step) {
    return sample_batches(model, opts, device, [&](const at::Tensor& z, const auto& unet, at::Generator& gen) {
      const auto model_fn = [&](const at::Tensor& x_in, auto t) {  // t as the scheduler keeps it
        const auto dtype = std::is_floating_point_v<decltype(t)> ? at::kFloat : at::kLong;
        return unet(x_in, at::full({z.size(0)}, t, at::TensorOptions().dtype(dtype).device(device)));
      };
      return denoise(scheduler, opts.num_inference_steps, z, model_fn,
                     [&](const at::Tensor& out, auto t, const at::Tensor& x) { return step(out, t, x, gen); });
    });
  };

  switch (opts.sampler) {
    case Sampler::ddpm: {
      DDPMScheduler s(scheduler_cfg);
      return sample_all(s, [&](const at::Tensor& out, int64_t t, const at::Tensor& x, at::Generator& gen) {
        return s.step(out, t, x, gen).prev_sample;
      });
    }
    case Sampler::ddim: {
      DDIMScheduler s(scheduler_cfg);
      return sample_all(s, [&](const at::Tensor& out, int64_t t, const at::Tensor& x, at::Generator& gen) {
        return s.step(out, t, x, opts.eta, gen).prev_sample;
      });
    }
    case Sampler::dpm_solver_multistep: {
      DPMSolverMultistepScheduler s(scheduler_cfg, opts.solver_order, opts.use_karras_sigmas);
      return sample_all(s, [&](const at::Tensor& out, int64_t t, const at::Tensor& x, at::Generator& gen) {
        return s.step(out, t, x, gen).prev_sample;
      });
    }
    case Sampler::unipc_multistep: {
      UniPCMultistepScheduler s(scheduler_cfg, opts.solver_order, opts.use_karras_sigmas);
      return sample_all(s, [&](const at::Tensor& out, int64_t t, const at::Tensor& x, at::Generator&) {
        return s.step(out, t, x).prev_sample;
      });
    }
    case Sampler::euler_ancestral: {
      EulerAncestralDiscreteScheduler s(scheduler_cfg);
      return sample_all(s, [&](const at::Tensor& out, float t, const at::Tensor& x, at::Generator& gen) {
        return s.step(out, t, x, gen).prev_sample;
      });
    }
    case Sampler::heun:
    case Sampler::euler: break;
  }
  TORCH_CHECK(false, "generate: unknown sampler");
}

at::Tensor generate(UNet2DModel& model, const EDMConfig& edm, const SamplingOptions& opts, const c10::Device& device) {
  TORCH_CHECK(is_edm_sampler(opts.sampler), "generate: an EDM model samples with heun or euler, not ", to_string(opts.sampler));
  const auto sigmas = edm_sigmas(edm, opts.num_inference_steps);  // (N + 1) float32
  const float sigma_0 = sigmas[0].item<float>();
  EDMSamplerOptions sampler_options = opts.edm;
  sampler_options.heun = opts.sampler == Sampler::heun;
  return sample_batches(model, opts, device, [&](const at::Tensor& z, const auto& unet, at::Generator& gen) {
    // D(x; σ) = c_skip x + c_out F(c_in x; c_noise) (Table 1); guidance combines F, which D is affine in.
    const EDMDenoiser denoiser = [&](const at::Tensor& x, float sigma) {
      const auto c = edm_preconditioning(scalar_ops::f32(sigma), edm.sigma_data);
      const auto model_input = x * c.c_in.item<float>();
      const auto out = unet(model_input, at::full({x.size(0)}, c.c_noise.item<float>(), x.options()));
      return edm_denoised(x, out, c);
    };
    return edm_sample(denoiser, z * sigma_0, sigmas, sampler_options, gen);  // x_0 ~ N(0, σ_0² I) (Algorithm 1, line 2)
  });
}

at::Tensor generate(UNet2DModel& model, const DiffusionConfig& diffusion, const SamplingOptions& opts,
                    const c10::Device& device) {
  if (diffusion.formulation == Formulation::edm) return generate(model, EDMConfig::from(diffusion), opts, device);
  return generate(model, SchedulerConfig::from(diffusion), opts, device);
}

int64_t sampler_nfe(const SamplingOptions& opts) {
  return is_edm_sampler(opts.sampler) ? edm_nfe(opts.sampler == Sampler::heun, opts.num_inference_steps)
                                      : opts.num_inference_steps;
}

at::Tensor to_uint8(const at::Tensor& images) {
  return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(at::kByte);
}

at::Tensor make_grid(const at::Tensor& images, int64_t nrow, int64_t padding, int64_t pad_value) {
  TORCH_CHECK(images.dim() == 4, "make_grid: images must be (N, C, H, W), got ", images.sizes());
  TORCH_CHECK(nrow >= 1 && padding >= 0 && images.size(0) >= 1, "make_grid: needs images, nrow >= 1 and padding >= 0");
  const int64_t n = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3);
  const int64_t cols = std::min(nrow, n), rows = (n + cols - 1) / cols;
  auto grid = at::full({c, rows * (h + padding) + padding, cols * (w + padding) + padding}, pad_value, images.options());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = i / cols, col = i % cols;
    grid.slice(1, r * (h + padding) + padding, r * (h + padding) + padding + h)
        .slice(2, col * (w + padding) + padding, col * (w + padding) + padding + w)
        .copy_(images[i]);
  }
  return grid;
}

void write_png(const std::filesystem::path& path, const at::Tensor& image) {
  TORCH_CHECK(image.dim() == 3 && image.scalar_type() == at::kByte, "write_png: needs a (C, H, W) uint8 tensor");
  const auto chw = image.cpu().contiguous();
  const auto png = formats::encode_png(chw.const_data_ptr<uint8_t>(), chw.size(0), chw.size(1), chw.size(2));
  std::error_code ec;
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
  out.flush();
  if (!out) throw RuntimeError(fmt::format("cannot write {}", path.string()));
}

void save_sample_folder(const std::filesystem::path& dir, const at::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(0) >= 1, "save_sample_folder: needs (N, C, H, W) images");
  for (int64_t i = 0; i < images.size(0); ++i) write_png(dir / fmt::format("{:06d}.png", i), images[i]);
  save_sample_grid(dir / "grid.png", images);
}

at::Tensor save_sample_grid(const std::filesystem::path& path, const at::Tensor& images) {
  const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(images.size(0)))));
  const auto grid = make_grid(images.cpu(), nrow);  // (C, H', W') uint8
  write_png(path, grid);
  return grid;
}

}  // namespace difftrain

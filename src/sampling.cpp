#include "difftrain/sampling.h"

#include <cmath>
#include <fstream>

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>

#include "difftrain/data_formats.h"
#include "difftrain/errors.h"

namespace difftrain {

SamplingOptions SamplingOptions::from(const SamplingConfig& s) {
  SamplingOptions o;
  o.sampler = s.sampler;
  o.num_inference_steps = s.num_inference_steps;
  o.eta = s.eta;
  o.num_samples = s.num_samples;
  o.batch_size = s.batch_size;
  o.guidance_scale = s.guidance_scale;
  o.seed = s.seed;
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

at::Tensor generate(UNet2DModel& model, const SchedulerConfig& scheduler_cfg, const SamplingOptions& opts,
                    const c10::Device& device) {
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

  DDPMScheduler ddpm(scheduler_cfg);
  DDIMScheduler ddim(scheduler_cfg);
  NoiseSchedule& schedule = opts.sampler == Sampler::ddpm ? static_cast<NoiseSchedule&>(ddpm) : ddim;
  schedule.set_timesteps(opts.num_inference_steps);

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
        y[static_cast<size_t>(i)] = opts.class_labels.empty()        ? n % *mc.num_class_embeds
                                    : opts.class_labels.size() == 1 ? opts.class_labels[0]
                                                                    : opts.class_labels[static_cast<size_t>(n)];
      }
      labels = at::tensor(y, at::TensorOptions().dtype(at::kLong)).to(device);
    }
    auto x = at::randn({b, mc.in_channels, mc.sample_size, mc.sample_size}, gen, options);  // x_T ~ N(0, I)
    for (const int64_t t : schedule.timesteps()) {
      const auto t_batch = at::full({b}, t, at::TensorOptions().dtype(at::kLong).device(device));
      const auto out = guided_model_output(model, x, t_batch, labels, opts.guidance_scale);
      x = opts.sampler == Sampler::ddpm ? ddpm.step(out, t, x, gen).prev_sample : ddim.step(out, t, x, opts.eta, gen).prev_sample;
    }
    batches.push_back(x);
  }
  return at::cat(batches);  // (N, C, H, W)
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
  const auto nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(images.size(0)))));
  write_png(dir / "grid.png", make_grid(images, nrow));
}

}  // namespace difftrain

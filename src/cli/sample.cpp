// `difftrain sample`: images from a checkpoint (DDPM, DDIM, DPM-Solver++, UniPC or Euler ancestral, class labels and classifier-free
// guidance for class-conditional models), one PNG each plus grid.png.
#include <memory>
#include <regex>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/log.h"
#include "difftrain/sampling.h"
#include "difftrain/train_state.h"

namespace difftrain::cli {

namespace fs = std::filesystem;

namespace {

struct SampleCommand {
  CheckpointOptions checkpoint;
  SamplingFlags sampling;
  DeviceOptions device;
  std::string out;
  bool overwrite = false;
};

// An empty (or new) output folder; with --overwrite, one whose earlier samples are removed first.
void prepare_out_dir(const fs::path& out, bool overwrite) {
  std::error_code ec;
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) throw UsageError(fmt::format("--out {}: not a directory", out.string()));
  if (fs::is_directory(out, ec) && !fs::is_empty(out, ec)) {
    if (!overwrite)
      throw UsageError(fmt::format("--out {} is not empty; choose another directory, or pass --overwrite to replace the "
                                   "samples in it", out.string()));
    static const std::regex sample_name(R"(\d{6}\.png|grid\.png)");
    for (const auto& e : fs::directory_iterator(out, ec))
      if (e.is_regular_file() && std::regex_match(e.path().filename().string(), sample_name)) fs::remove(e.path(), ec);
  }
  fs::create_directories(out, ec);
  if (ec) throw RuntimeError(fmt::format("cannot create {}: {}", out.string(), ec.message()));
}

int run_sample(const SampleCommand& c) {
  const c10::Device device = pick_device(c.device);
  const CheckpointWeights w = open_checkpoint(c.checkpoint);
  const SamplingOptions opts = sampling_options(c.sampling, w.config, w.config.sampling.num_samples);
  const fs::path out = !c.out.empty() ? fs::path(c.out)
                                      : run_dir_of_checkpoint(w.path) / "samples" /
                                            fmt::format("{}_{}", w.path.filename().string(), to_string(w.kind));
  prepare_out_dir(out, c.overwrite);
  UNet2DModel model = model_with_weights(w.config.model, weights_map(w.weights),
                                         (w.path / (to_string(w.kind) + ".safetensors")).string(), device);
  log_info("sampling {} images: {} with {} steps ({} network evaluations{}), seed {}, batch size {}{}", opts.num_samples,
           to_string(opts.sampler), opts.num_inference_steps, sampler_nfe(opts),
           is_edm_sampler(opts.sampler) ? fmt::format(", S_churn = {}", opts.edm.s_churn) : fmt::format(", η = {}", opts.eta),
           opts.seed, opts.batch_size,
           !w.config.model.num_class_embeds ? std::string()
           : opts.class_labels.empty()
               ? fmt::format(", classes cycling 0..{}, guidance {}", *w.config.model.num_class_embeds - 1, opts.guidance_scale)
               : fmt::format(", class {}, guidance {}", opts.class_labels[0], opts.guidance_scale));
  const auto images = to_uint8(generate(model, w.config.diffusion, opts, device));  // (N, C, H, W)
  save_sample_folder(out, images);
  log_info("wrote {} samples (000000.png ...) and grid.png to {}", images.size(0), out.string());
  return kExitOk;
}

}  // namespace

void set_sample_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("sample", "Generate images from a checkpoint: one PNG per sample and grid.png");
  auto c = std::make_shared<SampleCommand>();  // owned by the callback, so by the App
  add_checkpoint_options(cmd, c->checkpoint);
  add_sampling_flags(cmd, c->sampling, "Images to generate (default: the checkpoint's sampling.num_samples)");
  add_device_options(cmd, c->device);
  cmd->add_option("-o,--out", c->out, "Output folder (default: <run>/samples/<checkpoint>_<weights>/); must be empty or new")
      ->type_name("DIR")
      ->group("Output");
  cmd->add_flag("--overwrite", c->overwrite, "Allow a non-empty --out: its NNNNNN.png and grid.png are replaced")
      ->group("Output");
  cmd->callback([c, &exit_code] { exit_code = run_sample(*c); });
}

}  // namespace difftrain::cli

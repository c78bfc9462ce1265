// `difftrain sample`: images from a checkpoint (DDPM, DDIM, DPM-Solver++, UniPC or Euler ancestral, class labels and classifier-free
// guidance for class-conditional models), one PNG each plus grid.png. Also the checkpoint and
// sampling options that eval and export share.
#include <regex>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/commands.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/log.h"
#include "difftrain/sampling.h"
#include "difftrain/train_state.h"

namespace difftrain::cli {

namespace fs = std::filesystem;

void add_checkpoint_options(CLI::App* cmd, CheckpointOptions& opts) {
  const Config defaults;
  opts.run = (fs::path(defaults.run.output_dir) / defaults.run.name).string();
  cmd->add_option("--checkpoint", opts.checkpoint,
                  "'latest' (the newest good checkpoint of --run), a checkpoint directory (<run>/checkpoints/step_XXXXXXXX) or "
                  "a run directory (its newest good checkpoint)")
      ->type_name("latest|PATH")
      ->capture_default_str()
      ->group("Checkpoint");
  cmd->add_option("--run", opts.run, "Run directory that --checkpoint latest looks in")
      ->type_name("DIR")
      ->capture_default_str()
      ->group("Checkpoint");
  opts.weights_option = cmd->add_option("--weights", opts.weights,
                                        "The EMA weights or the raw model weights (without --weights, a run that kept no "
                                        "EMA uses its model weights)")
                            ->type_name("ema|model")
                            ->check(CLI::IsMember({"ema", "model"}))
                            ->capture_default_str()
                            ->group("Checkpoint");
}

CheckpointWeights open_checkpoint(const CheckpointOptions& opts) {
  const fs::path path = resolve_checkpoint(opts.checkpoint, opts.run);
  WeightsKind kind = *enum_from_string<WeightsKind>(opts.weights);
  const bool explicit_weights = opts.weights_option && opts.weights_option->count() > 0;
  if (kind == WeightsKind::ema && !explicit_weights && !fs::exists(path / "ema.safetensors") &&
      fs::exists(path / "model.safetensors")) {
    log_info("{} has no EMA weights (the run had ema.enabled = false): using the model weights", path.string());
    kind = WeightsKind::model;
  }
  CheckpointWeights w = load_checkpoint_weights(path, kind);
  log_info("checkpoint {} (step {}), {} weights", path.string(), w.step, to_string(kind));
  return w;
}

void add_sample_options(CLI::App* cmd, SampleOptions& opts, const std::string& num_samples_help) {
  const std::string from = " (default: the checkpoint's sampling.";
  auto add = [&](CLI::Option* o) {
    opts.given.push_back(o);
    return o;
  };
  add(cmd->add_option("-n,--num-samples", opts.num_samples, num_samples_help))
      ->type_name("N")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
  add(cmd->add_option("--sampler", opts.sampler,
                      "ddpm (Ho et al. 2020), ddim (Song et al. 2021), dpm_solver_multistep (DPM-Solver++, Lu et al. 2022), "
                      "unipc_multistep (UniPC, Zhao et al. 2023) or euler_ancestral (Karras et al. 2022), as diffusers' "
                      "schedulers compute them" +
                          from + "sampler)"))
      ->type_name("NAME")
      ->check(CLI::IsMember(enum_names<Sampler>()))
      ->group("Sampling");
  add(cmd->add_option("--steps", opts.steps, "Denoising steps" + from + "num_inference_steps)"))
      ->type_name("S")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
  add(cmd->add_option("--eta", opts.eta, "DDIM η: 0 deterministic, 1 DDPM-like variance" + from + "eta)"))
      ->type_name("E")
      ->check(CLI::Range(0.0, 1.0))
      ->group("Sampling");
  add(cmd->add_option("--solver-order", opts.solver_order,
                      "Order of dpm_solver_multistep and unipc_multistep" + from + "solver_order)"))
      ->type_name("1|2|3")
      ->check(CLI::Range(1, 3))
      ->group("Sampling");
  add(cmd->add_flag(
          "--karras-sigmas,!--no-karras-sigmas", opts.karras_sigmas,
          "dpm_solver_multistep and unipc_multistep: the σ schedule of Karras et al. 2022" + from + "use_karras_sigmas)"))
      ->group("Sampling");
  add(cmd->add_option("--class-label", opts.class_label,
                      "Class-conditional models: one class K for every sample, or 'all' to cycle through the classes "
                      "(default: all)"))
      ->type_name("K|all")
      ->group("Sampling");
  add(cmd->add_option("--guidance-scale", opts.guidance_scale,
                      "Classifier-free guidance scale, class-conditional models only; 1 = none" + from + "guidance_scale)"))
      ->type_name("G")
      ->check(CLI::NonNegativeNumber)
      ->group("Sampling");
  add(cmd->add_option("--seed", opts.seed, "Seed of the sampling noise; the result is fixed for a seed, batch size and "
                                           "device" + from + "seed)"))
      ->type_name("S")
      ->check(CLI::NonNegativeNumber)
      ->group("Sampling");
  add(cmd->add_option("--batch-size", opts.batch_size, "Images denoised at once" + from + "batch_size)"))
      ->type_name("B")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
  cmd->add_option("--device", opts.device, "auto | cpu | cuda | cuda:N")->type_name("SPEC")->capture_default_str()->group("Device");
  cmd->add_option("--threads", opts.threads, "CPU threads for LibTorch; 0 = all cores")
      ->type_name("N")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str()
      ->group("Device");
}

bool given(const SampleOptions& opts, const std::string& name) {
  for (const auto* o : opts.given)
    if (o->check_lname(name.substr(2)) && o->count() > 0) return true;
  return false;
}

SamplingOptions sampling_options(const SampleOptions& opts, const Config& cfg, int64_t default_num_samples) {
  SamplingOptions s = SamplingOptions::from(cfg.sampling);
  s.num_samples = given(opts, "--num-samples") ? opts.num_samples : default_num_samples;
  if (given(opts, "--sampler")) s.sampler = *enum_from_string<Sampler>(opts.sampler);
  if (given(opts, "--steps")) s.num_inference_steps = opts.steps;
  if (given(opts, "--eta")) s.eta = opts.eta;
  if (given(opts, "--solver-order")) s.solver_order = opts.solver_order;
  if (given(opts, "--karras-sigmas")) s.use_karras_sigmas = opts.karras_sigmas;
  const bool multistep = s.sampler == Sampler::dpm_solver_multistep || s.sampler == Sampler::unipc_multistep;
  if (!multistep && !given(opts, "--karras-sigmas")) s.use_karras_sigmas = false;  // the config's, for its own sampler
  if (s.use_karras_sigmas && !multistep)
    throw UsageError(
        fmt::format("--karras-sigmas (sampling.use_karras_sigmas) needs --sampler dpm_solver_multistep or "
                    "unipc_multistep, not {}",
                    to_string(s.sampler)));
  if (given(opts, "--seed")) s.seed = opts.seed;
  if (given(opts, "--batch-size")) s.batch_size = opts.batch_size;
  if (s.num_inference_steps > cfg.diffusion.num_train_timesteps)
    throw UsageError(fmt::format("--steps {}: at most diffusion.num_train_timesteps = {}", s.num_inference_steps,
                                 cfg.diffusion.num_train_timesteps));
  const auto& classes = cfg.model.num_class_embeds;
  if (!classes) {
    if (given(opts, "--class-label"))
      throw UsageError(fmt::format("--class-label {}: this checkpoint's model is unconditional (model.num_class_embeds is "
                                   "null), so it takes no class labels", opts.class_label));
    if (given(opts, "--guidance-scale") && opts.guidance_scale != 1.0)
      throw UsageError(fmt::format("--guidance-scale {}: classifier-free guidance needs a class-conditional model; this "
                                   "checkpoint's model is unconditional", opts.guidance_scale));
    s.guidance_scale = 1.0;
    return s;
  }
  if (given(opts, "--guidance-scale")) s.guidance_scale = opts.guidance_scale;
  if (given(opts, "--class-label") && opts.class_label != "all") {
    int64_t k = -1;
    try {
      size_t used = 0;
      k = std::stoll(opts.class_label, &used);
      if (used != opts.class_label.size()) k = -1;
    } catch (const std::exception&) {
      k = -1;
    }
    if (k < 0 || k >= *classes)
      throw UsageError(fmt::format("--class-label {}: the model has classes 0..{}; give one of them or 'all'",
                                   opts.class_label, *classes - 1));
    s.class_labels = {k};
  }
  return s;
}

c10::Device pick_device(const SampleOptions& opts) {
  configure_threads(opts.threads);
  const DeviceChoice choice = resolve_device(opts.device, collect_env().cuda);  // UsageError when cuda is unusable
  if (choice.device.is_cpu() && opts.device == "auto") log_warn("{}", choice.note);
  else log_info("device: {} ({})", choice.device.str(), choice.note);
  return choice.device;
}

namespace {

struct SampleCommand {
  CheckpointOptions checkpoint;
  SampleOptions sample;
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
  const c10::Device device = pick_device(c.sample);
  const CheckpointWeights w = open_checkpoint(c.checkpoint);
  const SamplingOptions opts = sampling_options(c.sample, w.config, w.config.sampling.num_samples);
  const fs::path out = !c.out.empty() ? fs::path(c.out)
                                      : run_dir_of_checkpoint(w.path) / "samples" /
                                            fmt::format("{}_{}", w.path.filename().string(), to_string(w.kind));
  prepare_out_dir(out, c.overwrite);
  UNet2DModel model = model_with_weights(w.config.model, weights_map(w.weights),
                                         (w.path / (to_string(w.kind) + ".safetensors")).string(), device);
  log_info("sampling {} images: {} with {} steps (η = {}), seed {}, batch size {}{}", opts.num_samples, to_string(opts.sampler),
           opts.num_inference_steps, opts.eta, opts.seed, opts.batch_size,
           !w.config.model.num_class_embeds ? std::string()
           : opts.class_labels.empty()
               ? fmt::format(", classes cycling 0..{}, guidance {}", *w.config.model.num_class_embeds - 1, opts.guidance_scale)
               : fmt::format(", class {}, guidance {}", opts.class_labels[0], opts.guidance_scale));
  const auto images = to_uint8(generate(model, SchedulerConfig::from(w.config.diffusion), opts, device));  // (N, C, H, W)
  save_sample_folder(out, images);
  log_info("wrote {} samples (000000.png ...) and grid.png to {}", images.size(0), out.string());
  return kExitOk;
}

}  // namespace

void set_sample_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("sample", "Generate images from a checkpoint: one PNG per sample and grid.png");
  static SampleCommand c;
  add_checkpoint_options(cmd, c.checkpoint);
  add_sample_options(cmd, c.sample, "Images to generate (default: the checkpoint's sampling.num_samples)");
  cmd->add_option("-o,--out", c.out, "Output folder (default: <run>/samples/<checkpoint>_<weights>/); must be empty or new")
      ->type_name("DIR")
      ->group("Output");
  cmd->add_flag("--overwrite", c.overwrite, "Allow a non-empty --out: its NNNNNN.png and grid.png are replaced")->group("Output");
  cmd->callback([&exit_code] { exit_code = run_sample(c); });
}

}  // namespace difftrain::cli

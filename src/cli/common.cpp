// What the subcommands share: configuration, checkpoint, sampling and device options, and the
// one device-selection path (common.h).
#include "cli/common.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "difftrain/distributed.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/log.h"
#include "difftrain/sampling.h"
#include "difftrain/train_state.h"

namespace difftrain::cli {

namespace fs = std::filesystem;

void add_config_options(CLI::App* cmd, ConfigOptions& opts) {
  cmd->add_option("-c,--config", opts.config_path, "JSON config file (docs/CONFIG.md); without it the built-in defaults")
      ->type_name("FILE")
      ->group("Configuration");
  cmd->add_option("--set", opts.overrides,
                  "Override one key, typed by its field: --set train.batch_size=32 (repeatable; applied after the file)")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false)
      ->group("Configuration");
}

Config load(const ConfigOptions& opts, std::vector<std::string>* notes) {
  return load_config(opts.config_path, opts.overrides, notes);
}

void add_checkpoint_options(CLI::App* cmd, CheckpointOptions& opts) {
  const Config defaults;
  opts.run = (fs::path(defaults.run.output_dir) / defaults.run.name).string();
  opts.checkpoint_option =
      cmd->add_option(
             "--checkpoint", opts.checkpoint,
             "'latest' (the newest good checkpoint of --run), a checkpoint directory (<run>/checkpoints/step_XXXXXXXX) or "
             "a run directory (its newest good checkpoint)")
          ->type_name("latest|PATH")
          ->capture_default_str()
          ->group("Checkpoint");
  opts.run_option = cmd->add_option("--run", opts.run, "Run directory that --checkpoint latest looks in")
                        ->type_name("DIR")
                        ->capture_default_str()
                        ->group("Checkpoint");
  opts.weights_option = add_enum_option(cmd, "--weights", opts.weights,
                                        "The EMA weights or the raw model weights (without --weights, a run that kept no "
                                        "EMA uses its model weights)")
                            ->type_name("ema|model")
                            ->default_str(to_string(opts.weights))
                            ->group("Checkpoint");
}

bool CheckpointOptions::checkpoint_given() const {
  return (checkpoint_option && checkpoint_option->count() > 0) || (run_option && run_option->count() > 0);
}

CheckpointWeights open_checkpoint(const CheckpointOptions& opts) {
  const fs::path path = resolve_checkpoint(opts.checkpoint, opts.run);
  WeightsKind kind = opts.weights;
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

void add_sampling_flags(CLI::App* cmd, SamplingFlags& opts, const std::string& num_samples_help) {
  const std::string from = " (default: the checkpoint's sampling.";
  auto add = [&](CLI::Option* o) {
    opts.given.push_back(o);
    return o;
  };
  add(cmd->add_option("-n,--num-samples", opts.num_samples, num_samples_help))
      ->type_name("N")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
  add(add_enum_option(cmd, "--sampler", opts.sampler,
                      "ddpm (Ho et al. 2020), ddim (Song et al. 2021), dpm_solver_multistep (DPM-Solver++, Lu et al. 2022), "
                      "unipc_multistep (UniPC, Zhao et al. 2023) or euler_ancestral (Karras et al. 2022), as diffusers' "
                      "schedulers compute them, for DDPM models; heun (Karras et al. 2022, Algorithm 1/2) or euler "
                      "(diffusers' EDMEulerScheduler) for EDM models" +
                          from + "sampler)"))
      ->type_name("NAME")
      ->group("Sampling");
  add(cmd->add_option("--steps", opts.steps, "Denoising steps" + from + "num_inference_steps)"))
      ->type_name("S")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
  add(cmd->add_option("--eta", opts.eta, "DDIM η: 0 deterministic, 1 DDPM-like variance" + from + "eta)"))
      ->type_name("E")
      ->check(CLI::Range(0.0, 1.0))
      ->group("Sampling");
  add(cmd->add_option("--s-churn", opts.s_churn,
                      "heun / euler (EDM): S_churn of Karras et al. Algorithm 2; 0 deterministic" + from + "s_churn)"))
      ->type_name("S")
      ->check(CLI::NonNegativeNumber)
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
  add(cmd->add_option("--seed", opts.seed,
                      "Seed of the sampling noise; the result is fixed for a seed, batch size and device" + from + "seed)"))
      ->type_name("S")
      ->check(CLI::NonNegativeNumber)
      ->group("Sampling");
  add(cmd->add_option("--batch-size", opts.batch_size, "Images denoised at once" + from + "batch_size)"))
      ->type_name("B")
      ->check(CLI::PositiveNumber)
      ->group("Sampling");
}

bool given(const SamplingFlags& opts, const std::string& name) {
  for (const auto* o : opts.given)
    if (o->check_lname(name.substr(2)) && o->count() > 0) return true;
  return false;
}

SamplingOptions sampling_options(const SamplingFlags& opts, const Config& cfg, int64_t default_num_samples) {
  SamplingOptions s = SamplingOptions::from(cfg.sampling);
  s.num_samples = given(opts, "--num-samples") ? opts.num_samples : default_num_samples;
  if (given(opts, "--sampler")) s.sampler = opts.sampler;
  const bool edm = cfg.diffusion.formulation == Formulation::edm;
  if (is_edm_sampler(s.sampler) != edm)
    throw UsageError(fmt::format("--sampler {}: this checkpoint's model is {} (diffusion.formulation = {}); use {}",
                                 to_string(s.sampler), edm ? "EDM" : "DDPM", to_string(cfg.diffusion.formulation),
                                 edm ? "heun or euler" : "ddpm, ddim, dpm_solver_multistep, unipc_multistep or euler_ancestral"));
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
  if (given(opts, "--s-churn")) s.edm.s_churn = opts.s_churn;
  if (!edm && s.num_inference_steps > cfg.diffusion.num_train_timesteps)
    throw UsageError(fmt::format("--steps {}: at most diffusion.num_train_timesteps = {}", s.num_inference_steps,
                                 cfg.diffusion.num_train_timesteps));
  const auto& classes = cfg.model.num_class_embeds;
  if (!classes) {
    if (given(opts, "--class-label"))
      throw UsageError(
          fmt::format("--class-label {}: this checkpoint's model is unconditional (model.num_class_embeds is "
                      "null), so it takes no class labels",
                      opts.class_label));
    if (given(opts, "--guidance-scale") && opts.guidance_scale != 1.0)
      throw UsageError(
          fmt::format("--guidance-scale {}: classifier-free guidance needs a class-conditional model; this "
                      "checkpoint's model is unconditional",
                      opts.guidance_scale));
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
      throw UsageError(fmt::format("--class-label {}: the model has classes 0..{}; give one of them or 'all'", opts.class_label,
                                   *classes - 1));
    s.class_labels = {k};
  }
  return s;
}

void add_device_options(CLI::App* cmd, DeviceOptions& opts) {
  cmd->add_option("--device", opts.device, "auto | cpu | cuda | cuda:N")
      ->type_name("SPEC")
      ->check(device_spelling())
      ->capture_default_str()
      ->group("Device");
  cmd->add_option("--threads", opts.threads, "CPU threads for LibTorch; 0 = all cores")
      ->type_name("N")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str()
      ->group("Device");
}

CLI::Validator device_spelling() {
  return CLI::Validator(
      [](std::string& spec) {
        return parse_device_spec(spec)
                   ? std::string()
                   : fmt::format("unknown device {}; allowed: {}", nlohmann::json(spec).dump(), kDeviceGrammar);
      },
      /*validator_desc=*/"", "DEVICE");
}

DeviceChoice select_device(const std::string& spec, const EnvReport& env, const World& world) {
  DeviceChoice choice = resolve_device(spec, env.cuda);  // UsageError when CUDA is asked for and unusable
  if (!choice.device.is_cuda() || !world.distributed()) return choice;
  // One GPU per process: this rank's, by its local rank (or the one GPU it sees).
  const std::optional<int> requested = parse_device_spec(spec)->index;             // N of cuda:N; resolve_device parsed it
  const int visible = env.cuda.gpus.empty() ? 0 : env.cuda.gpus.back().index + 1;  // a GPU that failed its query still counts
  const int index = local_cuda_device(world.local_rank, world.local_world_size, visible, requested, world.launcher);
  choice.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  choice.note =
      fmt::format("local rank {} of {} on this node, {} GPU(s) visible", world.local_rank, world.local_world_size, visible);
  for (const auto& g : env.cuda.gpus)
    if (g.index == index) choice.note += ": " + g.name;
  return choice;
}

void log_device(const DeviceChoice& choice, const std::string& spec) {
  if (choice.device.is_cpu() && spec == "auto") log_warn("{}", choice.note);
  else log_info("device: {} ({})", choice.device.str(), choice.note);
}

c10::Device pick_device(const DeviceOptions& opts) {
  configure_threads(opts.threads);
  const DeviceChoice choice = select_device(opts.device, collect_env(), World{});  // a single process
  log_device(choice, opts.device);
  return choice.device;
}

}  // namespace difftrain::cli

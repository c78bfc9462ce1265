// `difftrain train` (also `difftrain --config X`): validate, pick the device, prepare the run
// directory, then train.
#include <cstdlib>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include "cli/commands.h"
#include "difftrain/data.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "difftrain/log.h"
#include "difftrain/run.h"
#include "difftrain/signals.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"

namespace difftrain::cli {

namespace {

struct TrainOptions {
  ConfigOptions config;
  std::string resume;   // shortcut for --set checkpoint.resume=...
  std::string device;   // shortcut for --set run.device=...
  bool dry_run = false;
};

int run_train(const TrainOptions& opts) {
  ConfigOptions co = opts.config;
  if (!opts.device.empty()) co.overrides.push_back("run.device=" + opts.device);
  if (!opts.resume.empty()) co.overrides.push_back("checkpoint.resume=" + opts.resume);
  const Config cfg = load(co);

  const int rank = rank_from_env();
  setup_logging(cfg.logging.level, rank);
  const int threads = configure_threads(cfg.run.num_threads);
  const EnvReport env = collect_env();
  const DeviceChoice device = resolve_device(cfg.run.device, env.cuda);  // never a silent CPU fallback

  const auto run_dir = prepare_run_dir(cfg);
  if (rank == 0) add_log_file(run_dir / "train.log");

  log_info("difftrain {} | run directory {}", env.difftrain_version, run_dir.string());
  log_info("resolved config (also in {}):\n{}", (run_dir / "config.json").string(), config_to_string(cfg));
  log_info("environment:\n{}", format_env(env));
  const char* world = std::getenv("WORLD_SIZE");
  log_info("world: rank {} of {}", rank, world ? world : "1");
  if (device.device.is_cpu() && cfg.run.device == "auto") log_warn("{}", device.note);
  else log_info("device: {} ({})", device.device.str(), device.note);
  log_info("CPU threads: {}", threads);

  // The data, read and checked before anything trains: bad files stop the run here.
  const auto dataset = open_dataset(cfg.data);
  log_info("data: {}", dataset->describe());
  if (cfg.model.num_class_embeds && dataset->num_classes() > *cfg.model.num_class_embeds)
    throw UsageError(fmt::format("model.num_class_embeds = {} but the dataset has {} classes", *cfg.model.num_class_embeds,
                                 dataset->num_classes()));
  if (cfg.model.num_class_embeds && dataset->num_classes() == 0)
    throw UsageError(fmt::format("model.num_class_embeds is set but {} has no labels", dataset->describe()));
  const int64_t effective_batch =
      static_cast<int64_t>(cfg.train.batch_size) * cfg.train.gradient_accumulation_steps;
  if (opts.dry_run) {
    log_info("--dry-run: {} steps of a {}-level UNet, effective batch {} per rank, on {}: configuration, device, data and run "
             "directory are ready; stopping before training", cfg.train.max_steps, cfg.model.block_out_channels.size(),
             effective_batch, device.device.str());
    return kExitOk;
  }
  install_stop_handlers();
  TrainerOptions to;
  to.run_dir = run_dir;
  to.device = device.device;
  Trainer trainer(cfg, dataset, to);
  log_info("model: UNet2DModel, {} parameters", count_parameters(*trainer.model()));
  return trainer.train();
}

}  // namespace

void set_train_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("train", "Train a diffusion model (the default: `difftrain --config X` means `difftrain train --config X`)");
  static TrainOptions opts;
  add_config_options(cmd, opts.config);
  cmd->add_option("--resume", opts.resume, "Resume: 'latest' (newest good checkpoint of the run) or a checkpoint path; "
                                           "same as --set checkpoint.resume=...")
      ->type_name("latest|PATH")
      ->group("Run");
  cmd->add_option("--device", opts.device, "auto | cpu | cuda | cuda:N; same as --set run.device=... (default from the config: " +
                                               Config{}.run.device + ")")
      ->type_name("DEVICE")
      ->group("Run");
  cmd->add_flag("--dry-run", opts.dry_run, "Validate, check the device, read the data and prepare the run directory, then stop")->group("Run");
  cmd->callback([&exit_code] { exit_code = run_train(opts); });
}

}  // namespace difftrain::cli

// `difftrain train` (also `difftrain --config X`): validate, pick the device, prepare the run
// directory, then train.
#include <cstdlib>
#include <memory>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/data.h"
#include "difftrain/distributed.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/log.h"
#include "difftrain/run.h"
#include "difftrain/signals.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_memory.h"
#endif

namespace difftrain::cli {

namespace {

struct TrainOptions {
  ConfigOptions config;
  std::string resume;   // shortcut for --set checkpoint.resume=...
  std::string device;   // shortcut for --set run.device=...
  std::string init_from;  // a diffusers UNet2DModel folder (difftrain export) to start from
  bool dry_run = false;
};

int run_train(const TrainOptions& opts) {
  ConfigOptions co = opts.config;
  if (!opts.device.empty()) co.overrides.push_back("run.device=" + opts.device);
  if (!opts.resume.empty()) co.overrides.push_back("checkpoint.resume=" + opts.resume);
  std::vector<std::string> notes;
  const Config cfg = load(co, &notes);

  const World world = world_from_environment();
  const int rank = static_cast<int>(world.rank);
  setup_logging(cfg.logging.level, rank);
  const int threads = configure_threads(cfg.run.num_threads);
  const EnvReport env = collect_env();
  const DeviceChoice device = select_device(cfg.run.device, env, world);  // one GPU per rank in a distributed run
#ifdef DIFFTRAIN_WITH_CUDA
  if (device.device.is_cuda()) cuda::set_device(device.device.index());  // before any CUDA work and NCCL
#endif
  std::unique_ptr<ProcessGroup> process_group;
  if (world.distributed())
    process_group = std::make_unique<ProcessGroup>(world, cfg.distributed.backend, device.device,
                                                   std::chrono::seconds(cfg.distributed.timeout_s));

  // --init-from: read and check the folder before the run directory is touched (also in a dry run).
  DiffusersUNet init;
  if (!opts.init_from.empty()) {
    init = import_diffusers(opts.init_from);
    if (const auto diffs = architecture_differences(init.model, cfg.model); !diffs.empty())
      throw UsageError(fmt::format("--init-from {}: its UNet2DModel differs from the config's model section:\n  {}",
                                   opts.init_from, fmt::join(diffs, "\n  ")));
  }
  // Rank 0 creates (or checks) the run directory; the others learn whether that worked.
  std::filesystem::path run_dir = std::filesystem::path(cfg.run.output_dir) / cfg.run.name;
  std::string problem;
  if (rank == 0) {
    try {
      run_dir = prepare_run_dir(cfg);
    } catch (const std::exception& e) {
      problem = e.what();
      if (process_group) process_group->share_from_rank0("run_dir", problem);
      throw;
    }
  }
  if (process_group && !(problem = process_group->share_from_rank0("run_dir", "")).empty())
    throw UsageError("rank 0 could not prepare the run directory: " + problem);
  if (rank == 0) add_log_file(run_dir / "train.log");

  log_info("difftrain {} | run directory {}", env.difftrain_version, run_dir.string());
  log_info("resolved config (also in {}):\n{}", (run_dir / "config.json").string(), config_to_string(cfg));
  log_info("environment:\n{}", format_env(env));
  for (const auto& n : notes) log_warn("{}", n);
  if (world.distributed())
    log_info("world: {} ranks ({} per node, launcher {}), store {}:{}, backend {}", world.world_size, world.local_world_size,
             world.launcher, world.master_addr, world.master_port, process_group->backend_name());
  else log_info("world: a single process");
  log_device(device, cfg.run.device);
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
      static_cast<int64_t>(cfg.train.batch_size) * cfg.train.gradient_accumulation_steps * world.world_size;
  if (opts.dry_run) {
    log_info("--dry-run: {} steps of a {}-level UNet, effective batch {} (batch x accumulation x ranks), on {}: configuration, device, data and run "
             "directory are ready; stopping before training", cfg.train.max_steps, cfg.model.block_out_channels.size(),
             effective_batch, device.device.str());
    return kExitOk;
  }
  install_stop_handlers();
  TrainerOptions to;
  to.run_dir = run_dir;
  to.device = device.device;
  to.process_group = process_group.get();
  if (!opts.init_from.empty()) {
    to.init_weights = std::move(init.weights);
    to.init_source = (std::filesystem::path(opts.init_from) / kDiffusersWeightsFile).string();
  }
  Trainer trainer(cfg, dataset, to);
  log_info("model: UNet2DModel, {} parameters", trainer.num_parameters());
  return trainer.train();
}

}  // namespace

void set_train_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("train", "Train a diffusion model (the default: `difftrain --config X` means `difftrain train --config X`)");
  auto opts = std::make_shared<TrainOptions>();  // owned by the callback, so by the App
  add_config_options(cmd, opts->config);
  cmd->add_option("--resume", opts->resume,
                  "Resume: 'latest' (newest good checkpoint of the run) or a checkpoint path; "
                  "same as --set checkpoint.resume=...")
      ->type_name("latest|PATH")
      ->group("Run");
  cmd->add_option(
         "--device", opts->device,
         "auto | cpu | cuda | cuda:N; same as --set run.device=... (default from the config: " + Config{}.run.device + ")")
      ->type_name("DEVICE")
      ->check(device_spelling())
      ->group("Run");
  cmd->add_option("--init-from", opts->init_from,
                  "Start from the weights of a diffusers UNet2DModel folder (what `difftrain export` writes); its architecture "
                  "must equal model.* (a resume takes precedence)")
      ->type_name("DIR")
      ->group("Run");
  cmd->add_flag("--dry-run", opts->dry_run, "Validate, check the device, read the data and prepare the run directory, then stop")
      ->group("Run");
  cmd->callback([opts, &exit_code] { exit_code = run_train(*opts); });
}

}  // namespace difftrain::cli

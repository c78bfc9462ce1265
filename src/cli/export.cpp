// `difftrain export`: a checkpoint's weights as a diffusers folder (UNet2DModel + DDPMScheduler +
// DDPMPipeline model_index.json) that diffusers' from_pretrained loads and `train --init-from` reads.
#include <memory>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/errors.h"
#include "difftrain/export.h"
#include "difftrain/log.h"
#include "difftrain/train_state.h"
#include "difftrain/version.h"

namespace difftrain::cli {

namespace {

struct ExportCommand {
  CheckpointOptions checkpoint;
  std::string format = "safetensors";
  ExportDtype dtype = ExportDtype::f32;
  std::string out;
};

int run_export(const ExportCommand& c) {
  const CheckpointWeights w = open_checkpoint(c.checkpoint);
  ExportOptions opts;
  opts.dtype = c.dtype;
  // Provenance without paths or times, so the same checkpoint always gives the same bytes.
  opts.metadata = {{"difftrain_version", kVersion}, {"difftrain_step", std::to_string(w.step)},
                   {"difftrain_weights", to_string(w.kind)}};
  export_diffusers(c.out, w.config.model, w.config.diffusion, w.weights, opts);
  const bool edm = w.config.diffusion.formulation == Formulation::edm;
  log_info("exported step {} ({} weights, {}) to {}: {}, config.json, scheduler_config.json ({}){}", w.step, to_string(w.kind),
           c.dtype == ExportDtype::bf16 ? "BF16" : "F32", c.out, kDiffusersWeightsFile,
           edm ? "EDMEulerScheduler" : "DDPMScheduler", edm ? "" : ", model_index.json");
  return kExitOk;
}

}  // namespace

void set_export_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("export",
                                  "Export a checkpoint as a diffusers folder (UNet2DModel, DDPMScheduler, "
                                  "DDPMPipeline; EDM: UNet2DModel, EDMEulerScheduler) in safetensors");
  auto c = std::make_shared<ExportCommand>();  // owned by the callback, so by the App
  add_checkpoint_options(cmd, c->checkpoint);
  cmd->add_option("--format", c->format, "Weights format (diffusion_pytorch_model.safetensors)")
      ->check(CLI::IsMember({"safetensors"}))
      ->capture_default_str()
      ->group("Output");
  add_enum_option(cmd, "--dtype", c->dtype, "Stored precision of the weights: f32 (exact) or bf16 (half the size)")
      ->type_name("f32|bf16")
      ->default_str(to_string(c->dtype))
      ->group("Output");
  cmd->add_option("-o,--out", c->out, "Output folder (created; our four files in it are replaced)")
      ->type_name("DIR")
      ->required()
      ->group("Output");
  cmd->callback([c, &exit_code] { exit_code = run_export(*c); });
}

}  // namespace difftrain::cli

// `difftrain sample`: generation from a checkpoint. Listed in the help now; it needs the model,
// sampler and checkpoint code, which arrive with their own issues.
#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "difftrain/errors.h"

namespace difftrain::cli {

void set_sample_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("sample", "Generate images from a checkpoint (not yet available in this version)");
  cmd->callback([&exit_code] {
    exit_code = kExitUsage;
    throw UsageError("`difftrain sample` is not available yet in this version: it needs the model, sampler and checkpoint "
                     "support that later releases add");
  });
}

}  // namespace difftrain::cli

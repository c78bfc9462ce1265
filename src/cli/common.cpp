#include <CLI/CLI.hpp>

#include "cli/commands.h"

namespace difftrain::cli {

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

}  // namespace difftrain::cli

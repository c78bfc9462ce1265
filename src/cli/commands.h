// One file per subcommand: set_<name>_command(app, ...) registers it, with options bound straight
// into its option struct; its callback runs the command and stores the exit code.
#pragma once

#include <string>
#include <vector>

#include "difftrain/config.h"

namespace CLI {
class App;
}

namespace difftrain::cli {

// --config and --set, shared by the commands that read a configuration.
struct ConfigOptions {
  std::string config_path;                 // empty = built-in defaults
  std::vector<std::string> overrides;      // --set key.path=value, in order
};
void add_config_options(CLI::App* cmd, ConfigOptions& opts);
Config load(const ConfigOptions& opts);

void set_train_command(CLI::App* app, int& exit_code);
void set_sample_command(CLI::App* app, int& exit_code);
void set_env_command(CLI::App* app, int& exit_code);
void set_config_command(CLI::App* app, int& exit_code);

}  // namespace difftrain::cli

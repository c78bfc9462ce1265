// One file per subcommand: set_<name>_command(app, exit_code) registers it, with options bound
// straight into an option struct that the subcommand's callback owns (so the App owns it); the
// callback runs the command and stores the exit code. What they share is in common.h.
#pragma once

namespace CLI {
class App;
}

namespace difftrain::cli {

void set_train_command(CLI::App* app, int& exit_code);
void set_sample_command(CLI::App* app, int& exit_code);
void set_eval_command(CLI::App* app, int& exit_code);
void set_export_command(CLI::App* app, int& exit_code);
void set_env_command(CLI::App* app, int& exit_code);
void set_config_command(CLI::App* app, int& exit_code);
void set_data_command(CLI::App* app, int& exit_code);

}  // namespace difftrain::cli

// difftrain: the CLI. Every error is caught here, once, and mapped to an exit code (errors.h).
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include "cli/commands.h"
#include "difftrain/errors.h"
#include "difftrain/log.h"
#include "difftrain/version.h"

namespace {

// `difftrain --config X` is `difftrain train --config X`: insert the default subcommand when the
// first argument is an option other than the global ones.
std::vector<char*> with_default_subcommand(int argc, char** argv) {
  static char train[] = "train";
  std::vector<char*> args(argv, argv + argc);
  if (argc > 1 && argv[1][0] == '-' && std::strcmp(argv[1], "-h") != 0 && std::strcmp(argv[1], "--help") != 0 &&
      std::strcmp(argv[1], "--version") != 0)
    args.insert(args.begin() + 1, train);
  return args;
}

int run(int argc, char** argv) {
  CLI::App app{"difftrain: train diffusion models (DDPM) with LibTorch on CPUs and CUDA GPUs", "difftrain"};
  app.set_version_flag("--version", std::string("difftrain ") + difftrain::kVersion + " (LibTorch " TORCH_VERSION ")");
  app.require_subcommand(1);
  app.footer("Run `difftrain <command> --help` for a command's options. Exit codes: 0 ok, 1 usage or config error, "
             "2 runtime error, 75 stopped by a signal after saving a checkpoint.");
  int exit_code = difftrain::kExitOk;
  difftrain::cli::set_train_command(&app, exit_code);
  difftrain::cli::set_sample_command(&app, exit_code);
  difftrain::cli::set_eval_command(&app, exit_code);
  difftrain::cli::set_export_command(&app, exit_code);
  difftrain::cli::set_env_command(&app, exit_code);
  difftrain::cli::set_config_command(&app, exit_code);
  difftrain::cli::set_data_command(&app, exit_code);

  if (argc == 1) {
    std::fputs(app.help().c_str(), stderr);
    return difftrain::kExitUsage;
  }
  std::vector<char*> args = with_default_subcommand(argc, argv);
  try {
    app.parse(static_cast<int>(args.size()), args.data());
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? difftrain::kExitOk : difftrain::kExitUsage;  // --help / --version exit 0
  }
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  difftrain::setup_logging(difftrain::LogLevel::info, difftrain::rank_from_env());
  try {
    return run(argc, argv);
  } catch (const difftrain::UsageError& e) {  // ConfigError too
    difftrain::log_error("{}", e.what());
    return difftrain::kExitUsage;
  } catch (const c10::Error& e) {
    difftrain::log_error("LibTorch: {}", e.what_without_backtrace());
    return difftrain::kExitRuntime;
  } catch (const std::exception& e) {
    difftrain::log_error("{}", e.what());
    return difftrain::kExitRuntime;
  } catch (...) {
    difftrain::log_error("unknown error");
    return difftrain::kExitRuntime;
  }
}

// `difftrain env [--json] [--device SPEC]`: what this machine offers, and whether a device is usable.
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "difftrain/env.h"

namespace difftrain::cli {

void set_env_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("env", "Report LibTorch, CUDA, cuDNN, NCCL, GPUs, CPU threads and distributed backends");
  static bool as_json = false;
  static std::string device;
  cmd->add_flag("--json", as_json, "Print the report as JSON");
  cmd->add_option("--device", device,
                  "Also check that this device (auto | cpu | cuda | cuda:N) is usable, as `train` would; exit 1 if not")
      ->type_name("SPEC");
  cmd->callback([&exit_code] {
    const EnvReport env = collect_env();
    if (as_json) std::cout << env_to_json(env).dump(2) << "\n";
    else std::cout << format_env(env);
    if (!device.empty()) {
      const DeviceChoice choice = resolve_device(device, env.cuda);  // throws UsageError when not usable
      if (!as_json) std::cout << "Device:               " << choice.device.str() << " (" << choice.note << ")\n";
    }
    exit_code = 0;
  });
}

}  // namespace difftrain::cli

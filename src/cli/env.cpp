// `difftrain env [--json] [--device SPEC]`: what this machine offers, and whether a device is usable.
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "difftrain/env.h"

namespace difftrain::cli {

namespace {

struct EnvOptions {
  bool as_json = false;
  std::string device;  // empty: report only
};

int run_env(const EnvOptions& opts) {
  const EnvReport env = collect_env();
  if (opts.as_json) std::cout << env_to_json(env).dump(2) << "\n";
  else std::cout << format_env(env);
  if (!opts.device.empty()) {
    const DeviceChoice choice = resolve_device(opts.device, env.cuda);  // throws UsageError when not usable
    if (!opts.as_json) std::cout << "Device:               " << choice.device.str() << " (" << choice.note << ")\n";
  }
  return 0;
}

}  // namespace

void set_env_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("env", "Report LibTorch, CUDA, cuDNN, NCCL, GPUs, CPU threads and distributed backends");
  auto opts = std::make_shared<EnvOptions>();  // owned by the callback, so by the App
  cmd->add_flag("--json", opts->as_json, "Print the report as JSON");
  cmd->add_option("--device", opts->device,
                  "Also check that this device (auto | cpu | cuda | cuda:N) is usable, as `train` would; exit 1 if not")
      ->type_name("SPEC")
      ->check(device_spelling());
  cmd->callback([opts, &exit_code] { exit_code = run_env(*opts); });
}

}  // namespace difftrain::cli

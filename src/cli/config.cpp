// `difftrain config print|validate|docs`: the resolved configuration without running anything.
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/common.h"

namespace difftrain::cli {

void set_config_command(CLI::App* app, int& exit_code) {
  auto* cmd = app->add_subcommand("config", "Print, check or document configurations");
  cmd->require_subcommand(1);
  auto opts = std::make_shared<ConfigOptions>();  // owned by the callbacks, so by the App

  auto* print = cmd->add_subcommand("print", "Print the resolved configuration (defaults < --config < --set) as JSON");
  add_config_options(print, *opts);
  print->callback([opts, &exit_code] {
    std::cout << config_to_string(load(*opts));
    exit_code = 0;
  });

  auto* check = cmd->add_subcommand("validate", "Check a configuration; exit 0 when valid, 1 with every problem listed");
  add_config_options(check, *opts);
  check->callback([opts, &exit_code] {
    std::vector<std::string> notes;
    load(*opts, &notes);
    for (const auto& n : notes) std::cerr << "warning: " << n << "\n";
    std::cout << "ok: " << (opts->config_path.empty() ? "defaults" : opts->config_path) << " is a valid configuration\n";
    exit_code = 0;
  });

  auto* docs = cmd->add_subcommand("docs", "Print the configuration reference (docs/CONFIG.md) in Markdown");
  docs->callback([&exit_code] {
    std::cout << config_reference_markdown();
    exit_code = 0;
  });
}

}  // namespace difftrain::cli

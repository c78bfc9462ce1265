#include "difftrain/run.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "difftrain/checkpoint.h"
#include "difftrain/errors.h"
#include "difftrain/io.h"
#include "difftrain/log.h"

namespace difftrain {

namespace fs = std::filesystem;

std::string run_identity_changes(const Config& before_cfg, const Config& after_cfg) {
  const auto before = run_identity(before_cfg), after = run_identity(after_cfg);
  std::string out;
  for (auto s = after.begin(); s != after.end(); ++s)
    for (auto k = s.value().begin(); k != s.value().end(); ++k) {
      const auto old = before.contains(s.key()) ? before[s.key()].value(k.key(), nlohmann::ordered_json()) : nlohmann::ordered_json();
      if (old != k.value()) out += fmt::format("\n  {}.{}: {} -> {}", s.key(), k.key(), old.dump(), k.value().dump());
    }
  return out;
}

nlohmann::ordered_json run_identity(const Config& cfg) {
  auto j = config_to_json(cfg);
  j["run"].erase("device");
  j["run"].erase("num_threads");
  j["run"].erase("peak_tflops");
  j["train"].erase("max_steps");  // training longer is a resume, not a new run
  for (const char* lever : {"cuda_graph", "channels_last", "fused_groupnorm_silu", "cudnn_benchmark", "allow_tf32"})
    j["train"].erase(lever);  // how the step runs, not what it computes
  j["checkpoint"].erase("resume");
  j["distributed"].erase("timeout_s");
  j.erase("logging");
  return j;
}

fs::path prepare_run_dir(const Config& cfg) {
  const fs::path dir = fs::path(cfg.run.output_dir) / cfg.run.name;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw RuntimeError(fmt::format("cannot create run directory {}: {}", dir.string(), ec.message()));

  const fs::path config_file = dir / "config.json";
  if (fs::exists(config_file)) {
    Config existing;
    try {
      existing = load_config(config_file.string());
    } catch (const ConfigError& e) {
      throw UsageError(fmt::format("run directory {} holds a config.json this version cannot read ({}); move it away or choose "
                                   "another run.name", dir.string(), e.what()));
    }
    const std::string changes = run_identity_changes(existing, cfg);
    if (!changes.empty()) {
      throw UsageError(fmt::format("run directory {} already holds a run with a different config ({}); start a new run with "
                                   "--set run.name=<new name>, nothing was overwritten. Changed:{}",
                                   dir.string(), config_file.string(), changes));
    }
  }
  write_file_atomic(config_file, config_to_string(cfg));
  return dir;
}

std::optional<fs::path> choose_resume(const Config& cfg, const fs::path& run_dir, int64_t rank) {
  const auto& resume = cfg.checkpoint.resume;
  const fs::path dir = run_dir / "checkpoints";
  if (rank == 0)
    if (const int n = remove_interrupted_saves(dir); n > 0)
      log_warn("removed {} incomplete checkpoint save(s) in {} (a run stopped while saving)", n, dir.string());
  if (!resume.empty() && resume != "latest") return fs::path(resume);
  if (rank != 0) return std::nullopt;
  if (resume.empty()) {
    if (const auto existing = list_checkpoints(dir); !existing.empty())
      throw UsageError(
          fmt::format("{} already holds checkpoints (newest: {}); continue it with --resume latest, or start a "
                      "new run with --set run.name=<new name>. Nothing was changed.",
                      run_dir.string(), existing.front().second.filename().string()));
    return std::nullopt;
  }
  const auto latest = latest_checkpoint(dir);
  if (!latest) log_info("--resume latest: no checkpoint in {} yet; starting from step 0", dir.string());
  return latest;
}

}  // namespace difftrain

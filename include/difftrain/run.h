// The run directory, <output_dir>/<name>: everything a person needs after a run lives there.
// This file creates it and owns the resolved config.json in it.
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "difftrain/config.h"

namespace difftrain {

// Writes `content` to `path` atomically: a temporary file in the same directory, fsync, rename,
// fsync of the directory. A crash leaves either the old file or the new one, never a torn one.
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// The keys that define a run: all but where it runs (run.device, run.num_threads), how long
// (train.max_steps), how it resumes (checkpoint.resume), distributed.timeout_s and logging.
nlohmann::ordered_json run_identity(const Config& cfg);
// The run_identity() keys that differ, one "\n  key.path: old -> new" line each; empty when equal.
std::string run_identity_changes(const Config& before, const Config& after);

// Creates the run directory and writes config.json (the resolved config). An existing run
// directory is reused only when its config.json has the same run_identity(); otherwise this is a
// UsageError naming the changed keys, and nothing is overwritten.
std::filesystem::path prepare_run_dir(const Config& cfg);

}  // namespace difftrain

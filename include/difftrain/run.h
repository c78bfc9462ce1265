// The run directory, <output_dir>/<name>: everything a person needs after a run lives there.
// This file creates it and owns the resolved config.json in it.
#pragma once

#include <filesystem>
#include <string>

#include "difftrain/config.h"

namespace difftrain {

// Writes `content` to `path` atomically: a temporary file in the same directory, fsync, rename,
// fsync of the directory. A crash leaves either the old file or the new one, never a torn one.
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// Creates the run directory and writes config.json (the resolved config). An existing run
// directory is reused only when its config.json matches, or when resuming (checkpoint.resume
// set): a different config in the same directory is a UsageError, so no run data is overwritten.
std::filesystem::path prepare_run_dir(const Config& cfg);

}  // namespace difftrain

// The run directory, <output_dir>/<name>: everything a person needs after a run lives there.
// This file is the run-directory policy: it creates the directory, owns the resolved config.json
// in it, and decides which checkpoint a run starts from.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "difftrain/config.h"

namespace difftrain {

// The keys that define a run: all but where it runs (run.device, run.num_threads), how long
// (train.max_steps), how it resumes (checkpoint.resume), distributed.timeout_s and logging.
nlohmann::ordered_json run_identity(const Config& cfg);
// The run_identity() keys that differ, one "\n  key.path: old -> new" line each; empty when equal.
std::string run_identity_changes(const Config& before, const Config& after);

// Creates the run directory and writes config.json (the resolved config). An existing run
// directory is reused only when its config.json has the same run_identity(); otherwise this is a
// UsageError naming the changed keys, and nothing is overwritten.
std::filesystem::path prepare_run_dir(const Config& cfg);

// The checkpoint a run starts from, by checkpoint.resume, after removing what interrupted saves
// left in run_dir/checkpoints:
//   ""        a fresh run: nullopt, or a UsageError when the run already holds checkpoints (a
//             fresh start would replace them step by step; nothing is changed);
//   "latest"  the newest good checkpoint (checkpoint.h latest_checkpoint), nullopt when none yet;
//   a path    that checkpoint.
// Only rank 0 looks at the directory; other ranks get nullopt for "latest" (rank 0's choice is
// shared with them) and the path otherwise.
std::optional<std::filesystem::path> choose_resume(const Config& cfg, const std::filesystem::path& run_dir, int64_t rank);

}  // namespace difftrain

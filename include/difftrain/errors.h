// Error kinds and the exit codes they map to (README "Exit codes"). Errors are thrown at the
// boundary with an actionable message and caught once, in main().
#pragma once

#include <stdexcept>
#include <string>

namespace difftrain {

enum ExitCode : int {
  kExitOk = 0,
  kExitUsage = 1,                   // bad command line, bad config, requested device not usable
  kExitRuntime = 2,                 // failure while running (I/O, data, numerics, peers)
  kExitStoppedAfterCheckpoint = 75, // stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: requeue me)
};

// The user asked for something that cannot be done as asked; exit code 1.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Something failed while running; exit code 2.
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace difftrain

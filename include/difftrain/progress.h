// The live progress line of a training run on a terminal, in the logging layer (log.h draws it):
//   [########                ] 1200/5000 | 8.31 it/s | ETA 7m37s | loss 0.0412 | 3120 img/s
// redrawn at most five times a second; log lines erase it, and the next tick draws it again.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace difftrain {

// "42s", "7m37s", "2h05m"; "?" for a negative or non-finite duration.
std::string duration_text(double seconds);

class ProgressLine {
 public:
  // `live`: draw at all (rank 0, logging.progress, stderr is a terminal). The clock starts here.
  ProgressLine(bool live, int64_t start_step, int64_t max_steps);

  void tick(int64_t step);                                                  // redraws when due, and always at max_steps
  void set_summary(std::string summary) { summary_ = std::move(summary); }  // loss and speed of the last log interval
  double elapsed() const;                                                   // seconds since construction
  double eta(int64_t step) const;                                           // seconds to max_steps at the pace since construction

 private:
  bool live_;
  int64_t start_step_, max_steps_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  std::string summary_;
};

}  // namespace difftrain

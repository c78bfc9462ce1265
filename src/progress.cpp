#include "difftrain/progress.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "difftrain/log.h"

namespace difftrain {

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

ProgressLine::ProgressLine(bool live, int64_t start_step, int64_t max_steps)
    : live_(live), start_step_(start_step), max_steps_(max_steps), start_(std::chrono::steady_clock::now()) {}

double ProgressLine::elapsed() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

double ProgressLine::eta(int64_t step) const {
  const double done = static_cast<double>(step - start_step_);
  return done > 0 ? elapsed() / done * static_cast<double>(max_steps_ - step) : -1.0;
}

void ProgressLine::tick(int64_t step) {
  if (!live_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(200) && step != max_steps_) return;
  last_draw_ = now;
  constexpr int64_t kWidth = 24;
  const int64_t filled = std::clamp<int64_t>(kWidth * step / std::max<int64_t>(max_steps_, 1), 0, kWidth);
  const double it_per_s = static_cast<double>(step - start_step_) / std::max(elapsed(), 1e-9);
  progress_show(fmt::format("[{}{}] {}/{} | {:.2f} it/s | ETA {} | {}", std::string(static_cast<size_t>(filled), '#'),
                            std::string(static_cast<size_t>(kWidth - filled), ' '), step, max_steps_, it_per_s,
                            duration_text(eta(step)), summary_));
}

}  // namespace difftrain

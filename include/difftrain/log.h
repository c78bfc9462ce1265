// The one logging entry point. Messages are formatted here with {fmt} and written by spdlog
// (console, plus train.log in the run directory), set up once in main(). Rank 0 logs at the
// configured level, other ranks at warn, each line tagged with its rank.
//
// spdlog lives in its own translation unit (log.cpp): Debian's spdlog is built on fmt 9, while
// LibTorch ships fmt 12 headers on its include path, and one translation unit cannot hold both.
#pragma once

#include <filesystem>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "difftrain/enums.h"

namespace difftrain {

// This process's rank from the launcher's environment (torchrun RANK, Slurm SLURM_PROCID); 0 alone.
int rank_from_env();

void setup_logging(LogLevel level, int rank);
// Adds a file sink (train.log in the run directory).
void add_log_file(const std::filesystem::path& file);

bool log_enabled(LogLevel level);
void log_write(LogLevel level, std::string_view message);  // clears a live progress line first

// A live progress line on stderr (a terminal): progress_show redraws it in place, and every log
// line, or progress_clear, erases it first, so log lines never land in the middle of it.
// progress.h formats it.
void progress_show(std::string_view line);
void progress_clear();

template <class... A> void log_at(LogLevel level, fmt::format_string<A...> f, A&&... args) {
  if (log_enabled(level)) log_write(level, fmt::format(f, std::forward<A>(args)...));
}
template <class... A> void log_debug(fmt::format_string<A...> f, A&&... a) { log_at(LogLevel::debug, f, std::forward<A>(a)...); }
template <class... A> void log_info(fmt::format_string<A...> f, A&&... a) { log_at(LogLevel::info, f, std::forward<A>(a)...); }
template <class... A> void log_warn(fmt::format_string<A...> f, A&&... a) { log_at(LogLevel::warn, f, std::forward<A>(a)...); }
template <class... A> void log_error(fmt::format_string<A...> f, A&&... a) { log_at(LogLevel::error, f, std::forward<A>(a)...); }

}  // namespace difftrain

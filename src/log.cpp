#include "difftrain/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <spdlog/spdlog.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

namespace difftrain {

namespace {
spdlog::level::level_enum to_spdlog(LogLevel l) {
  switch (l) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
  }
  return spdlog::level::info;
}

std::string pattern(int rank) {
  return rank == 0 ? "[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v" : "[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(rank) + "] [%^%l%$] %v";
}
}  // namespace

int rank_from_env() {
  for (const char* var : {"RANK", "SLURM_PROCID"})
    if (const char* v = std::getenv(var); v && *v) return std::atoi(v);
  return 0;
}

void setup_logging(LogLevel level, int rank) {
  spdlog::drop("difftrain");  // called again once the config's level is known
  auto logger = spdlog::stderr_color_mt("difftrain");
  logger->set_pattern(pattern(rank));
  logger->set_level(rank == 0 ? to_spdlog(level) : spdlog::level::warn);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

void add_log_file(const std::filesystem::path& file) {
  auto logger = spdlog::default_logger();
  auto sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(file.string(), /*truncate=*/false);
  sink->set_pattern(pattern(rank_from_env()));
  logger->sinks().push_back(sink);
}

bool log_enabled(LogLevel level) { return spdlog::default_logger_raw()->should_log(to_spdlog(level)); }

void log_write(LogLevel level, std::string_view message) {
  progress_clear();  // the live line, if any, gives way; its next tick draws it again
  spdlog::default_logger_raw()->log(to_spdlog(level), "{}", message);
}

namespace {
std::atomic<bool> g_progress_shown{false};  // a live line is on the terminal (stderr)
}  // namespace

void progress_show(std::string_view line) {
  std::fputs("\r\033[K", stderr);  // carriage return, erase to the end of the line
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
  g_progress_shown = true;
}

void progress_clear() {
  if (!g_progress_shown.exchange(false)) return;
  std::fputs("\r\033[K", stderr);
  std::fflush(stderr);
}

}  // namespace difftrain

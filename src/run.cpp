#include "difftrain/run.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "difftrain/errors.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {
[[noreturn]] void io_error(const std::string& what, const fs::path& p) {
  throw RuntimeError(fmt::format("{} {}: {}", what, p.string(), std::strerror(errno)));
}

void fsync_path(const fs::path& p, int flags) {
  const int fd = ::open(p.c_str(), flags);
  if (fd < 0) io_error("cannot open", p);
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) io_error("cannot fsync", p);
}
}  // namespace

void write_file_atomic(const fs::path& path, const std::string& content) {
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  const fs::path tmp = dir / fmt::format(".{}.tmp.{}", path.filename().string(), ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) io_error("cannot write", tmp);
    out << content;
    out.flush();
    if (!out) io_error("cannot write", tmp);
  }
  fsync_path(tmp, O_RDONLY);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw RuntimeError(fmt::format("cannot rename {} to {}: {}", tmp.string(), path.string(), ec.message()));
  }
  fsync_path(dir, O_RDONLY | O_DIRECTORY);
}

fs::path prepare_run_dir(const Config& cfg) {
  const fs::path dir = fs::path(cfg.run.output_dir) / cfg.run.name;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw RuntimeError(fmt::format("cannot create run directory {}: {}", dir.string(), ec.message()));

  const fs::path config_file = dir / "config.json";
  const std::string resolved = config_to_string(cfg);
  if (fs::exists(config_file) && cfg.checkpoint.resume.empty()) {
    std::ifstream in(config_file, std::ios::binary);
    std::stringstream existing;
    existing << in.rdbuf();
    if (existing.str() != resolved)
      throw UsageError(fmt::format(
          "run directory {} already holds a run with a different config ({}). Resume it with --resume latest, "
          "or start a new run with --set run.name=<new name>; nothing was overwritten.",
          dir.string(), config_file.string()));
  }
  write_file_atomic(config_file, resolved);
  return dir;
}

}  // namespace difftrain

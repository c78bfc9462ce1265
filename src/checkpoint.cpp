#include "difftrain/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "difftrain/io.h"
#include "difftrain/log.h"
#include "difftrain/sha256.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {

constexpr const char* kTmpPrefix = ".tmp-";
constexpr const char* kOldPrefix = ".old-";

void write_text(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) throw CheckpointError(fmt::format("cannot write {}: {}", p.string(), std::strerror(errno)));
}

std::optional<int64_t> parse_step_name(const std::string& name) {
  if (name.size() <= 5 || name.rfind("step_", 0) != 0) return std::nullopt;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || step > (int64_t{1} << 56)) return std::nullopt;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

// Fault injection for the tests: DIFFTRAIN_FAULT=kill_in_save:<step> kills the process with
// SIGKILL half-way through writing that step's checkpoint.
void maybe_inject_fault(int64_t step) {
  const char* fault = std::getenv("DIFFTRAIN_FAULT");
  if (fault && std::string(fault) == fmt::format("kill_in_save:{}", step)) ::kill(::getpid(), SIGKILL);
}

void remove_all_quietly(const fs::path& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
}

}  // namespace

std::string checkpoint_dir_name(int64_t step) { return fmt::format("step_{:08d}", step); }

std::map<std::string, std::string> rng_state_devices(const Checkpoint& ckpt) {
  const auto rng = ckpt.tensors.find("rng");
  if (rng == ckpt.tensors.end()) return {};
  const auto meta = ckpt.metadata.find("rng");
  std::map<std::string, std::string> out;
  if (meta == ckpt.metadata.end()) {  // before the record: a "device" state only when the run was on CUDA
    bool on_cuda = false;
    for (const auto& [name, t] : rng->second) on_cuda |= name == "device";
    for (const auto& [name, t] : rng->second) out[name] = name == "cpu" || !on_cuda ? "cpu" : "cuda";
    return out;
  }
  for (const auto& [name, t] : rng->second) {
    const auto it = meta->second.find(name);
    if (it == meta->second.end())
      throw CheckpointError(fmt::format("rng.safetensors: generator state \"{}\" has no device type in the metadata", name));
    if (it->second != "cpu" && it->second != "cuda")
      throw CheckpointError(
          fmt::format("rng.safetensors: generator state \"{}\" is from device type \"{}\"; known: cpu, cuda", name, it->second));
    out[name] = it->second;
  }
  return out;
}

fs::path save_checkpoint(const fs::path& dir, const Checkpoint& ckpt) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw CheckpointError(fmt::format("cannot create {}: {}", dir.string(), ec.message()));
  const std::string name = checkpoint_dir_name(ckpt.step);
  const fs::path final_path = dir / name, tmp = dir / fmt::format("{}{}-{}", kTmpPrefix, name, ::getpid());
  remove_all_quietly(tmp);
  fs::create_directory(tmp, ec);
  if (ec) throw CheckpointError(fmt::format("cannot create {}: {}", tmp.string(), ec.message()));

  try {
    nlohmann::ordered_json manifest = {{"format", kCheckpointFormat}, {"version", kCheckpointFormatVersion}, {"step", ckpt.step}};
    nlohmann::ordered_json files = nlohmann::ordered_json::object();
    auto add = [&](const std::string& file, const std::string& bytes) {
      write_text(tmp / file, bytes);
      fsync_path(tmp / file, false);
      files[file] = {{"bytes", bytes.size()}, {"sha256", sha256_hex(bytes.data(), bytes.size())}};
    };
    for (const auto& [stem, tensors] : ckpt.tensors) {
      const auto meta = ckpt.metadata.find(stem);
      add(stem + ".safetensors",
          safetensors_bytes(tensors, meta == ckpt.metadata.end() ? std::map<std::string, std::string>{} : meta->second));
      maybe_inject_fault(ckpt.step);
    }
    auto state = nlohmann::ordered_json::parse(ckpt.state);
    state["format_version"] = kCheckpointFormatVersion;
    state["step"] = ckpt.step;
    add("state.json", state.dump(2) + "\n");
    add("config.json", ckpt.config);
    manifest["files"] = files;
    write_text(tmp / "manifest.json", manifest.dump(2) + "\n");  // last: its presence marks a complete save
    fsync_path(tmp / "manifest.json", false);
    fsync_path(tmp, true);

    fs::path old;
    if (fs::exists(final_path)) {  // e.g. a resume from an older checkpoint reaches this step again
      old = dir / fmt::format("{}{}-{}", kOldPrefix, name, ::getpid());
      fs::rename(final_path, old);
    }
    fs::rename(tmp, final_path);
    fsync_path(dir, true);
    if (!old.empty()) remove_all_quietly(old);
  } catch (const fs::filesystem_error& e) {
    remove_all_quietly(tmp);
    throw CheckpointError(fmt::format("cannot save checkpoint {}: {}", final_path.string(), e.what()));
  } catch (const CheckpointError&) {
    remove_all_quietly(tmp);
    throw;
  } catch (const RuntimeError& e) {  // io.h: a write, fsync or rename that failed (a full disk)
    remove_all_quietly(tmp);
    throw CheckpointError(fmt::format("cannot save checkpoint {}: {}", final_path.string(), e.what()));
  } catch (...) {
    remove_all_quietly(tmp);
    throw;
  }
  return final_path;
}

std::string verify_checkpoint(const fs::path& path) {
  const fs::path manifest_path = path / "manifest.json";
  if (!fs::is_regular_file(manifest_path)) return "no manifest.json (an incomplete save?)";
  try {
    for (const auto& file : parse_checkpoint_manifest(read_text(manifest_path))) {
      const fs::path f = path / file.name;
      std::error_code ec;
      const auto size = fs::file_size(f, ec);
      if (ec) return fmt::format("{} is missing", file.name);
      if (size != file.bytes) return fmt::format("{} has {} bytes, the manifest says {}", file.name, size, file.bytes);
      if (sha256_file(f) != file.sha256) return fmt::format("{} fails its SHA-256 check", file.name);
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

Checkpoint load_checkpoint(const fs::path& path) {
  if (!fs::is_directory(path)) throw CheckpointError(fmt::format("checkpoint {} is not a directory", path.string()));
  if (const auto problem = verify_checkpoint(path); !problem.empty())
    throw CheckpointError(fmt::format("checkpoint {} is not usable: {}", path.string(), problem));
  Checkpoint ckpt;
  try {
    const auto files = parse_checkpoint_manifest(read_text(path / "manifest.json"));
    ckpt.state = read_text(path / "state.json");
    ckpt.step = nlohmann::json::parse(ckpt.state).at("step").get<int64_t>();
    ckpt.config = read_text(path / "config.json");
    for (const auto& entry : files) {
      const std::string& file = entry.name;
      const std::string suffix = ".safetensors";
      if (file.size() > suffix.size() && file.compare(file.size() - suffix.size(), suffix.size(), suffix) == 0) {
        auto st = load_safetensors(path / file);
        const std::string stem = file.substr(0, file.size() - suffix.size());
        ckpt.tensors[stem] = std::move(st.tensors);
        if (!st.metadata.empty()) ckpt.metadata[stem] = std::move(st.metadata);
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("checkpoint {}: {}", path.string(), e.what()));
  } catch (const CheckpointError&) {
    throw;
  } catch (const RuntimeError& e) {
    throw CheckpointError(fmt::format("checkpoint {}: {}", path.string(), e.what()));
  }
  return ckpt;
}

std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (const auto step = parse_step_name(entry.path().filename().string()); step && entry.is_directory())
      out.emplace_back(*step, entry.path());
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

std::optional<fs::path> find_latest_checkpoint(const fs::path& dir, std::vector<std::string>* skipped) {
  for (const auto& [step, path] : list_checkpoints(dir)) {
    const auto problem = verify_checkpoint(path);
    if (problem.empty()) return path;
    if (skipped) skipped->push_back(fmt::format("{}: {}", path.string(), problem));
  }
  return std::nullopt;
}

std::optional<fs::path> latest_checkpoint(const fs::path& dir) {
  std::vector<std::string> skipped;
  auto found = find_latest_checkpoint(dir, &skipped);
  for (const auto& s : skipped) log_warn("skipping checkpoint {}", s);
  if (!found && !skipped.empty())
    throw CheckpointError(fmt::format("no usable checkpoint in {}: all {} are damaged or incomplete ({})", dir.string(),
                                      skipped.size(), fmt::join(skipped, "; ")));
  return found;
}

std::vector<fs::path> rotate_checkpoints(const fs::path& dir, int keep_last, int64_t keep_every) {
  std::vector<fs::path> deleted;
  int kept = 0;
  for (const auto& [step, path] : list_checkpoints(dir)) {
    if (kept < keep_last) {
      ++kept;
      continue;
    }
    if (keep_every > 0 && step % keep_every == 0) continue;
    // Renamed first, so a crash mid-delete never leaves a half-deleted step_* behind.
    const fs::path doomed = dir / fmt::format("{}{}-{}", kOldPrefix, path.filename().string(), ::getpid());
    std::error_code ec;
    fs::rename(path, doomed, ec);
    if (ec) continue;
    remove_all_quietly(doomed);
    deleted.push_back(path);
  }
  return deleted;
}

int remove_interrupted_saves(const fs::path& dir) {
  int n = 0;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return 0;
  std::vector<fs::path> leftovers;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const auto name = entry.path().filename().string();
    if (name.rfind(kTmpPrefix, 0) == 0 || name.rfind(kOldPrefix, 0) == 0) leftovers.push_back(entry.path());
  }
  for (const auto& p : leftovers) {
    const auto name = p.filename().string();
    if (name.rfind(kOldPrefix, 0) == 0) {
      // A save replaced step_X and stopped between its two renames: the old copy is the only one.
      const fs::path original = dir / name.substr(std::strlen(kOldPrefix), name.rfind('-') - std::strlen(kOldPrefix));
      if (!fs::exists(original) && verify_checkpoint(p).empty()) {
        fs::rename(p, original, ec);
        if (!ec) continue;
      }
    }
    remove_all_quietly(p), ++n;
  }
  return n;
}

}  // namespace difftrain

#include "difftrain/checkpoint_manifest.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "difftrain/errors.h"

namespace difftrain {

namespace {

bool plain_file_name(const std::string& name) {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

bool sha256_hex_digits(const std::string& s) {
  return s.size() == 64 &&
         std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

}  // namespace

std::vector<ManifestFile> parse_checkpoint_manifest(std::string_view text) {
  const auto manifest = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded()) throw RuntimeError("unreadable manifest.json: not JSON");
  if (!manifest.is_object() || !manifest.contains("format") || manifest["format"] != kCheckpointFormat)
    throw RuntimeError("manifest.json is not a difftrain checkpoint manifest");
  const auto& version = manifest.contains("version") ? manifest["version"] : nlohmann::json();
  if (!version.is_number_integer() || version.get<int64_t>() != kCheckpointFormatVersion)
    throw RuntimeError("checkpoint format version " + version.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                       "; this difftrain reads version " + std::to_string(kCheckpointFormatVersion));
  if (!manifest.contains("files") || !manifest["files"].is_object())
    throw RuntimeError("unreadable manifest.json: no \"files\" object");
  std::vector<ManifestFile> files;
  for (const auto& [name, info] : manifest["files"].items()) {
    const std::string where = "unreadable manifest.json: files." + name.substr(0, 80);
    if (!plain_file_name(name)) throw RuntimeError(where + ": not a plain file name in the checkpoint directory");
    if (!info.is_object() || !info.contains("bytes") || !info["bytes"].is_number_unsigned() || !info.contains("sha256") ||
        !info["sha256"].is_string() || !sha256_hex_digits(info["sha256"].get<std::string>()))
      throw RuntimeError(where + ": not {\"bytes\": integer >= 0, \"sha256\": 64 hex digits}");
    files.push_back({name, info["bytes"].get<uint64_t>(), info["sha256"].get<std::string>()});
  }
  return files;
}

}  // namespace difftrain

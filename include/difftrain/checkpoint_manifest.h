// A checkpoint's manifest.json (checkpoint.h), parsed and checked without LibTorch, so that
// scripts/fuzz.sh fuzzes exactly what verify_checkpoint and load_checkpoint run on it:
//   {"format": "difftrain-checkpoint", "version": 1, "step": S,
//    "files": {"model.safetensors": {"bytes": N, "sha256": "<64 hex digits>"}, ...}}
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace difftrain {

constexpr int kCheckpointFormatVersion = 1;
inline constexpr const char* kCheckpointFormat = "difftrain-checkpoint";

struct ManifestFile {
  std::string name;  // a plain file name inside the checkpoint directory
  uint64_t bytes = 0;
  std::string sha256;  // 64 lowercase hex digits
};

// A RuntimeError says what is wrong: not JSON, another format or version, or a "files" entry that
// is not {"bytes": integer >= 0, "sha256": hex} or whose name is not a plain file name (a name
// with "/", "." or "..", which would reach outside the checkpoint directory).
std::vector<ManifestFile> parse_checkpoint_manifest(std::string_view text);

}  // namespace difftrain

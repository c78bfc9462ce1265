// Checkpoints: <run>/checkpoints/step_XXXXXXXX/ holds everything a bit-exact resume needs:
//   model.safetensors      the weights, by diffusers UNet2DModel names
//   ema.safetensors        the EMA weights (when EMA is on)
//   optimizer.safetensors  AdamW moments and steps, loss-scaler state
//   rng.safetensors        generator states (the trainer's, CPU, the CUDA device), each with the
//                          device type it came from in the metadata (see rng_state_devices)
//   state.json             step, loader position, EMA step, format version
//   config.json            the resolved config
//   manifest.json          format, version, step, and size + SHA-256 of every file (written last)
// A save writes a hidden temporary directory, fsyncs it, and renames it into place, so a crash
// or kill -9 during a save never touches an existing checkpoint.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "difftrain/checkpoint_manifest.h"  // kCheckpointFormat, kCheckpointFormatVersion
#include "difftrain/errors.h"
#include "difftrain/safetensors.h"

namespace difftrain {

class CheckpointError : public RuntimeError {
 public:
  using RuntimeError::RuntimeError;
};

struct Checkpoint {
  int64_t step = 0;
  std::string state = "{}";  // state.json, a JSON object (train_state.cpp writes its keys; save adds step and version)
  std::string config;                                                // config.json
  std::map<std::string, NamedTensors> tensors;                       // file stem ("model") -> tensors
  std::map<std::string, std::map<std::string, std::string>> metadata;  // file stem -> its safetensors __metadata__
};

std::string checkpoint_dir_name(int64_t step);  // "step_00001000"

// The device type ("cpu" or "cuda") of each generator state in rng.safetensors: its metadata
// names them. Checkpoints written before that record have none; there a "device" state means the
// run was on CUDA (the only accelerator difftrain runs on), so "trainer" and "device" were CUDA
// generators, and otherwise every state is a CPU one. CheckpointError for a state without a
// type, or a type that is not cpu or cuda.
std::map<std::string, std::string> rng_state_devices(const Checkpoint& ckpt);

// Saves into dir/step_XXXXXXXX atomically and returns that path. An existing checkpoint of the
// same step is replaced only after the new one is complete.
std::filesystem::path save_checkpoint(const std::filesystem::path& dir, const Checkpoint& ckpt);

// Verifies and reads a checkpoint directory. CheckpointError names the file and the problem.
Checkpoint load_checkpoint(const std::filesystem::path& path);
// What is wrong with a checkpoint directory (missing or unreadable manifest, other format or
// version, a missing file, a size or SHA-256 that differs); empty when it is good.
std::string verify_checkpoint(const std::filesystem::path& path);

// The step_* directories of dir, newest first.
std::vector<std::pair<int64_t, std::filesystem::path>> list_checkpoints(const std::filesystem::path& dir);
// The newest checkpoint that verifies. Each newer one that does not is added to `skipped` as
// "<path>: <problem>".
std::optional<std::filesystem::path> find_latest_checkpoint(const std::filesystem::path& dir,
                                                            std::vector<std::string>* skipped = nullptr);
// The newest checkpoint of `dir` that verifies, each newer damaged one logged as a warning and
// skipped: what `--resume latest` and `--checkpoint latest` take. nullopt when `dir` holds no
// checkpoint; CheckpointError, naming every damaged one, when it holds some but none is usable.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& dir);
// Deletes all but the newest `keep_last` checkpoints and those whose step is a multiple of
// keep_every (0 = none kept permanently); returns what it deleted.
std::vector<std::filesystem::path> rotate_checkpoints(const std::filesystem::path& dir, int keep_last, int64_t keep_every);
// Removes the temporary directories that interrupted saves left behind; returns how many.
int remove_interrupted_saves(const std::filesystem::path& dir);

}  // namespace difftrain

// The training state and the checkpoint schema, in one place: which part of a run goes into
// which file of a checkpoint (checkpoint.h writes, verifies and rotates the files), and how each
// is read back, for a resume or for `sample`/`eval`/`export`:
//   model.safetensors      the model's parameters, by diffusers UNet2DModel names
//   ema.safetensors        the EMA copy (ema.enabled)
//   optimizer.safetensors  AdamW's moments and steps, then the loss scaler's state (fp16)
//   rng.safetensors        generator states: "trainer" (t, ε, class dropout), "cpu", "device"
//                          (dropout on CUDA); the metadata "rng" names each one's device type
//   state.json             {"ema_optimization_step", "loader": {"epoch", "batch"}, "seed"},
//                          plus the step and format version that checkpoint.cpp adds
//   config.json            the resolved config
#pragma once

#include <cstdint>
#include <filesystem>

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/named_tensors.h"

namespace difftrain {

class UNet2DModel;  // unet.h
class EMAModel;     // ema.h
class AdamW;        // optim.h
class GradScaler;   // amp.h

// Handles to the parts of a training run that a checkpoint holds; the Trainer owns them.
struct TrainState {
  UNet2DModel* model = nullptr;
  UNet2DModel* ema_model = nullptr;  // with ema.enabled, and then ema too
  EMAModel* ema = nullptr;
  AdamW* optimizer = nullptr;
  GradScaler* scaler = nullptr;  // fp16 only
  at::Generator generator;       // the trainer's (t, ε, class dropout), on `device`
  c10::Device device{c10::kCPU};
  int64_t rank = 0;
  int64_t step = 0;
  LoaderState loader;  // the position of the next batch

  // Writes checkpoints_dir/step_XXXXXXXX atomically with `cfg` as its config.json, rotates per
  // checkpoint.keep_last / keep_every, and returns the new checkpoint's path.
  std::filesystem::path save(const std::filesystem::path& checkpoints_dir, const Config& cfg) const;

  // Reads a checkpoint into the parts, step and loader. UsageError when its run identity differs
  // from `cfg` (run.h); CheckpointError for a damaged or incomplete one. Generator states carry
  // over between runs on the same device type; across types the streams are reseeded from
  // (run.seed, purpose, rank, step), deterministic but not bit-identical, with a warning.
  void load(const std::filesystem::path& checkpoint, const Config& cfg);
};

// One set of weights of a checkpoint, with its step and config, for sample, eval and export.
struct CheckpointWeights {
  std::filesystem::path path;  // the checkpoint directory
  int64_t step = 0;
  Config config;  // its config.json
  WeightsKind kind = WeightsKind::ema;  // enums.h
  NamedTensors weights;  // by diffusers name, in the model's order
};

// Verifies the checkpoint (manifest, version, SHA-256) and reads its config and one set of
// weights: CheckpointError (exit 2) for a damaged or other-version checkpoint, UsageError when
// `kind` is ema and the run kept no EMA.
CheckpointWeights load_checkpoint_weights(const std::filesystem::path& checkpoint, WeightsKind kind);

}  // namespace difftrain

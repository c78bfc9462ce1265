// Weights in and out of difftrain: a model from a checkpoint, and the folder layout of Hugging
// Face diffusers (the flat layout of google/ddpm-cifar10-32):
//   config.json                           UNet2DModel config ("_class_name": "UNet2DModel")
//   diffusion_pytorch_model.safetensors   the weights by UNet2DModel state-dict names, F32 or BF16
//   scheduler_config.json                 DDPMScheduler config (EDM: EDMEulerScheduler)
//   model_index.json                      DDPMPipeline: unet and scheduler live in this folder (not for EDM)
// UNet2DModel.from_pretrained(DIR), DDPMScheduler.from_pretrained(DIR) and
// DDPMPipeline.from_pretrained(DIR) load it; an EDM folder, UNet2DModel and EDMEulerScheduler. Our class-conditional model has one extra (null)
// class embedding, so the folder says num_class_embeds = K + 1 and import maps it back to K.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <nlohmann/json_fwd.hpp>

#include "difftrain/config.h"
#include "difftrain/named_tensors.h"
#include "difftrain/unet.h"

namespace difftrain {

DIFFTRAIN_ENUM(ExportDtype, f32, bf16);    // safetensors dtype of exported weights

inline constexpr const char* kDiffusersVersion = "0.42.1";  // the diffusers release the layout is tested with
inline constexpr const char* kDiffusersWeightsFile = "diffusion_pytorch_model.safetensors";

// ---------------------------------------------------------------------------------------------
// Checkpoints

// A checkpoint directory from a command-line spec: "latest" (the newest good checkpoint of
// run_dir), a checkpoint directory (holds manifest.json), or a run directory / its checkpoints/
// folder (its newest good checkpoint). UsageError, naming the path, when there is none.
std::filesystem::path resolve_checkpoint(const std::string& spec, const std::filesystem::path& run_dir);

// The run directory a checkpoint belongs to (<run>/checkpoints/step_X -> <run>).
std::filesystem::path run_dir_of_checkpoint(const std::filesystem::path& checkpoint);

// A model of `cfg` holding `weights` (every parameter by name, nothing else; shapes must match),
// in eval mode on `device`. CheckpointError names `source` and every offending tensor (weights.h).
UNet2DModel model_with_weights(const ModelConfig& cfg, const std::map<std::string, at::Tensor>& weights,
                               const std::string& source, const c10::Device& device);
std::map<std::string, at::Tensor> weights_map(const NamedTensors& weights);

// ---------------------------------------------------------------------------------------------
// diffusers

// UNet2DModel config.json: every architecture argument, diffusers' fixed choices spelled out; keys
// sorted, as save_pretrained writes them.
nlohmann::json diffusers_unet_config(const ModelConfig& model);
// DDPMScheduler scheduler_config.json for the diffusion section; EDMEulerScheduler's for EDM.
nlohmann::json diffusers_scheduler_config(const DiffusionConfig& diffusion);
// DDPMPipeline model_index.json.
nlohmann::json diffusers_model_index();

// The ModelConfig of a diffusers UNet2DModel config (absent keys take diffusers' defaults).
// UsageError naming `origin` and the key for anything difftrain's UNet does not implement
// (another class, act_fn, time_embedding_type, class_embed_type, ...).
ModelConfig model_config_from_diffusers(const nlohmann::json& config, const std::string& origin);

// The architecture fields in which `folder` differs from `config`, as "model.key: folder X,
// config Y" (sample_size and dropout are left out: they change no weight).
std::vector<std::string> architecture_differences(const ModelConfig& folder, const ModelConfig& config);

struct ExportOptions {
  ExportDtype dtype = ExportDtype::f32;
  std::map<std::string, std::string> metadata;  // added to the safetensors header ("format": "pt" always)
};

// Writes the four files (three for EDM) into out_dir (created if needed; each file replaced atomically). The
// same input gives the same bytes.
void export_diffusers(const std::filesystem::path& out_dir, const ModelConfig& model, const DiffusionConfig& diffusion,
                      const NamedTensors& weights, const ExportOptions& opts = {});

struct DiffusersUNet {
  ModelConfig model;
  std::map<std::string, at::Tensor> weights;  // float32, CPU, exactly the model's parameter names
};

// Reads a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors), as
// difftrain export writes it or diffusers' save_pretrained does. Missing, extra or misshapen
// tensors and unsupported config values are errors naming the file and key.
DiffusersUNet import_diffusers(const std::filesystem::path& dir);

}  // namespace difftrain

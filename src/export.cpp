#include "difftrain/export.h"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "difftrain/checkpoint.h"
#include "difftrain/io.h"
#include "difftrain/log.h"
#include "difftrain/safetensors.h"
#include "difftrain/weights.h"

namespace difftrain {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json parse_json_file(const fs::path& p) {
  try {
    return json::parse(read_text(p));
  } catch (const json::exception& e) {
    throw RuntimeError(fmt::format("{}: invalid JSON: {}", p.string(), e.what()));
  }
}

// The parameters of a model of `cfg` by name, in order (shapes only matter).
NamedTensors expected_parameters(const ModelConfig& cfg) {
  UNet2DModel m(cfg);
  return named_parameters(m);
}

// The newest good checkpoint of a checkpoints/ folder, or a UsageError when it has none.
fs::path latest_in(const fs::path& checkpoints_dir) {
  const auto found = latest_checkpoint(checkpoints_dir);
  if (!found) throw UsageError(fmt::format("no usable checkpoint in {}: it holds none yet", checkpoints_dir.string()));
  return *found;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Checkpoints

fs::path resolve_checkpoint(const std::string& spec, const fs::path& run_dir) {
  if (spec == "latest") {
    if (!fs::is_directory(run_dir))
      throw UsageError(fmt::format("checkpoint 'latest': the run directory {} does not exist (name a run with --run DIR, or "
                                   "a checkpoint path)", run_dir.string()));
    return latest_in(run_dir / "checkpoints");
  }
  fs::path p = fs::path(spec).lexically_normal();
  if (!p.has_filename() && p.has_parent_path()) p = p.parent_path();  // "step_X/" -> "step_X"
  std::error_code ec;
  if (!fs::exists(p, ec)) throw UsageError(fmt::format("checkpoint {}: no such file or directory", spec));
  if (!fs::is_directory(p, ec))
    throw UsageError(fmt::format("checkpoint {}: not a directory (a checkpoint is a directory such as "
                                 "<run>/checkpoints/step_00001000 holding manifest.json)", spec));
  if (fs::exists(p / "manifest.json")) return p;
  if (fs::is_directory(p / "checkpoints")) return latest_in(p / "checkpoints");
  const auto name = p.filename().string();
  if (name == "checkpoints") return latest_in(p);
  if (name.rfind("step_", 0) == 0)
    throw UsageError(fmt::format("checkpoint {}: no manifest.json (an interrupted save?); pick another step or 'latest'", spec));
  throw UsageError(fmt::format("checkpoint {}: neither a checkpoint directory (no manifest.json) nor a run directory (no "
                               "checkpoints/)", spec));
}

fs::path run_dir_of_checkpoint(const fs::path& checkpoint) {
  const fs::path p = checkpoint.lexically_normal();
  const fs::path dir = p.has_filename() ? p : p.parent_path();
  return dir.parent_path().filename() == "checkpoints" ? dir.parent_path().parent_path() : dir.parent_path();
}

std::map<std::string, at::Tensor> weights_map(const NamedTensors& weights) { return {weights.begin(), weights.end()}; }

UNet2DModel model_with_weights(const ModelConfig& cfg, const std::map<std::string, at::Tensor>& weights,
                               const std::string& source, const c10::Device& device) {
  UNet2DModel m(cfg);
  load_weights(m, weights, source);
  m->to(device);
  m->eval();
  return m;
}

// ---------------------------------------------------------------------------------------------
// diffusers configs

json diffusers_unet_config(const ModelConfig& m) {
  json j;  // std::map: keys sorted, as diffusers' save_pretrained writes them
  j["_class_name"] = "UNet2DModel";
  j["_diffusers_version"] = kDiffusersVersion;
  j["sample_size"] = m.sample_size;
  j["in_channels"] = m.in_channels;
  j["out_channels"] = m.out_channels;
  j["center_input_sample"] = false;
  j["time_embedding_type"] = "positional";
  j["time_embedding_dim"] = nullptr;
  j["freq_shift"] = m.freq_shift;
  j["flip_sin_to_cos"] = m.flip_sin_to_cos;
  json down = json::array(), up = json::array();
  for (const auto t : m.down_block_types) down.push_back(to_string(t));
  for (const auto t : m.up_block_types) up.push_back(to_string(t));
  j["down_block_types"] = down;
  j["mid_block_type"] = "UNetMidBlock2D";
  j["up_block_types"] = up;
  j["block_out_channels"] = m.block_out_channels;
  j["layers_per_block"] = m.layers_per_block;
  j["mid_block_scale_factor"] = 1;
  j["downsample_padding"] = 1;
  j["downsample_type"] = "conv";
  j["upsample_type"] = "conv";
  j["dropout"] = m.dropout;
  j["act_fn"] = "silu";
  j["attention_head_dim"] = m.attention_head_dim ? json(*m.attention_head_dim) : json(nullptr);
  j["norm_num_groups"] = m.norm_num_groups;
  j["attn_norm_num_groups"] = nullptr;
  j["norm_eps"] = m.norm_eps;
  j["resnet_time_scale_shift"] = to_string(m.resnet_time_scale_shift);
  j["add_attention"] = m.add_attention;
  j["class_embed_type"] = nullptr;
  j["num_class_embeds"] = m.num_class_embeds ? json(*m.num_class_embeds + 1) : json(nullptr);  // + the null class
  j["num_train_timesteps"] = nullptr;
  return j;
}

json diffusers_scheduler_config(const DiffusionConfig& d) {
  json j;
  if (d.formulation == Formulation::edm) {
    // EDMEulerScheduler with prediction_type "epsilon" is Table 1's preconditioning exactly:
    // c_in x as the model input, c_noise = ¼ ln σ as its timestep, D = c_skip x + c_out F.
    j["_class_name"] = "EDMEulerScheduler";
    j["_diffusers_version"] = kDiffusersVersion;
    j["sigma_min"] = d.sigma_min;
    j["sigma_max"] = d.sigma_max;
    j["sigma_data"] = d.sigma_data;
    j["sigma_schedule"] = "karras";
    j["num_train_timesteps"] = d.num_train_timesteps;
    j["prediction_type"] = "epsilon";
    j["rho"] = d.rho;
    j["final_sigmas_type"] = "zero";
    return j;
  }
  j["_class_name"] = "DDPMScheduler";
  j["_diffusers_version"] = kDiffusersVersion;
  j["num_train_timesteps"] = d.num_train_timesteps;
  j["beta_start"] = d.beta_start;
  j["beta_end"] = d.beta_end;
  j["beta_schedule"] = to_string(d.beta_schedule);
  j["trained_betas"] = nullptr;
  j["variance_type"] = to_string(d.variance_type);
  j["clip_sample"] = d.clip_sample;
  j["prediction_type"] = to_string(d.prediction_type);
  j["thresholding"] = false;
  j["dynamic_thresholding_ratio"] = 0.995;
  j["clip_sample_range"] = d.clip_sample_range;
  j["sample_max_value"] = 1.0;
  j["timestep_spacing"] = to_string(d.timestep_spacing);
  j["steps_offset"] = d.steps_offset;
  j["rescale_betas_zero_snr"] = d.rescale_betas_zero_snr;
  return j;
}

json diffusers_model_index() {
  json j;
  j["_class_name"] = "DDPMPipeline";
  j["_diffusers_version"] = kDiffusersVersion;
  j["scheduler"] = {"diffusers", "DDPMScheduler"};
  j["unet"] = {"diffusers", "UNet2DModel"};
  return j;
}

ModelConfig model_config_from_diffusers(const json& config, const std::string& origin) {
  if (!config.is_object()) throw UsageError(fmt::format("{}: not a JSON object", origin));
  std::vector<std::string> errors;
  if (config.contains("_class_name") && config["_class_name"] != "UNet2DModel")
    errors.push_back(fmt::format("_class_name is {}; difftrain reads UNet2DModel folders only", config["_class_name"].dump()));

  // Arguments with one possible value here; absent means diffusers' default, which is that value.
  const std::vector<std::pair<std::string, json>> fixed = {
      {"center_input_sample", false},      {"time_embedding_type", "positional"}, {"time_embedding_dim", nullptr},
      {"mid_block_type", "UNetMidBlock2D"}, {"mid_block_scale_factor", 1},        {"downsample_padding", 1},
      {"downsample_type", "conv"},          {"upsample_type", "conv"},             {"act_fn", "silu"},
      {"attn_norm_num_groups", nullptr},    {"class_embed_type", nullptr}};
  for (const auto& [key, value] : fixed) {
    const auto it = config.find(key);
    if (it == config.end()) continue;
    const bool same = (it->is_number() && value.is_number()) ? it->get<double>() == value.get<double>() : *it == value;
    if (!same)
      errors.push_back(fmt::format("{} = {}; difftrain's UNet implements only {}", key, it->dump(), value.dump()));
  }

  // Arguments difftrain's ModelConfig shares by name, with diffusers' UNet2DModel defaults.
  const std::vector<std::pair<std::string, json>> shared = {
      {"in_channels", 3},
      {"out_channels", 3},
      {"block_out_channels", {224, 448, 672, 896}},
      {"layers_per_block", 2},
      {"down_block_types", {"DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"}},
      {"up_block_types", {"AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"}},
      {"attention_head_dim", 8},
      {"add_attention", true},
      {"norm_num_groups", 32},
      {"norm_eps", 1e-5},
      {"dropout", 0.0},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"resnet_time_scale_shift", "default"},
      {"num_class_embeds", nullptr}};
  nlohmann::ordered_json model = nlohmann::ordered_json::object();
  for (const auto& [key, def] : shared) model[key] = config.contains(key) ? config[key] : def;

  const json size = config.value("sample_size", json(nullptr));
  if (size.is_number_integer()) model["sample_size"] = size;
  else if (size.is_array() && size.size() == 2 && size[0].is_number_integer() && size[0] == size[1]) model["sample_size"] = size[0];
  else errors.push_back(fmt::format("sample_size = {}; difftrain needs one integer (square images)", size.dump()));

  if (model["num_class_embeds"].is_number_integer()) {  // diffusers counts our null class
    const int64_t k = model["num_class_embeds"].get<int64_t>();
    if (k < 2)
      errors.push_back(fmt::format("num_class_embeds = {}; a difftrain export has K + 1 >= 2 (K classes and the null "
                                   "class)", k));
    model["num_class_embeds"] = k - 1;
  }
  if (model["in_channels"] != 1 && model["in_channels"] != 3)
    errors.push_back(fmt::format("in_channels = {}; difftrain trains on images of 1 or 3 channels", model["in_channels"].dump()));
  if (model["out_channels"] != model["in_channels"])
    errors.push_back(fmt::format("out_channels = {} differs from in_channels = {}; difftrain's model predicts an "
                                 "image-shaped target", model["out_channels"].dump(), model["in_channels"].dump()));
  std::vector<std::string> ignored;
  std::set<std::string> known = {"sample_size", "num_train_timesteps"};
  for (const auto& [k, v] : fixed) known.insert(k);
  for (const auto& [k, v] : shared) known.insert(k);
  for (const auto& item : config.items())
    if (item.key().rfind('_', 0) != 0 && !known.count(item.key())) ignored.push_back(item.key());
  if (!ignored.empty()) log_warn("{}: ignoring keys difftrain does not know: {}", origin, fmt::join(ignored, ", "));
  if (!errors.empty())
    throw UsageError(fmt::format("{} is not a UNet2DModel that difftrain can load:\n  {}", origin, fmt::join(errors, "\n  ")));

  nlohmann::ordered_json doc = {{"model", model},
                                {"data", {{"channels", model["in_channels"]}, {"resolution", model["sample_size"]}}}};
  try {
    return config_from_json(doc, origin).model;
  } catch (const ConfigError& e) {
    throw UsageError(fmt::format("{} is not a UNet2DModel that difftrain can load:\n  {}", origin,
                                 fmt::join(e.messages(), "\n  ")));
  }
}

std::vector<std::string> architecture_differences(const ModelConfig& folder, const ModelConfig& config) {
  Config a, b;
  a.model = folder, b.model = config;
  const auto ja = config_to_json(a)["model"], jb = config_to_json(b)["model"];
  std::vector<std::string> out;
  for (const auto& item : ja.items()) {
    if (item.key() == "sample_size" || item.key() == "dropout") continue;
    if (item.value() != jb[item.key()])
      out.push_back(fmt::format("model.{}: folder {}, config {}", item.key(), item.value().dump(), jb[item.key()].dump()));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Export and import

void export_diffusers(const fs::path& out_dir, const ModelConfig& model, const DiffusionConfig& diffusion,
                      const NamedTensors& weights, const ExportOptions& opts) {
  // The weights must be exactly the model's parameters.
  const auto expected = expected_parameters(model);
  const auto given = weights_map(weights);
  if (const auto problems = weight_mismatches(expected, given); !problems.empty())
    throw RuntimeError(fmt::format("export: the weights do not fit model.*:\n  {}", fmt::join(problems, "\n  ")));
  NamedTensors tensors;
  for (const auto& [name, p] : expected) {
    auto t = given.at(name).detach().to(at::kCPU).to(at::kFloat);
    if (opts.dtype == ExportDtype::bf16) t = t.to(at::kBFloat16);
    tensors.emplace_back(name, t.contiguous());
  }
  // Sorted by name, as safetensors' own writer (safetensors.torch.save_file) lays tensors out.
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });

  std::map<std::string, std::string> metadata = opts.metadata;
  metadata["format"] = "pt";  // what safetensors.torch.save_file writes
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw RuntimeError(fmt::format("cannot create {}: {}", out_dir.string(), ec.message()));
  write_file_atomic(out_dir / kDiffusersWeightsFile, safetensors_bytes(tensors, metadata));
  write_file_atomic(out_dir / "config.json", diffusers_unet_config(model).dump(2) + "\n");
  write_file_atomic(out_dir / "scheduler_config.json", diffusers_scheduler_config(diffusion).dump(2) + "\n");
  // diffusers has no pipeline for an unconditional EDM UNet: its folder is the model and the scheduler.
  if (diffusion.formulation == Formulation::ddpm)
    write_file_atomic(out_dir / "model_index.json", diffusers_model_index().dump(2) + "\n");
  else fs::remove(out_dir / "model_index.json", ec);  // an earlier DDPM export's
}

DiffusersUNet import_diffusers(const fs::path& dir_in) {
  std::error_code ec;
  if (!fs::is_directory(dir_in, ec)) throw UsageError(fmt::format("{}: no such directory", dir_in.string()));
  fs::path dir = dir_in;
  if (!fs::exists(dir / "config.json") && fs::exists(dir / "unet" / "config.json")) dir = dir / "unet";  // pipeline layout
  if (!fs::exists(dir / "config.json"))
    throw UsageError(fmt::format("{} has no config.json: not a diffusers UNet2DModel folder (difftrain export writes one)",
                                 dir_in.string()));
  const fs::path weights_path = dir / kDiffusersWeightsFile;
  if (!fs::exists(weights_path)) {
    const bool bin = fs::exists(dir / "diffusion_pytorch_model.bin");
    throw UsageError(fmt::format(
        "{} has no {}{}", dir.string(), kDiffusersWeightsFile,
        bin ? "; it holds a pickled diffusion_pytorch_model.bin, which difftrain does not read: convert it with python -c "
              "\"from diffusers import UNet2DModel; UNet2DModel.from_pretrained('DIR').save_pretrained('OUT')\""
            : ""));
  }
  DiffusersUNet out;
  out.model = model_config_from_diffusers(parse_json_file(dir / "config.json"), (dir / "config.json").string());

  const auto file = load_safetensors(weights_path);
  const auto expected = expected_parameters(out.model);
  const auto given = weights_map(file.tensors);
  std::vector<std::string> problems = weight_mismatches(expected, given, "config.json implies");
  for (const auto& [name, t] : file.tensors) {
    const auto dtype = t.scalar_type();
    if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf && dtype != at::kDouble)
      problems.push_back(fmt::format("{} has dtype {} (F32, BF16, F16 or F64 expected)", name, c10::toString(dtype)));
  }
  if (!problems.empty())
    throw RuntimeError(fmt::format("{} does not match {}:\n  {}", weights_path.string(), (dir / "config.json").string(),
                                   fmt::join(problems, "\n  ")));
  for (const auto& [name, p] : expected) out.weights[name] = given.at(name).to(at::kFloat).contiguous();
  return out;
}

}  // namespace difftrain

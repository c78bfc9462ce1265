#include "difftrain/train_state.h"

#include <ATen/Context.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "difftrain/amp.h"
#include "difftrain/checkpoint.h"
#include "difftrain/ema.h"
#include "difftrain/io.h"
#include "difftrain/log.h"
#include "difftrain/optim.h"
#include "difftrain/rng.h"
#include "difftrain/run.h"
#include "difftrain/safetensors.h"
#include "difftrain/unet.h"
#include "difftrain/weights.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {

// The device's default generator (a handle sharing its state).
at::Generator default_generator(const c10::Device& device) { return at::globalContext().defaultGenerator(device); }

at::Tensor generator_state(at::Generator g) {
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

std::string device_type(const c10::Device& d) { return c10::DeviceTypeName(d.type(), /*lower_case=*/true); }

Config checkpoint_config(const std::string& text, const fs::path& checkpoint) {
  try {
    return config_from_json(nlohmann::ordered_json::parse(text), (checkpoint / "config.json").string());
  } catch (const std::exception& e) {
    throw CheckpointError(
        fmt::format("checkpoint {} was written by another difftrain version: its config.json does not "
                    "fit this one: {}",
                    checkpoint.string(), e.what()));
  }
}

// The generator states: bit-exact on the same device type, reseeded across types.
void restore_generators(const Checkpoint& ckpt, const fs::path& path, const TrainState& s, const Config& cfg) {
  const auto& rng = ckpt.tensors.at("rng");
  auto restore = [&](at::Generator g, const std::string& name) {
    const auto it = std::find_if(rng.begin(), rng.end(), [&](const auto& kv) { return kv.first == name; });
    if (it == rng.end())
      throw CheckpointError(fmt::format("checkpoint {}: rng.safetensors has no {} state", path.string(), name));
    try {
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(it->second);
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("checkpoint {}: the {} generator state does not fit the {} generator: {}", path.string(),
                                        name, g.device().str(), e.what_without_backtrace()));
    }
  };
  const auto types = rng_state_devices(ckpt);
  const std::string here = device_type(s.device);
  const std::string there = types.count("trainer") ? types.at("trainer") : "cpu";  // the trainer's lives on the run's device
  auto cpu = default_generator(c10::Device(c10::kCPU));
  if (there == here) {
    restore(s.generator, "trainer");
    restore(cpu, "cpu");
    if (!s.device.is_cpu()) restore(default_generator(s.device), "device");
    return;
  }
  // A generator's state belongs to its device type (the CPU's Mersenne Twister, 5056 bytes;
  // CUDA's Philox seed and offset, 16 bytes), so the t/ε stream and the dropout stream restart
  // from seeds derived from (run.seed, purpose, rank) and the step: deterministic, not bit-exact.
  const auto seed = static_cast<uint64_t>(cfg.run.seed), step = static_cast<uint64_t>(ckpt.step);
  auto g = s.generator;
  g.set_current_seed(derive_seed(stream_seed(seed, SeedPurpose::global_batch), step));
  default_generator(s.device).set_current_seed(derive_seed(stream_seed(seed, SeedPurpose::dropout, s.rank), step));
  if (!s.device.is_cpu()) restore(cpu, "cpu");  // a CPU state carries over; on a CPU run it is the dropout stream, reseeded
  if (s.rank == 0)
    log_warn(
        "checkpoint {} was written on {} and this run is on {}: generator states do not carry over between device "
        "types, so the timestep/noise stream and the dropout stream are reseeded from run.seed and step {}. The run "
        "continues deterministically, but not bit-identically to one that stayed on {}.",
        path.string(), there, here, ckpt.step, there);
}

}  // namespace

fs::path TrainState::save(const fs::path& checkpoints_dir, const Config& cfg) const {
  Checkpoint ckpt;
  ckpt.step = step;
  ckpt.config = config_to_string(cfg);
  nlohmann::ordered_json state;
  ckpt.tensors["model"] = named_parameters(*model);
  if (ema) {
    ckpt.tensors["ema"] = named_parameters(*ema_model);
    state["ema_optimization_step"] = ema->optimization_step();
  }
  auto optim = optimizer->state_dict();
  if (scaler)
    for (auto& kv : scaler->state_dict()) optim.push_back(kv);
  ckpt.tensors["optimizer"] = std::move(optim);
  NamedTensors rng = {{"trainer", generator_state(generator)},
                      {"cpu", generator_state(default_generator(c10::Device(c10::kCPU)))}};
  ckpt.metadata["rng"] = {{"trainer", device_type(device)}, {"cpu", "cpu"}};  // each state's device type (rng_state_devices)
  if (!device.is_cpu()) {
    rng.emplace_back("device", generator_state(default_generator(device)));
    ckpt.metadata["rng"]["device"] = device_type(device);
  }
  ckpt.tensors["rng"] = std::move(rng);
  state["loader"] = {{"epoch", loader.epoch}, {"batch", loader.batch}};
  state["seed"] = cfg.run.seed;
  ckpt.state = state.dump();
  const auto path = save_checkpoint(checkpoints_dir, ckpt);
  for (const auto& gone : rotate_checkpoints(checkpoints_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every))
    log_debug("rotated out {}", gone.string());
  return path;
}

void TrainState::load(const fs::path& path, const Config& cfg) {
  const Checkpoint ckpt = load_checkpoint(path);
  if (const auto changes = run_identity_changes(checkpoint_config(ckpt.config, path), cfg); !changes.empty())
    throw UsageError(
        fmt::format("cannot resume from {}: the config changes the model, the data or the optimisation (only "
                    "run.device, run.num_threads, run.peak_tflops, train.max_steps, the train.* speed switches, "
                    "checkpoint.resume, distributed.timeout_s and logging.* may change on resume). Changed:{}",
                    path.string(), changes));
  auto part = [&](const std::string& stem) -> std::map<std::string, at::Tensor> {
    const auto it = ckpt.tensors.find(stem);
    if (it == ckpt.tensors.end()) throw CheckpointError(fmt::format("checkpoint {} has no {}.safetensors", path.string(), stem));
    return {it->second.begin(), it->second.end()};
  };
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(ckpt.state);
    loader = LoaderState{state.at("loader").at("epoch").get<int64_t>(), state.at("loader").at("batch").get<int64_t>()};
    load_weights(*model, part("model"), (path / "model.safetensors").string());
    if (ema) {
      load_weights(*ema_model, part("ema"), (path / "ema.safetensors").string());
      ema->set_optimization_step(state.at("ema_optimization_step").get<int64_t>());
    }
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("checkpoint {}: state.json: {}", path.string(), e.what()));
  }
  const auto optim = part("optimizer");
  optimizer->load_state_dict(optim);
  if (scaler) scaler->load_state_dict(optim);
  part("rng");  // present, or the error names it
  restore_generators(ckpt, path, *this, cfg);
  step = ckpt.step;
}

CheckpointWeights load_checkpoint_weights(const fs::path& checkpoint, WeightsKind kind) {
  if (const auto problem = verify_checkpoint(checkpoint); !problem.empty())
    throw CheckpointError(fmt::format("checkpoint {} is not usable: {}", checkpoint.string(), problem));
  CheckpointWeights out;
  out.path = checkpoint;
  out.kind = kind;
  try {
    out.step = nlohmann::json::parse(read_text(checkpoint / "state.json")).at("step").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("checkpoint {}: state.json: {}", checkpoint.string(), e.what()));
  }
  out.config = checkpoint_config(read_text(checkpoint / "config.json"), checkpoint);
  const fs::path file = checkpoint / (to_string(kind) + ".safetensors");
  if (!fs::exists(file)) {
    if (kind == WeightsKind::ema)
      throw UsageError(fmt::format("checkpoint {} has no EMA weights (the run had ema.enabled = false); use --weights model",
                                   checkpoint.string()));
    throw CheckpointError(fmt::format("checkpoint {} has no {}", checkpoint.string(), file.filename().string()));
  }
  out.weights = load_safetensors(file).tensors;
  return out;
}

}  // namespace difftrain

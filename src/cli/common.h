// What the subcommands share (common.cpp): the configuration options, the checkpoint options of
// sample, eval and export, the sampling flags of sample and eval, device selection, and enum
// options spelled as the config spells them.
#pragma once

#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "difftrain/config.h"

// Declared only, so that the commands that need none of them (config, env) compile without
// LibTorch's headers: common.cpp and the commands that use them include their headers.
namespace c10 {
struct Device;
}
namespace difftrain {
struct CheckpointWeights;  // train_state.h
struct DeviceChoice;       // env.h
struct EnvReport;          // env.h
struct SamplingOptions;    // sampling.h
struct World;              // distributed.h
}  // namespace difftrain

namespace difftrain::cli {

// A CheckedTransformer from a DIFFTRAIN_ENUM's own spellings, for an option bound straight to an
// enum-typed field (`--weights model` stores WeightsKind::model). Only the names pass: a bare
// CheckedTransformer would also take the enum's numbers ("--weights 1") and name them in its error.
// Help shows the names as {a,b}. Options use it through add_enum_option below; the default, where
// there is one, is the caller's ->default_str(to_string(field)) (CLI11 cannot print an enum).
template <class E> class EnumNames : public CLI::CheckedTransformer {
 public:
  EnumNames() : CLI::CheckedTransformer(name_map()) {
    const auto& names = enum_names<E>();
    description("{" + CLI::detail::join(names, ",") + "}");
    func_ = [to_enum = func_, allowed = CLI::detail::join(names, " | ")](std::string& input) {
      if (!enum_from_string<E>(input)) return "unknown value \"" + input + "\"; allowed: " + allowed;
      return to_enum(input);
    };
  }

 private:
  static std::map<std::string, E> name_map() {
    std::map<std::string, E> m;
    const auto& names = enum_names<E>();
    for (size_t i = 0; i < names.size(); ++i) m.emplace(names[i], static_cast<E>(i));
    return m;
  }
};

// An option bound straight to an enum-typed field and spelled by EnumNames<E>. It parses through
// the enum's number (what EnumNames maps each name to): CLI11 2.1's direct enum path makes an
// unqualified to_string call that our to_string<E> (config.h) makes ambiguous.
template <class E> CLI::Option* add_enum_option(CLI::App* cmd, std::string name, E& field, std::string description) {
  return cmd->add_option<E, std::underlying_type_t<E>>(std::move(name), field, std::move(description))->transform(EnumNames<E>());
}

// --config and --set, shared by the commands that read a configuration.
struct ConfigOptions {
  std::string config_path;             // empty = built-in defaults
  std::vector<std::string> overrides;  // --set key.path=value, in order
};
void add_config_options(CLI::App* cmd, ConfigOptions& opts);
Config load(const ConfigOptions& opts, std::vector<std::string>* notes = nullptr);  // notes: load_config's

// --checkpoint, --run and --weights, shared by sample, eval and export.
struct CheckpointOptions {
  std::string checkpoint = "latest";       // latest | a checkpoint directory | a run directory
  std::string run;                         // the run of 'latest'; default <output_dir>/<name> of the built-in config
  WeightsKind weights = WeightsKind::ema;  // without --weights, a run that kept no EMA falls back to model
  CLI::Option* checkpoint_option = nullptr;
  CLI::Option* run_option = nullptr;
  CLI::Option* weights_option = nullptr;
  bool checkpoint_given() const;  // --checkpoint or --run on the command line
};
void add_checkpoint_options(CLI::App* cmd, CheckpointOptions& opts);
// Resolves and loads the checkpoint. Without an explicit --weights, a run that kept no EMA falls
// back to the model weights (and says so).
CheckpointWeights open_checkpoint(const CheckpointOptions& opts);

// The sampling flags of sample and eval (--sampler, --steps, ...); unset ones come from the
// checkpoint's sampling.* (sampling_options turns them into the library's SamplingOptions).
struct SamplingFlags {
  int64_t num_samples = 0;
  Sampler sampler = Sampler::ddpm;
  int64_t steps = 0;
  double eta = 0;
  double s_churn = 0;
  int64_t solver_order = 2;
  bool karras_sigmas = false;
  std::string class_label;  // K | all
  double guidance_scale = 1;
  int64_t seed = 0;
  int64_t batch_size = 0;
  std::vector<CLI::Option*> given;  // to tell set options from defaults
};
void add_sampling_flags(CLI::App* cmd, SamplingFlags& opts, const std::string& num_samples_help);
// The generate() options for a model of `cfg`; UsageError for labels or guidance given to an
// unconditional model and for labels outside its classes.
SamplingOptions sampling_options(const SamplingFlags& opts, const Config& cfg, int64_t default_num_samples);
bool given(const SamplingFlags& opts, const std::string& name);  // e.g. "--steps"

// --device and --threads of sample and eval (train takes run.device and run.num_threads).
struct DeviceOptions {
  std::string device = "auto";  // parse_device_spec's grammar
  int threads = 0;              // CPU threads, 0 = all cores (run.num_threads)
};
void add_device_options(CLI::App* cmd, DeviceOptions& opts);
// Refuses, at parse time, a --device outside the grammar of run.device (parse_device_spec).
CLI::Validator device_spelling();

// The one device-selection path. resolve_device against `env` (never a silent CPU fallback for
// "cuda*"); then, in a distributed run on CUDA, this rank's own GPU (local_cuda_device, with the
// N of cuda:N as the request).
DeviceChoice select_device(const std::string& spec, const EnvReport& env, const World& world);
// Logs the choice: a warning when "auto" fell back to the CPU, else the device and why.
void log_device(const DeviceChoice& choice, const std::string& spec);
// sample and eval: sets the CPU threads, then selects (a single process) and logs the device.
c10::Device pick_device(const DeviceOptions& opts);

}  // namespace difftrain::cli

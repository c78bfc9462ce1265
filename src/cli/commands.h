// One file per subcommand: set_<name>_command(app, ...) registers it, with options bound straight
// into its option struct; its callback runs the command and stores the exit code.
#pragma once

#include <string>
#include <vector>

#include "difftrain/config.h"

namespace CLI {
class App;
class Option;
}
namespace c10 {
struct Device;
}
namespace difftrain {
struct CheckpointWeights;  // export.h
struct SamplingOptions;    // sampling.h
}

namespace difftrain::cli {

// --config and --set, shared by the commands that read a configuration.
struct ConfigOptions {
  std::string config_path;                 // empty = built-in defaults
  std::vector<std::string> overrides;      // --set key.path=value, in order
};
void add_config_options(CLI::App* cmd, ConfigOptions& opts);
Config load(const ConfigOptions& opts, std::vector<std::string>* notes = nullptr);  // notes: load_config's

// --checkpoint, --run and --weights, shared by sample, eval and export (defined in sample.cpp).
struct CheckpointOptions {
  std::string checkpoint = "latest";  // latest | a checkpoint directory | a run directory
  std::string run;                    // the run of 'latest'; default <output_dir>/<name> of the built-in config
  std::string weights = "ema";        // ema | model
  CLI::Option* weights_option = nullptr;
};
void add_checkpoint_options(CLI::App* cmd, CheckpointOptions& opts);
// Resolves and loads the checkpoint. Without an explicit --weights, a run that kept no EMA falls
// back to the model weights (and says so).
CheckpointWeights open_checkpoint(const CheckpointOptions& opts);

// Sampling options shared by sample and eval; unset ones come from the checkpoint's sampling.*.
struct SampleOptions {
  int64_t num_samples = 0;
  std::string sampler;
  int64_t steps = 0;
  double eta = 0;
  int64_t solver_order = 2;
  bool karras_sigmas = false;
  std::string class_label;  // K | all
  double guidance_scale = 1;
  int64_t seed = 0;
  int64_t batch_size = 0;
  std::string device = "auto";
  int threads = 0;                  // CPU threads, 0 = all cores (run.num_threads)
  std::vector<CLI::Option*> given;  // to tell set options from defaults
};
void add_sample_options(CLI::App* cmd, SampleOptions& opts, const std::string& num_samples_help);
// The generate() options for a model of `cfg`; UsageError for labels or guidance given to an
// unconditional model and for labels outside its classes.
SamplingOptions sampling_options(const SampleOptions& opts, const Config& cfg, int64_t default_num_samples);
bool given(const SampleOptions& opts, const std::string& name);  // e.g. "--steps"
// Sets the CPU threads, then resolve_device, logging the choice.
c10::Device pick_device(const SampleOptions& opts);

void set_train_command(CLI::App* app, int& exit_code);
void set_sample_command(CLI::App* app, int& exit_code);
void set_eval_command(CLI::App* app, int& exit_code);
void set_export_command(CLI::App* app, int& exit_code);
void set_env_command(CLI::App* app, int& exit_code);
void set_config_command(CLI::App* app, int& exit_code);

}  // namespace difftrain::cli

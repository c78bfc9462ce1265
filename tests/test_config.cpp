// Config schema: strict validation with JSON paths, precedence, round trips, docs in sync.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "difftrain/config.h"
#include "test_paths.h"

namespace difftrain {
namespace {

using json = nlohmann::ordered_json;
namespace fs = std::filesystem;

std::vector<std::string> errors_for(const std::string& text, const std::vector<std::string>& overrides = {}) {
  json doc = json::parse(text);
  try {
    for (const auto& o : overrides) apply_override(doc, o);
    config_from_json(doc);
  } catch (const ConfigError& e) {
    return e.messages();
  }
  return {};
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& m : v) s += "\n  " + m;
  return s;
}

fs::path temp_file(const std::string& name, const std::string& content) {
  const fs::path dir = fs::temp_directory_path() / ("difftrain_test_config_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / name) << content;
  return dir / name;
}

// ---------------------------------------------------------------------------------------------
// Each bad config must fail, and some message must start with the offending JSON path and
// contain the given fragment.
struct BadCase {
  const char* name;
  const char* json;
  const char* path;       // the message starts with "<path>:"
  const char* fragment;   // and contains this
};

void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }

class BadConfig : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadConfig, NamesThePathAndTheProblem) {
  const BadCase& c = GetParam();
  const auto errs = errors_for(c.json);
  ASSERT_FALSE(errs.empty()) << c.json << " was accepted";
  const std::string prefix = std::string(c.path) + ":";
  bool found = false;
  for (const auto& e : errs) found = found || (e.rfind(prefix, 0) == 0 && e.find(c.fragment) != std::string::npos);
  EXPECT_TRUE(found) << "expected a message starting with '" << prefix << "' containing '" << c.fragment << "'; got:" << joined(errs);
}

const BadCase kBadCases[] = {
    // unknown keys
    {"unknown_top_level", R"({"bogus": 1})", "bogus", "unknown key"},
    {"unknown_key_did_you_mean", R"({"run": {"nmae": "x"}})", "run.nmae", "did you mean \"name\""},
    {"misplaced_key_names_section", R"({"batch_size": 3})", "batch_size", "train.batch_size"},
    {"unknown_nested_key", R"({"model": {"block_out_chanels": [32]}})", "model.block_out_chanels", "\"block_out_channels\""},
    // wrong types
    {"section_not_object", R"({"model": 3})", "model", "expected an object"},
    {"string_for_integer", R"({"train": {"batch_size": "64"}})", "train.batch_size", "expected an integer"},
    {"fraction_for_integer", R"({"train": {"max_steps": 1.5}})", "train.max_steps", "expected an integer"},
    {"null_for_integer", R"({"train": {"batch_size": null}})", "train.batch_size", "got null"},
    {"string_for_boolean", R"({"data": {"random_flip": "yes"}})", "data.random_flip", "expected a boolean"},
    {"string_for_number", R"({"train": {"learning_rate": "1e-4"}})", "train.learning_rate", "expected a number"},
    {"scalar_for_list", R"({"model": {"block_out_channels": 64}})", "model.block_out_channels", "expected a list"},
    {"bad_list_element", R"({"model": {"block_out_channels": [32, "64", 128]}})", "model.block_out_channels[1]",
     "expected an integer"},
    {"integer_overflow", R"({"train": {"batch_size": 4294967296}})", "train.batch_size", "expected an integer in"},
    {"wrong_type_in_optional", R"({"model": {"num_class_embeds": "ten"}})", "model.num_class_embeds", "expected an integer"},
    // out of range
    {"below_minimum", R"({"train": {"batch_size": 0}})", "train.batch_size", "must be >= 1"},
    {"open_interval_bound", R"({"diffusion": {"beta_start": 0}})", "diffusion.beta_start", "must be in (0, 1)"},
    {"half_open_interval", R"({"model": {"dropout": 1.0}})", "model.dropout", "must be in [0, 1)"},
    {"negative_seed", R"({"run": {"seed": -1}})", "run.seed", "must be >= 0"},
    {"list_element_range", R"({"model": {"block_out_channels": [32, 64, 0]}})", "model.block_out_channels[2]", "must be >= 1"},
    {"empty_list", R"({"model": {"block_out_channels": [], "down_block_types": [], "up_block_types": []}})",
     "model.block_out_channels", "must not be an empty list"},
    {"empty_string", R"({"run": {"output_dir": ""}})", "run.output_dir", "must not be empty"},
    {"optional_range", R"({"diffusion": {"snr_gamma": 0}})", "diffusion.snr_gamma", "must be > 0"},
    // enums
    {"unknown_enum_lists_allowed", R"({"diffusion": {"beta_schedule": "cosine"}})", "diffusion.beta_schedule",
     "allowed: linear | scaled_linear | squaredcos_cap_v2 | sigmoid"},
    {"enum_did_you_mean", R"({"diffusion": {"prediction_type": "v-prediction"}})", "diffusion.prediction_type",
     "did you mean \"v_prediction\""},
    {"unknown_enum_in_list", R"({"model": {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}})",
     "model.down_block_types[1]", "unknown value"},
    {"up_block_in_down_list", R"({"model": {"down_block_types": ["DownBlock2D", "UpBlock2D", "DownBlock2D"]}})",
     "model.down_block_types[1]", "is not a down block"},
    {"bad_device", R"({"run": {"device": "gpu"}})", "run.device", "allowed: auto | cpu | cuda | cuda:N"},
    {"bad_run_name", R"({"run": {"name": "a/b"}})", "run.name", "may only use"},
    // cross-field
    {"block_count_mismatch", R"({"model": {"up_block_types": ["UpBlock2D", "UpBlock2D"]}})", "model.up_block_types",
     "has 2 entries but model.block_out_channels has 3"},
    {"groups_do_not_divide", R"({"model": {"norm_num_groups": 12}})", "model.block_out_channels[0]",
     "not divisible by model.norm_num_groups = 12"},
    {"head_dim_does_not_divide", R"({"model": {"attention_head_dim": 48}})", "model.attention_head_dim", "does not divide"},
    {"sample_size_not_divisible", R"({"model": {"sample_size": 30}, "data": {"resolution": 30}})", "model.sample_size",
     "not divisible by 4"},
    {"model_data_channels", R"({"data": {"channels": 3}})", "model.in_channels", "differs from data.channels = 3"},
    {"model_data_resolution", R"({"data": {"resolution": 64}})", "model.sample_size", "differs from data.resolution = 64"},
    {"data_channels_1_or_3", R"({"data": {"channels": 2}, "model": {"in_channels": 2, "out_channels": 2}})", "data.channels",
     "must be 1 or 3"},
    {"beta_order", R"({"diffusion": {"beta_start": 0.03}})", "diffusion.beta_start", "must be below diffusion.beta_end"},
    {"zero_snr_needs_v", R"({"diffusion": {"rescale_betas_zero_snr": true}})", "diffusion.rescale_betas_zero_snr",
     "v_prediction"},
    {"inference_steps_exceed_T", R"({"sampling": {"num_inference_steps": 2000}})", "sampling.num_inference_steps",
     "exceeds diffusion.num_train_timesteps = 1000"},
    {"guidance_needs_classes", R"({"sampling": {"guidance_scale": 3.0}})", "sampling.guidance_scale", "class-conditional"},
    {"solver_order_range", R"({"sampling": {"solver_order": 4}})", "sampling.solver_order", "must be in [1, 3]"},
    {"unknown_sampler_lists_allowed", R"({"sampling": {"sampler": "dpm++"}})", "sampling.sampler",
     "allowed: ddpm | ddim | dpm_solver_multistep | unipc_multistep | euler_ancestral"},
    {"karras_needs_multistep", R"({"sampling": {"sampler": "ddim", "use_karras_sigmas": true}})", "sampling.use_karras_sigmas",
     "needs sampling.sampler = dpm_solver_multistep or unipc_multistep, got ddim"},
    {"class_filter_label_range", R"({"model": {"num_class_embeds": 10}, "data": {"class_filter": [3, 10]}})",
     "data.class_filter[1]", "not below model.num_class_embeds = 10"},
    {"subset_smaller_than_batch", R"({"data": {"subset": 10}})", "data.subset", "less than one batch"},
    {"fp16_on_cpu", R"({"run": {"device": "cpu"}, "train": {"mixed_precision": "fp16"}})", "train.mixed_precision",
     "fp16 needs CUDA"},
    {"nccl_on_cpu", R"({"run": {"device": "cpu"}, "distributed": {"backend": "nccl"}})", "distributed.backend",
     "nccl needs CUDA"},
    {"ema_min_above_max", R"({"ema": {"min_decay": 0.99999}})", "ema.min_decay", "exceeds ema.decay"},
    {"too_many_levels", R"({"model": {"block_out_channels": [8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8],
       "down_block_types": ["DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D",
         "DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D",
         "DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D","DownBlock2D"],
       "up_block_types": ["UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D",
         "UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D",
         "UpBlock2D","UpBlock2D","UpBlock2D","UpBlock2D"]}})",
     "model.block_out_channels", "at most 16"},
    {"name_with_control_characters_is_escaped", R"({"run": {"name": "a\u0000b\u001b"}})", "run.name",
     R"("a\u0000b\u001b" may only use)"},
    {"keep_every_not_multiple", R"({"checkpoint": {"every": 500, "keep_every": 1200}})", "checkpoint.keep_every",
     "not a multiple of checkpoint.every = 500"},
};

INSTANTIATE_TEST_SUITE_P(Cases, BadConfig, ::testing::ValuesIn(kBadCases),
                         [](const ::testing::TestParamInfo<BadCase>& param) { return std::string(param.param.name); });

// diffusion.formulation = edm: the sampler default follows it, DDPM-only settings that would change
// the run are errors naming the key, and the samplers belong to one formulation each.
TEST(Config, EdmFormulationRules) {
  std::vector<std::string> notes;
  const Config edm = load_config("", {"diffusion.formulation=edm"}, &notes);
  EXPECT_EQ(edm.sampling.sampler, Sampler::heun);
  const Config euler = load_config("", {"diffusion.formulation=edm", "sampling.sampler=euler"});
  EXPECT_EQ(euler.sampling.sampler, Sampler::euler);
  auto errs = errors_for(R"({"diffusion": {"formulation": "edm", "snr_gamma": 5, "prediction_type": "v_prediction",
                                           "sigma_min": 90}, "sampling": {"sampler": "unipc_multistep"}})");
  const std::string all = joined(errs);
  EXPECT_EQ(errs.size(), 4u) << all;
  for (const char* want :
       {"sampling.sampler: unipc_multistep is a DDPM sampler; with diffusion.formulation = edm use heun or euler",
        "diffusion.sigma_min: 90 must be below diffusion.sigma_max = 80", "diffusion.snr_gamma: 5 is a DDPM loss",
        "diffusion.prediction_type: v_prediction is not defined for diffusion.formulation = edm"})
    EXPECT_NE(all.find(want), std::string::npos) << want << "\n" << all;
  errs = errors_for(R"({"sampling": {"sampler": "heun"}})");
  ASSERT_EQ(errs.size(), 1u) << joined(errs);
  EXPECT_NE(errs[0].find("sampling.sampler: heun is an EDM sampler; with diffusion.formulation = ddpm use ddpm, ddim"),
            std::string::npos)
      << errs[0];
  // EDM has no discrete timesteps: more sampling steps than diffusion.num_train_timesteps are fine.
  EXPECT_NO_THROW(load_config("", {"diffusion.formulation=edm", "sampling.num_inference_steps=2000"}));
}

TEST(Config, ReportsEveryProblemAtOnce) {
  const auto errs = errors_for(R"({"run": {"nmae": "x", "seed": -1}, "train": {"batch_size": "a"}})");
  EXPECT_EQ(errs.size(), 3u) << joined(errs);
}

// ---------------------------------------------------------------------------------------------
// Files.

std::string load_error(const fs::path& p) {
  try {
    load_config(p.string());
  } catch (const ConfigError& e) {
    return e.what();
  }
  return {};
}

TEST(ConfigFile, MissingFileIsNamed) {
  EXPECT_NE(load_error("/nonexistent/x.json").find("/nonexistent/x.json: no such file"), std::string::npos);
}

TEST(ConfigFile, DirectoryIsRejected) {
  EXPECT_NE(load_error(fs::temp_directory_path()).find("not a regular file"), std::string::npos);
}

TEST(ConfigFile, InvalidJsonGivesLineAndColumn) {
  const auto p = temp_file("trailing_comma.json", "{\n  \"run\": {\n    \"name\": \"x\",\n  }\n}\n");
  const std::string err = load_error(p);
  EXPECT_NE(err.find(p.string() + ":4:3: invalid JSON"), std::string::npos) << err;
}

// Fuzzing found that a number beyond a double escaped as nlohmann's out_of_range (not a
// parse_error) and ended the process.
TEST(ConfigFile, NumberBeyondADoubleIsAConfigError) {
  for (const char* number : {"1e30832", "-1e400"}) {
    const auto p = temp_file("huge.json", std::string(R"({"model": {"sample_size": )") + number + "}}");
    const std::string err = load_error(p);
    EXPECT_NE(err.find(p.string() + ": invalid JSON: number overflow parsing '" + number + "' (beyond the range of a double)"),
              std::string::npos)
        << err;
  }
}

TEST(ConfigFile, DuplicateKeyIsRejectedWithPath) {
  const auto p = temp_file("dup.json", R"({"train": {"batch_size": 8, "batch_size": 16}})");
  const std::string err = load_error(p);
  EXPECT_NE(err.find("train.batch_size: duplicate key"), std::string::npos) << err;
}

TEST(ConfigFile, DeepNestingIsRejectedQuickly) {
  std::string deep;
  for (int i = 0; i < 100000; ++i) deep += "{\"a\":";
  deep += "1";
  for (int i = 0; i < 100000; ++i) deep += "}";
  const auto p = temp_file("deep.json", deep);
  EXPECT_NE(load_error(p).find("nested deeper than"), std::string::npos);
}

TEST(ConfigFile, TopLevelMustBeAnObject) {
  const auto p = temp_file("array.json", "[1, 2]");
  EXPECT_NE(load_error(p).find("the top level must be a JSON object, got a list"), std::string::npos);
}

TEST(ConfigFile, PresetsAreValidAndMatchTheirPapers) {
  for (const char* name : {"quickstart", "quickstart_edm", "fashion_mnist", "cifar10_ddpm", "cifar10_edm"}) {
    SCOPED_TRACE(name);
    EXPECT_NO_THROW(load_config(test::source_dir() + "/configs/" + name + ".json"));
  }
  // Ho et al. 2020, Appendix B: ch 128, multipliers (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1.
  const Config ddpm = load_config(test::source_dir() + "/configs/cifar10_ddpm.json");
  EXPECT_EQ(ddpm.model.block_out_channels, (std::vector<int>{128, 256, 256, 256}));
  EXPECT_EQ(ddpm.model.layers_per_block, 2);
  EXPECT_EQ(ddpm.model.down_block_types[1], BlockType::AttnDownBlock2D);
  EXPECT_DOUBLE_EQ(ddpm.model.dropout, 0.1);
  EXPECT_EQ(ddpm.data.dataset, DatasetKind::cifar10);
  // Karras et al. 2022, Table 7 and appendix F.2 (CIFAR-10, DDPM++ in EDM's formulation): 3 levels of
  // 256 channels at 32, 16, 8, 4 blocks each, attention at 16x16, dropout 0.13; batch 512, Adam at
  // lr 1e-3 ramped over 10 Mimg, 200 Mimg, EMA half-life 0.5 Mimg; Heun with 18 steps (35 NFE).
  const Config edm = load_config(test::source_dir() + "/configs/cifar10_edm.json");
  EXPECT_EQ(edm.diffusion.formulation, Formulation::edm);
  EXPECT_EQ(edm.diffusion, [] {
    DiffusionConfig d;
    d.formulation = Formulation::edm;
    return d;
  }()) << "Table 1's σ_min, σ_max, σ_data, ρ, P_mean, P_std are the defaults";
  EXPECT_EQ(edm.model.block_out_channels, (std::vector<int>{256, 256, 256}));
  EXPECT_EQ(edm.model.layers_per_block, 4);
  EXPECT_EQ(edm.model.down_block_types[1], BlockType::AttnDownBlock2D);
  EXPECT_DOUBLE_EQ(edm.model.dropout, 0.13);
  EXPECT_EQ(int64_t{edm.train.batch_size} * edm.train.max_steps, int64_t{200'000'000});
  EXPECT_NEAR(static_cast<double>(edm.train.batch_size) * edm.train.lr_warmup_steps, 10e6, 512);
  EXPECT_DOUBLE_EQ(edm.train.learning_rate, 1e-3);
  EXPECT_NEAR(edm.ema.decay, std::pow(0.5, 512.0 / 500e3), 1e-5);
  EXPECT_EQ(edm.sampling.sampler, Sampler::heun);
  EXPECT_EQ(edm.sampling.num_inference_steps, 18);
  // The EDM quickstart is the quickstart but for its formulation, with Heun at the same 25 network
  // evaluations as the quickstart's UniPC (13 steps: 2·13 - 1).
  Config quick_edm = load_config(test::source_dir() + "/configs/quickstart_edm.json");
  EXPECT_EQ(quick_edm.diffusion.formulation, Formulation::edm);
  EXPECT_EQ(2 * quick_edm.sampling.num_inference_steps - 1,
            load_config(test::source_dir() + "/configs/quickstart.json").sampling.num_inference_steps);
  quick_edm.run.name = "quickstart";
  quick_edm.diffusion = DiffusionConfig{};
  quick_edm.diffusion.snr_gamma = 5.0;
  quick_edm.sampling = SamplingConfig{};
  EXPECT_EQ(quick_edm, load_config(test::source_dir() + "/configs/quickstart.json"));
  // The quickstart file is the built-in default job, but for two settings tuned for it.
  Config expected;
  expected.data.preload = true;  // Fashion-MNIST is 47 MB: the quickstart keeps it in memory (no loader threads)
  expected.diffusion.snr_gamma = 5.0;  // min-SNR-5 won the quickstart search (docs/PERFORMANCE.md); diffusers' default is none
  EXPECT_EQ(load_config(test::source_dir() + "/configs/quickstart.json"), expected);
}

// ---------------------------------------------------------------------------------------------
// Precedence and --set.

TEST(ConfigPrecedence, DefaultsThenFileThenSet) {
  const auto p = temp_file("prec.json", R"({"train": {"batch_size": 32, "learning_rate": 0.001}, "run": {"name": "fromfile"}})");
  const Config cfg = load_config(p.string(), {"train.batch_size=16", "run.name=a", "run.name=b"});
  EXPECT_EQ(cfg.train.batch_size, 16);              // --set beats the file
  EXPECT_DOUBLE_EQ(cfg.train.learning_rate, 0.001); // the file beats the default
  EXPECT_EQ(cfg.train.max_steps, Config{}.train.max_steps);  // untouched keys keep their default
  EXPECT_EQ(cfg.run.name, "b");                     // the last --set wins
}

// A short run with every other key at its default trains: the default warmup follows max_steps,
// and an explicit warmup longer than the run is accepted, as diffusers' get_scheduler does, with a warning.
TEST(ConfigPrecedence, WarmupDefaultFollowsTheRunLength) {
  std::vector<std::string> notes;
  Config cfg = load_config("", {"train.max_steps=20"}, &notes);
  EXPECT_EQ(cfg.train.lr_warmup_steps, 20);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("the default 100 exceeds train.max_steps = 20; using 20"), std::string::npos) << notes[0];

  notes.clear();
  cfg = load_config("", {"train.max_steps=20", "train.lr_warmup_steps=50"}, &notes);
  EXPECT_EQ(cfg.train.lr_warmup_steps, 50);  // the user's value stands
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("train.lr_warmup_steps: 50 exceeds train.max_steps = 20; the learning rate ends at 0.38 of"),
            std::string::npos)
      << notes[0];  // the last step (19) runs at 19/50

  notes.clear();
  const auto p = temp_file("warmup.json", R"({"train": {"max_steps": 30, "lr_warmup_steps": 100}})");
  EXPECT_EQ(load_config(p.string(), {}, &notes).train.lr_warmup_steps, 100);  // given in the file: kept
  EXPECT_EQ(notes.size(), 1u);

  notes.clear();
  EXPECT_EQ(load_config("", {"train.max_steps=500"}, &notes).train.lr_warmup_steps, 100);  // fits: untouched, no note
  EXPECT_TRUE(notes.empty());
}

TEST(ConfigPrecedence, SetIsTypedByTheField) {
  const Config cfg = load_config("", {"run.name=123", "model.block_out_channels=32,64,64", "model.num_class_embeds=10",
                                      "model.down_block_types=DownBlock2D,AttnDownBlock2D,DownBlock2D",
                                      "diffusion.snr_gamma=5", "train.learning_rate=1e-4", "data.random_flip=true",
                                      "checkpoint.resume=latest", "run.device=\"cpu\""});
  EXPECT_EQ(cfg.run.name, "123");  // a string field keeps digits as text
  EXPECT_EQ(cfg.model.block_out_channels, (std::vector<int>{32, 64, 64}));
  EXPECT_EQ(cfg.model.num_class_embeds, 10);
  EXPECT_EQ(cfg.diffusion.snr_gamma, 5.0);
  EXPECT_DOUBLE_EQ(cfg.train.learning_rate, 1e-4);
  EXPECT_TRUE(cfg.data.random_flip);
  EXPECT_EQ(cfg.checkpoint.resume, "latest");
  EXPECT_EQ(cfg.run.device, "cpu");
  EXPECT_EQ(load_config("", {"model.num_class_embeds=3", "model.num_class_embeds=null"}).model.num_class_embeds, std::nullopt);
}

TEST(ConfigPrecedence, BadSetIsReportedWithThePath) {
  auto first_error = [](const std::vector<std::string>& sets) -> std::string {
    try {
      load_config("", sets);
    } catch (const ConfigError& e) {
      return e.messages().front();
    }
    return {};
  };
  EXPECT_EQ(first_error({"train.batch_size=abc"}), "train.batch_size: expected an integer, got string \"abc\"");
  EXPECT_NE(first_error({"train.bach_size=3"}).find("train.bach_size: unknown key; did you mean \"batch_size\""), std::string::npos);
  EXPECT_NE(first_error({"train.batch_size"}).find("expected key.path=value"), std::string::npos);
  EXPECT_NE(first_error({"run.name.x=1"}).find("run.name is not a section"), std::string::npos);
  EXPECT_NE(first_error({"train.batch_size=0"}).find("train.batch_size: must be >= 1"), std::string::npos);
  // Enum lists: items split on commas only; an empty or mangled item is an error, not dropped.
  EXPECT_NE(first_error({"model.down_block_types=DownBlock2D,,DownBlock2D"}).find("model.down_block_types[1]: unknown value \"\""),
            std::string::npos);
  EXPECT_NE(first_error({"model.down_block_types=DownBlock2D_,AttnDownBlock2D,DownBlock2D"})
                .find("model.down_block_types[0]: unknown value \"DownBlock2D_\""),
            std::string::npos);
}

TEST(ConfigPrecedence, SetListsAcceptOneValue) {
  EXPECT_EQ(load_config("", {"data.class_filter=3"}).data.class_filter, (std::vector<int>{3}));
  EXPECT_EQ(load_config("", {"data.class_filter=[]"}).data.class_filter, (std::vector<int>{}));
  EXPECT_EQ(load_config("", {"model.down_block_types= DownBlock2D , AttnDownBlock2D,DownBlock2D"}).model.down_block_types[1],
            BlockType::AttnDownBlock2D);
}

// ---------------------------------------------------------------------------------------------
// Round trips, defaults, enums, docs.

TEST(ConfigRoundTrip, ResolvedConfigReloadsIdentically) {
  Config cfg = load_config("", {"model.num_class_embeds=10", "diffusion.snr_gamma=5", "train.learning_rate=0.00012345678901234",
                                "data.class_filter=1,2", "run.seed=9007199254740993", "ema.power=0.6666666666666666"});
  const std::string text = config_to_string(cfg);
  const Config back = config_from_json(json::parse(text));
  EXPECT_EQ(back, cfg);
  EXPECT_EQ(config_to_string(back), text);
  EXPECT_EQ(back.run.seed, 9007199254740993LL);  // int64 survives (not squeezed through a double)
  // Every key is written, in declaration order, so the file documents the run.
  const json j = json::parse(text);
  EXPECT_EQ(j.begin().key(), "run");
  EXPECT_TRUE(j["model"].contains("num_class_embeds"));
  EXPECT_TRUE(j["diffusion"]["snr_gamma"].is_number());
  EXPECT_TRUE(json::parse(config_to_string(Config{}))["diffusion"]["snr_gamma"].is_null());
}

TEST(ConfigDefaults, AreValid) { EXPECT_TRUE(validate(Config{}).empty()) << joined(validate(Config{})); }

TEST(ConfigEnums, SpellingsMatchDiffusers) {
  EXPECT_EQ(to_string(TimeScaleShift::default_), "default");
  EXPECT_EQ(to_string(DistBackend::auto_), "auto");
  EXPECT_EQ(enum_names<BetaSchedule>(), (std::vector<std::string>{"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"}));
  EXPECT_EQ(enum_from_string<PredictionType>("v_prediction"), PredictionType::v_prediction);
  EXPECT_EQ(enum_from_string<PredictionType>("v-prediction"), std::nullopt);
}

TEST(ConfigSuggest, EditDistance) {
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);  // the textbook Levenshtein example
  EXPECT_EQ(edit_distance("nmae", "name"), 1u);       // a transposition is one edit
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("same", "same"), 0u);
}

TEST(ConfigDocs, ConfigMdIsCurrent) {
  std::ifstream in(test::source_dir() + "/docs/CONFIG.md");
  ASSERT_TRUE(in) << "docs/CONFIG.md is missing";
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), config_reference_markdown()) << "docs/CONFIG.md is out of date: run `make docs`";
}

}  // namespace
}  // namespace difftrain

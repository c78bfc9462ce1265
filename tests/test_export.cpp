// Export to diffusers' folder layout and import back: the key names and shapes of the CIFAR-10
// preset against diffusers' UNet2DModel structure (listed here from unet_2d.py's blocks), the
// header against an independent safetensors reader, diffusers itself loading the folder
// (UNet2DModel, DDPMScheduler, DDPMPipeline; tests/export/check_diffusers.py) with the same forward
// output, an exact round trip (also through diffusers' own save_pretrained), deterministic bytes,
// and clear errors for folders difftrain cannot load.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "difftrain/checkpoint.h"
#include "difftrain/export.h"
#include "difftrain/safetensors.h"
#include "difftrain/scheduler.h"
#include "difftrain/train_state.h"
#include "numerics.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// ---------------------------------------------------------------------------------------------
// An independent safetensors reader: the 8-byte little-endian header size, the JSON header, and
// the rules of the format (offsets contiguous from 0, the file ends where the last tensor ends).
struct HeaderEntry {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};
struct Header {
  std::map<std::string, HeaderEntry> tensors;
  std::vector<std::string> order;  // by data offset
  std::map<std::string, std::string> metadata;
  uint64_t header_size = 0;
};

Header read_header(const fs::path& file) {
  const std::string bytes = slurp(file);
  EXPECT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  Header h;
  h.header_size = n;
  const json j = json::parse(bytes.substr(8, n));
  std::vector<std::pair<uint64_t, std::string>> by_offset;
  for (const auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, s] : v.items()) h.metadata[k] = s.get<std::string>();
      continue;
    }
    HeaderEntry e{v.at("dtype").get<std::string>(), v.at("shape").get<std::vector<int64_t>>(),
                  v.at("data_offsets")[0].get<uint64_t>(), v.at("data_offsets")[1].get<uint64_t>()};
    h.tensors[name] = e;
    by_offset.emplace_back(e.begin, name);
  }
  std::sort(by_offset.begin(), by_offset.end());
  uint64_t at = 0;
  for (const auto& [begin, name] : by_offset) {
    const auto& e = h.tensors[name];
    int64_t numel = 1;
    for (int64_t d : e.shape) numel *= d;
    const uint64_t item = e.dtype == "F32" ? 4 : e.dtype == "BF16" || e.dtype == "F16" ? 2 : e.dtype == "F64" ? 8 : 0;
    EXPECT_EQ(begin, at) << name << ": tensors must follow each other without gaps";
    EXPECT_EQ(e.end - e.begin, item * static_cast<uint64_t>(numel)) << name;
    at = e.end;
    h.order.push_back(name);
  }
  EXPECT_EQ(bytes.size(), 8 + n + at) << "the file ends where the last tensor ends";
  return h;
}

// ---------------------------------------------------------------------------------------------
// diffusers' UNet2DModel structure (models/unets/unet_2d.py with DownBlock2D / AttnDownBlock2D,
// UNetMidBlock2D, UpBlock2D / AttnUpBlock2D, ResnetBlock2D, Attention, Downsample2D, Upsample2D),
// written out independently of difftrain's UNet.
std::vector<std::pair<std::string, std::vector<int64_t>>> diffusers_layout(const ModelConfig& m) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> keys;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) { keys.emplace_back(name, std::move(shape)); };
  auto wb = [&](const std::string& p, std::vector<int64_t> w, int64_t b) {
    add(p + ".weight", std::move(w));
    add(p + ".bias", {b});
  };
  const auto& ch = m.block_out_channels;
  const int64_t levels = static_cast<int64_t>(ch.size()), c0 = ch[0], temb = 4 * c0;
  auto resnet = [&](const std::string& p, int64_t in, int64_t out) {
    wb(p + ".norm1", {in}, in);
    wb(p + ".conv1", {out, in, 3, 3}, out);
    wb(p + ".time_emb_proj", {m.resnet_time_scale_shift == TimeScaleShift::scale_shift ? 2 * out : out, temb},
       m.resnet_time_scale_shift == TimeScaleShift::scale_shift ? 2 * out : out);
    wb(p + ".norm2", {out}, out);
    wb(p + ".conv2", {out, out, 3, 3}, out);
    if (in != out) wb(p + ".conv_shortcut", {out, in, 1, 1}, out);
  };
  auto attention = [&](const std::string& p, int64_t c, bool norm) {
    if (norm) wb(p + ".group_norm", {c}, c);
    for (const char* proj : {".to_q", ".to_k", ".to_v", ".to_out.0"}) wb(p + proj, {c, c}, c);
  };
  wb("conv_in", {c0, m.in_channels, 3, 3}, c0);
  wb("time_embedding.linear_1", {temb, c0}, temb);
  wb("time_embedding.linear_2", {temb, temb}, temb);
  if (m.num_class_embeds) add("class_embedding.weight", {*m.num_class_embeds + 1, temb});
  for (int64_t i = 0; i < levels; ++i) {
    const std::string p = "down_blocks." + std::to_string(i);
    const bool attn = m.down_block_types[static_cast<size_t>(i)] == BlockType::AttnDownBlock2D;
    for (int64_t j = 0; j < m.layers_per_block; ++j) {
      resnet(p + ".resnets." + std::to_string(j), j == 0 ? (i == 0 ? c0 : ch[i - 1]) : ch[i], ch[i]);
    }
    if (attn)
      for (int64_t j = 0; j < m.layers_per_block; ++j) attention(p + ".attentions." + std::to_string(j), ch[i], true);
    if (i < levels - 1) wb(p + ".downsamplers.0.conv", {ch[i], ch[i], 3, 3}, ch[i]);
  }
  const int64_t cl = ch.back();
  resnet("mid_block.resnets.0", cl, cl);
  if (m.add_attention) attention("mid_block.attentions.0", cl, m.resnet_time_scale_shift == TimeScaleShift::default_);
  resnet("mid_block.resnets.1", cl, cl);
  for (int64_t i = 0; i < levels; ++i) {
    const std::string p = "up_blocks." + std::to_string(i);
    const int64_t out = ch[levels - 1 - i], prev = i == 0 ? cl : ch[levels - i], in = ch[std::max<int64_t>(levels - 2 - i, 0)];
    const bool attn = m.up_block_types[static_cast<size_t>(i)] == BlockType::AttnUpBlock2D;
    for (int64_t j = 0; j <= m.layers_per_block; ++j) {
      const int64_t skip = j == m.layers_per_block ? in : out;
      resnet(p + ".resnets." + std::to_string(j), (j == 0 ? prev : out) + skip, out);
    }
    if (attn)
      for (int64_t j = 0; j <= m.layers_per_block; ++j) attention(p + ".attentions." + std::to_string(j), out, true);
    if (i < levels - 1) wb(p + ".upsamplers.0.conv", {out, out, 3, 3}, out);
  }
  wb("conv_norm_out", {c0}, c0);
  wb("conv_out", {m.out_channels, c0, 3, 3}, m.out_channels);
  return keys;
}

NamedTensors parameters_of(UNet2DModel& m) {
  NamedTensors out;
  for (const auto& item : m->named_parameters()) out.emplace_back(item.key(), item.value().detach().clone());
  return out;
}

// A model with random weights moved off their initialisation (GroupNorm 1/0 would hide names).
UNet2DModel random_model(const ModelConfig& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  UNet2DModel m(cfg);
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.add_(0.05 * torch::randn_like(p));
  m->eval();
  return m;
}

ModelConfig small_model(bool classes) {
  ModelConfig m;
  m.sample_size = 16;
  m.in_channels = m.out_channels = 3;
  m.block_out_channels = {16, 32};
  m.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  m.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  m.attention_head_dim = 8;
  m.norm_num_groups = 8;
  if (classes) {
    m.num_class_embeds = 10;
    m.resnet_time_scale_shift = TimeScaleShift::scale_shift;
    m.layers_per_block = 2;
    m.attention_head_dim = std::nullopt;
    m.flip_sin_to_cos = false;
    m.freq_shift = 1;
    m.norm_eps = 1e-6;
  }
  return m;
}

class Export : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("difftrain_export_{}_{}", ::getpid(), ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  // Runs tests/export/check_diffusers.py on case directories; false (and a failure) if it fails.
  bool check_with_diffusers(const std::vector<fs::path>& cases) const {
    std::string cmd = fmt::format("{} {}/tests/export/check_diffusers.py", test::python(), test::source_dir());
    for (const auto& c : cases) cmd += fmt::format(" {}", c.string());
    cmd += fmt::format(" >{} 2>&1", (dir_ / "python.log").string());
    if (std::system(cmd.c_str()) == 0) return true;
    ADD_FAILURE() << "check_diffusers.py failed:\n" << slurp(dir_ / "python.log");
    return false;
  }
  fs::path dir_;
};

#define REQUIRE_PYTHON() \
  if (test::python().empty()) GTEST_SKIP() << "no venv python with diffusers (make test installs it)"

TEST_F(Export, Cifar10PresetHasDiffusersKeyNamesAndShapes) {
  const ModelConfig cfg = load_config(test::source_dir() + "/configs/cifar10_ddpm.json").model;
  UNet2DModel m(cfg);
  export_diffusers(dir_, cfg, DiffusionConfig{}, parameters_of(m));
  const Header h = read_header(dir_ / kDiffusersWeightsFile);
  const auto expected = diffusers_layout(cfg);
  ASSERT_EQ(h.tensors.size(), expected.size());
  int64_t total = 0;
  std::vector<std::string> expected_order;
  for (const auto& [name, shape] : expected) {
    ASSERT_TRUE(h.tensors.count(name)) << "missing " << name;
    EXPECT_EQ(h.tensors.at(name).shape, shape) << name;
    EXPECT_EQ(h.tensors.at(name).dtype, "F32") << name;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    total += n;
    expected_order.push_back(name);
  }
  std::sort(expected_order.begin(), expected_order.end());
  EXPECT_EQ(h.order, expected_order) << "tensors are stored by name, as safetensors.torch.save_file stores them";
  EXPECT_EQ(total, 35746307) << "the DDPM CIFAR-10 model (Ho et al. 2020)";
  EXPECT_EQ((8 + h.header_size) % 8, 0u) << "data starts 8-byte aligned";
  EXPECT_EQ(h.metadata.at("format"), "pt");
  // A few names spelled out, as diffusers' own CIFAR-10 checkpoint (google/ddpm-cifar10-32) has them.
  for (const char* k : {"down_blocks.1.attentions.1.to_out.0.weight", "up_blocks.2.attentions.2.group_norm.bias",
                        "up_blocks.0.resnets.2.conv_shortcut.weight", "mid_block.attentions.0.to_q.weight",
                        "down_blocks.2.downsamplers.0.conv.weight", "up_blocks.2.upsamplers.0.conv.bias"})
    EXPECT_TRUE(h.tensors.count(k)) << k;
  EXPECT_FALSE(h.tensors.count("down_blocks.3.downsamplers.0.conv.weight"));
  const json config = json::parse(slurp(dir_ / "config.json"));
  EXPECT_EQ(config["_class_name"], "UNet2DModel");
  EXPECT_EQ(config["block_out_channels"], json({128, 256, 256, 256}));
  EXPECT_EQ(config["down_block_types"], json({"DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"}));
  EXPECT_EQ(config["attention_head_dim"], nullptr);
  EXPECT_EQ(config["norm_eps"], 1e-6);
  EXPECT_EQ(json::parse(slurp(dir_ / "scheduler_config.json"))["_class_name"], "DDPMScheduler");
}

// diffusers loads each folder (UNet2DModel, DDPMScheduler, DDPMPipeline), with the same state-dict
// keys in the same order, and its forward equals difftrain's: F32 exactly as exported, BF16 as the
// rounded weights; the scheduler config is read field by field.
TEST_F(Export, DiffusersLoadsTheFolderWithTheSameOutput) {
  REQUIRE_PYTHON();
  struct Case {
    std::string name;
    ModelConfig model;
    DiffusionConfig diffusion;
    ExportDtype dtype;
  };
  DiffusionConfig other;
  other.beta_schedule = BetaSchedule::squaredcos_cap_v2;
  other.prediction_type = PredictionType::v_prediction;
  other.variance_type = VarianceType::fixed_large;
  other.timestep_spacing = TimestepSpacing::trailing;
  other.clip_sample = false;
  other.num_train_timesteps = 500;
  other.steps_offset = 1;
  const std::vector<Case> cases = {{"uncond_f32", small_model(false), DiffusionConfig{}, ExportDtype::f32},
                                   {"classes_scale_shift_f32", small_model(true), other, ExportDtype::f32},
                                   {"uncond_bf16", small_model(false), DiffusionConfig{}, ExportDtype::bf16}};
  std::vector<fs::path> dirs;
  std::vector<UNet2DModel> models;
  std::vector<std::map<std::string, at::Tensor>> inputs;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& c = cases[i];
    const fs::path d = dir_ / c.name;
    UNet2DModel m = random_model(c.model, 100 + i);
    ExportOptions eo;
    eo.dtype = c.dtype;
    export_diffusers(d / "export", c.model, c.diffusion, parameters_of(m), eo);
    if (c.dtype == ExportDtype::bf16) {  // difftrain's forward with the weights as stored
      torch::NoGradGuard no_grad;
      for (auto& p : m->parameters()) p.copy_(p.to(torch::kBFloat16).to(torch::kFloat));
    }
    torch::manual_seed(7);
    std::map<std::string, at::Tensor> in = {{"sample", torch::randn({3, 3, 16, 16})},
                                            {"timesteps", torch::tensor({0, 17, 399}, torch::kLong)}};
    if (c.model.num_class_embeds) in["class_labels"] = torch::tensor({0, 9, 10}, torch::kLong);  // 10: the null class
    save_safetensors(d / "inputs.safetensors", NamedTensors(in.begin(), in.end()));
    dirs.push_back(d), models.push_back(m), inputs.push_back(in);
  }
  ASSERT_TRUE(check_with_diffusers(dirs));

  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    const auto& c = cases[i];
    const json report = json::parse(slurp(dirs[i] / "diffusers.json"));
    const auto out = load_safetensors(dirs[i] / "diffusers.safetensors").by_name();
    EXPECT_EQ(report["unet_class"], "UNet2DModel");
    EXPECT_EQ(report["scheduler_class"], "DDPMScheduler");
    EXPECT_EQ(report["pipeline"], json({"DDPMPipeline", "UNet2DModel", "DDPMScheduler"}));
    // The state dict diffusers built from config.json: our names and shapes.
    const Header h = read_header(dirs[i] / "export" / kDiffusersWeightsFile);
    ASSERT_EQ(report["keys"].size(), h.tensors.size());
    for (const auto& key : report["keys"]) {
      const std::string name = key[0].get<std::string>();
      ASSERT_TRUE(h.tensors.count(name)) << name;
      EXPECT_EQ(key[1].get<std::vector<int64_t>>(), h.tensors.at(name).shape) << name;
    }
    EXPECT_EQ(h.tensors.begin()->second.dtype, c.dtype == ExportDtype::bf16 ? "BF16" : "F32");
    EXPECT_EQ(report["config"]["num_class_embeds"], c.model.num_class_embeds ? json(*c.model.num_class_embeds + 1) : json());
    // The forward pass.
    torch::NoGradGuard no_grad;
    const auto& in = inputs[i];
    const auto ours = models[i]->forward(in.at("sample"), in.at("timesteps"),
                                         in.count("class_labels") ? in.at("class_labels") : at::Tensor());
    const auto theirs = out.at("output");
    EXPECT_TRUE(test::as_accurate_as(ours, theirs, out.at("output64")))
        << "max |difference| " << (ours - theirs).abs().max().item<double>();
    // The scheduler: every field of scheduler_config.json as diffusers read it, and its ᾱ table.
    const auto& sc = report["scheduler_config"];
    const auto& d = c.diffusion;
    EXPECT_EQ(sc["num_train_timesteps"], d.num_train_timesteps);
    EXPECT_EQ(sc["beta_schedule"], to_string(d.beta_schedule));
    EXPECT_EQ(sc["prediction_type"], to_string(d.prediction_type));
    EXPECT_EQ(sc["variance_type"], to_string(d.variance_type));
    EXPECT_EQ(sc["timestep_spacing"], to_string(d.timestep_spacing));
    EXPECT_EQ(sc["clip_sample"], d.clip_sample);
    EXPECT_EQ(sc["steps_offset"], d.steps_offset);
    EXPECT_DOUBLE_EQ(sc["beta_start"].get<double>(), d.beta_start);
    EXPECT_DOUBLE_EQ(sc["beta_end"].get<double>(), d.beta_end);
    const NoiseSchedule schedule(SchedulerConfig::from(d));
    EXPECT_TRUE(torch::equal(schedule.alphas_cumprod(), out.at("alphas_cumprod")));  // the same float32 operations
  }
}

TEST_F(Export, RoundTripIsExact) {
  for (const bool classes : {false, true}) {
    SCOPED_TRACE(classes ? "class-conditional" : "unconditional");
    const ModelConfig cfg = small_model(classes);
    UNet2DModel m = random_model(cfg, 3);
    const auto weights = parameters_of(m);
    const fs::path d = dir_ / (classes ? "c" : "u");
    export_diffusers(d, cfg, DiffusionConfig{}, weights);
    const DiffusersUNet back = import_diffusers(d);
    EXPECT_EQ(back.model, cfg);
    ASSERT_EQ(back.weights.size(), weights.size());
    for (const auto& [name, t] : weights) EXPECT_TRUE(torch::equal(back.weights.at(name), t)) << name;
    if (classes) {
      EXPECT_EQ(json::parse(slurp(d / "config.json"))["num_class_embeds"], 11);
    }

    // BF16: the import holds exactly the rounded values.
    ExportOptions bf16;
    bf16.dtype = ExportDtype::bf16;
    export_diffusers(d / "bf16", cfg, DiffusionConfig{}, weights, bf16);
    const DiffusersUNet half = import_diffusers(d / "bf16");
    for (const auto& [name, t] : weights)
      EXPECT_TRUE(torch::equal(half.weights.at(name), t.to(torch::kBFloat16).to(torch::kFloat))) << name;
  }
}

// Through diffusers' own writer: DDPMPipeline.save_pretrained (the unet/ + scheduler/ layout)
// reads back to the same weights.
TEST_F(Export, ImportReadsWhatDiffusersSaves) {
  REQUIRE_PYTHON();
  const ModelConfig cfg = small_model(true);
  UNet2DModel m = random_model(cfg, 5);
  const auto weights = parameters_of(m);
  export_diffusers(dir_ / "case" / "export", cfg, DiffusionConfig{}, weights);
  ASSERT_TRUE(check_with_diffusers({dir_ / "case"}));
  ASSERT_TRUE(fs::exists(dir_ / "case" / "pipeline" / "unet" / kDiffusersWeightsFile));
  const DiffusersUNet back = import_diffusers(dir_ / "case" / "pipeline");
  EXPECT_EQ(back.model, cfg);
  for (const auto& [name, t] : weights) EXPECT_TRUE(torch::equal(back.weights.at(name), t)) << name;
}

TEST_F(Export, ExportIsDeterministic) {
  const ModelConfig cfg = small_model(true);
  UNet2DModel m = random_model(cfg, 9);
  ExportOptions eo;
  eo.metadata = {{"difftrain_step", "42"}};
  export_diffusers(dir_ / "a", cfg, DiffusionConfig{}, parameters_of(m), eo);
  export_diffusers(dir_ / "b", cfg, DiffusionConfig{}, parameters_of(m), eo);
  for (const char* f : {kDiffusersWeightsFile, "config.json", "scheduler_config.json", "model_index.json"}) {
    ASSERT_TRUE(fs::exists(dir_ / "a" / f)) << f;
    EXPECT_EQ(slurp(dir_ / "a" / f), slurp(dir_ / "b" / f)) << f;
  }
  EXPECT_EQ(read_header(dir_ / "a" / kDiffusersWeightsFile).metadata.at("difftrain_step"), "42");
}

// Absent keys mean diffusers' defaults: the defaults of UNet2DModel.__init__, read from diffusers.
TEST_F(Export, AbsentConfigKeysTakeDiffusersDefaults) {
  REQUIRE_PYTHON();
  const std::string cmd = fmt::format("{} {}/tests/export/check_diffusers.py --signature-defaults {} >{} 2>&1", test::python(),
                                      test::source_dir(), (dir_ / "defaults.json").string(), (dir_ / "python.log").string());
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(dir_ / "python.log");
  json full = json::parse(slurp(dir_ / "defaults.json"));
  full["sample_size"] = 64;
  EXPECT_EQ(model_config_from_diffusers({{"sample_size", 64}}, "minimal"), model_config_from_diffusers(full, "defaults"));
}

TEST_F(Export, ImportRejectsWhatItCannotLoadAndSaysWhy) {
  const ModelConfig cfg = small_model(false);
  UNet2DModel m = random_model(cfg, 1);
  auto weights = parameters_of(m);
  export_diffusers(dir_ / "good", cfg, DiffusionConfig{}, weights);
  auto expect_error = [](const fs::path& d, const std::string& needle, bool usage) {
    try {
      import_diffusers(d);
      ADD_FAILURE() << "no error for " << d;
    } catch (const UsageError& e) {
      EXPECT_TRUE(usage) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    } catch (const RuntimeError& e) {
      EXPECT_FALSE(usage) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto copy_with_config = [&](const std::string& name, const std::function<void(json&)>& edit) {
    fs::create_directories(dir_ / name);
    fs::copy_file(dir_ / "good" / kDiffusersWeightsFile, dir_ / name / kDiffusersWeightsFile);
    json c = json::parse(slurp(dir_ / "good" / "config.json"));
    edit(c);
    std::ofstream(dir_ / name / "config.json") << c.dump(2);
    return dir_ / name;
  };
  expect_error(dir_ / "nope", "no such directory", true);
  fs::create_directories(dir_ / "empty");
  expect_error(dir_ / "empty", "has no config.json", true);
  expect_error(copy_with_config("gelu", [](json& c) { c["act_fn"] = "gelu"; }), "act_fn = \"gelu\"", true);
  expect_error(copy_with_config("cond", [](json& c) { c["_class_name"] = "UNet2DConditionModel"; }), "UNet2DModel folders only",
               true);
  expect_error(copy_with_config("block", [](json& c) { c["down_block_types"][0] = "ResnetDownsampleBlock2D"; }),
               "model.down_block_types[0]", true);
  expect_error(copy_with_config("wide", [](json& c) { c["block_out_channels"] = {16, 64}; }),
               "down_blocks.1.resnets.0.conv1.weight has shape [32, 16, 3, 3], config.json implies [64, 16, 3, 3]", false);
  // A missing and an extra tensor.
  weights.pop_back();  // conv_out.bias
  weights.emplace_back("not_a_parameter", torch::zeros({2}));
  fs::create_directories(dir_ / "keys");
  fs::copy_file(dir_ / "good" / "config.json", dir_ / "keys" / "config.json");
  save_safetensors(dir_ / "keys" / kDiffusersWeightsFile, weights);
  expect_error(dir_ / "keys", "missing tensors: conv_out.bias", false);
  expect_error(dir_ / "keys", "unexpected tensors (not parameters of the model): not_a_parameter", false);
  // Pickled weights only.
  fs::create_directories(dir_ / "bin");
  fs::copy_file(dir_ / "good" / "config.json", dir_ / "bin" / "config.json");
  std::ofstream(dir_ / "bin" / "diffusion_pytorch_model.bin") << "pickle";
  expect_error(dir_ / "bin", "does not read", true);
}

TEST_F(Export, ArchitectureDifferencesNameEveryKey) {
  const ModelConfig a = small_model(false);
  ModelConfig b = a;
  EXPECT_TRUE(architecture_differences(a, b).empty());
  b.dropout = 0.1, b.sample_size = 32;  // change no weight
  EXPECT_TRUE(architecture_differences(a, b).empty());
  b.block_out_channels = {32, 64};
  b.num_class_embeds = 10;
  const auto diffs = architecture_differences(a, b);
  ASSERT_EQ(diffs.size(), 2u);
  EXPECT_EQ(diffs[0], "model.block_out_channels: folder [16,32], config [32,64]");
  EXPECT_EQ(diffs[1], "model.num_class_embeds: folder null, config 10");
}

TEST(Checkpoints, ResolveNamesWhatIsWrong) {
  const fs::path dir = fs::temp_directory_path() / fmt::format("difftrain_resolve_{}", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir / "run" / "checkpoints" / "step_00000010");
  auto message = [](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const UsageError& e) {
      return e.what();
    } catch (const CheckpointError& e) {  // a damaged checkpoint is a runtime error (exit 2)
      return e.what();
    }
    return "no UsageError or CheckpointError";
  };
  EXPECT_NE(message([&] { resolve_checkpoint("latest", dir / "missing"); }).find("does not exist"), std::string::npos);
  EXPECT_NE(message([&] { resolve_checkpoint("latest", dir / "run"); }).find("no usable checkpoint"), std::string::npos);
  EXPECT_NE(message([&] { resolve_checkpoint((dir / "nope").string(), {}); }).find("no such file"), std::string::npos);
  EXPECT_NE(message([&] { resolve_checkpoint((dir / "run/checkpoints/step_00000010").string(), {}); }).find("no manifest.json"),
            std::string::npos);
  EXPECT_EQ(run_dir_of_checkpoint(dir / "run/checkpoints/step_00000010"), dir / "run");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace difftrain

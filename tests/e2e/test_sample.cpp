// `difftrain sample`, `eval`, `export` and `train --init-from` end to end on small real runs
// (Fashion-MNIST subset at 16x16, as tests/e2e/test_train.cpp): deterministic PNGs, clear errors,
// diffusers' DDIMPipeline on the exported folder reproducing difftrain's samples pixel for pixel,
// weights that round-trip into a new run, and FID/KID with a tiny TorchScript network (statistics
// cached next to the run).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "difftrain/fid.h"
#include "difftrain/safetensors.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Result {
  int code = -1;
  std::string out, err;
};

class Sample : public ::testing::Test {
 protected:
  static fs::path root() { return fs::temp_directory_path() / ("difftrain_sample_" + std::to_string(::getpid())); }

  static void SetUpTestSuite() {
    fs::remove_all(root());
    fs::create_directories(root());
  }
  // Three short runs, each trained once per process when a test first needs it (ctest runs every
  // test in its own process): unconditional with EMA, class-conditional, and without EMA.
  void SetUp() override {
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    need("uncond", 30, {});
    if (name.find("ClassConditional") != std::string::npos) need("classes", 20, {"--set", "model.num_class_embeds=10"});
    if (name.find("Errors") != std::string::npos) need("noema", 10, {"--set", "ema.enabled=false"});
    if (name.find("Edm") != std::string::npos)
      need("edm", 20,
           {"--set", "diffusion.formulation=edm", "--set", "diffusion.snr_gamma=null", "--set", "sampling.sampler=heun"});
  }
  static void need(const std::string& name, int64_t steps, const std::vector<std::string>& extra) {
    if (!fs::exists(ckpt(name, steps) / "manifest.json")) train(name, steps, extra);
  }
  static void TearDownTestSuite() {
    if (!::testing::UnitTest::GetInstance()->Failed()) fs::remove_all(root());
  }

  static std::vector<std::string> train_args(const std::string& name, int64_t steps, const std::vector<std::string>& extra) {
    std::vector<std::string> a = {"train",
                                  "--config",
                                  test::source_dir() + "/configs/quickstart.json",
                                  "--set",
                                  "run.output_dir=" + root().string(),
                                  "--set",
                                  "run.name=" + name,
                                  "--set",
                                  "run.num_threads=1",
                                  "--set",
                                  "run.device=cpu",
                                  "--set",
                                  "data.path=" + test::fashion_mnist_dir(),
                                  "--set",
                                  "data.subset=256",
                                  "--set",
                                  "data.resolution=16",
                                  "--set",
                                  "model.sample_size=16",
                                  "--set",
                                  "model.block_out_channels=[16, 32]",
                                  "--set",
                                  "model.down_block_types=[\"DownBlock2D\", \"AttnDownBlock2D\"]",
                                  "--set",
                                  "model.up_block_types=[\"AttnUpBlock2D\", \"UpBlock2D\"]",
                                  "--set",
                                  "data.num_workers=1",
                                  "--set",
                                  "train.batch_size=8",
                                  "--set",
                                  "train.max_steps=" + std::to_string(steps),
                                  "--set",
                                  "train.lr_warmup_steps=5",
                                  "--set",
                                  "train.learning_rate=0.001",
                                  "--set",
                                  "logging.sample_every=0",
                                  "--set",
                                  "checkpoint.every=10",
                                  "--set",
                                  "sampling.num_final_samples=0"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  static void train(const std::string& name, int64_t steps, const std::vector<std::string>& extra) {
    const Result r = run(train_args(name, steps, extra));
    ASSERT_EQ(r.code, 0) << r.err;
  }

  static std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
  }
  static Result run(const std::vector<std::string>& args) {
    static int counter = 0;
    const fs::path out = root() / fmt::format("cmd{}.out", counter), err = root() / fmt::format("cmd{}.err", counter);
    ++counter;
    std::string cmd = test::difftrain_bin();
    for (const auto& a : args) cmd += fmt::format(" {}", quote(a));
    cmd += fmt::format(" >{} 2>{} </dev/null", out.string(), err.string());
    const int status = std::system(cmd.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
  }
  // `difftrain sample` on the CPU with one thread, plus `extra`.
  static Result sample(const std::string& run_name, const fs::path& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"sample", "--run", (root() / run_name).string(), "--out", out.string(), "--device", "cpu",
                                  "--threads", "1"};
    if (std::find(extra.begin(), extra.end(), "--steps") == extra.end()) a.insert(a.end(), {"--steps", "3"});
    a.insert(a.end(), extra.begin(), extra.end());
    return run(a);
  }
  static std::vector<std::string> files(const fs::path& dir) {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  static bool have_python() { return !test::python().empty(); }
  static int python(const std::string& script_and_args, const fs::path& log) {
    const std::string cmd = fmt::format("{} {}/{} >{} 2>&1", test::python(), test::source_dir(), script_and_args, log.string());
    return std::system(cmd.c_str());
  }
  static fs::path ckpt(const std::string& name, int64_t step) {
    return root() / name / "checkpoints" / fmt::format("step_{:08d}", step);
  }
};

TEST_F(Sample, WritesOnePngPerSampleAndAGridDeterministically) {
  const fs::path a = root() / "det_a", b = root() / "det_b", c = root() / "det_c";
  Result r = sample("uncond", a, {"-n", "5", "--batch-size", "2", "--seed", "3"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(files(a), (std::vector<std::string>{"000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"}));
  EXPECT_EQ(read_image_file(a / "000004.png").sizes(), (std::vector<int64_t>{1, 16, 16}));
  EXPECT_EQ(read_image_file(a / "grid.png").sizes(), (std::vector<int64_t>{1, 2 * 18 + 2, 3 * 18 + 2}))
      << "⌈√5⌉ = 3 per row, 2 rows, 2-pixel padding";
  EXPECT_NE(r.err.find("step_00000030 (step 30), ema weights"), std::string::npos) << r.err;
  ASSERT_EQ(sample("uncond", b, {"-n", "5", "--batch-size", "2", "--seed", "3"}).code, 0);
  for (const auto& f : files(a)) EXPECT_EQ(slurp(a / f), slurp(b / f)) << f << " differs between two runs with seed 3";
  ASSERT_EQ(sample("uncond", c, {"-n", "5", "--batch-size", "2", "--seed", "4"}).code, 0);
  EXPECT_NE(slurp(a / "000000.png"), slurp(c / "000000.png"));
  // The raw weights give other images than the EMA; a non-empty --out is refused unless --overwrite.
  ASSERT_EQ(sample("uncond", root() / "det_model", {"-n", "5", "--batch-size", "2", "--seed", "3", "--weights", "model"}).code, 0);
  EXPECT_NE(slurp(a / "000000.png"), slurp(root() / "det_model" / "000000.png"));
  r = sample("uncond", a, {"-n", "2"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("is not empty"), std::string::npos) << r.err;
  ASSERT_EQ(sample("uncond", a, {"-n", "2", "--overwrite"}).code, 0);
  EXPECT_EQ(files(a), (std::vector<std::string>{"000000.png", "000001.png", "grid.png"}));
}

TEST_F(Sample, ClassConditionalModelsTakeLabelsAndGuidance) {
  const fs::path one = root() / "cls_one", all = root() / "cls_all";
  Result r = sample("classes", one, {"-n", "3", "--class-label", "7", "--guidance-scale", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("class 7, guidance 2"), std::string::npos) << r.err;
  r = sample("classes", all, {"-n", "3", "--class-label", "all"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("classes cycling 0..9"), std::string::npos) << r.err;
  EXPECT_NE(slurp(one / "000000.png"), slurp(all / "000000.png"));
  for (const std::string bad : {"10", "11", "three"}) {
    r = sample("classes", root() / ("cls_bad" + bad), {"--class-label", bad});
    EXPECT_EQ(r.code, 1) << bad;
    EXPECT_NE(r.err.find("the model has classes 0..9"), std::string::npos) << r.err;
  }
}

TEST_F(Sample, ErrorsSayWhatIsWrong) {
  // Labels or guidance for an unconditional model.
  Result r = sample("uncond", root() / "e1", {"--class-label", "3"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("unconditional"), std::string::npos) << r.err;
  r = sample("uncond", root() / "e2", {"--guidance-scale", "3"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("needs a class-conditional model"), std::string::npos) << r.err;
  // Karras σ for a sampler without them; an unknown sampler lists the names.
  r = sample("uncond", root() / "e_karras", {"--sampler", "ddim", "--karras-sigmas"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("needs --sampler dpm_solver_multistep or unipc_multistep, not ddim"), std::string::npos) << r.err;
  r = sample("uncond", root() / "e_sampler", {"--sampler", "dpm++"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("euler_ancestral"), std::string::npos) << r.err;
  // Bad paths.
  r = run({"sample", "--checkpoint", (root() / "nowhere").string(), "--device", "cpu"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find((root() / "nowhere").string() + ": no such file or directory"), std::string::npos) << r.err;
  r = run({"sample", "--run", (root() / "nowhere").string(), "--device", "cpu"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;
  // A checkpoint of another format version: exit 2, naming both versions.
  const fs::path other = root() / "other_version" / "checkpoints" / "step_00000030";
  fs::create_directories(other.parent_path());
  fs::copy(ckpt("uncond", 30), other, fs::copy_options::recursive);
  json manifest = json::parse(slurp(other / "manifest.json"));
  manifest["version"] = 99;
  std::ofstream(other / "manifest.json") << manifest.dump(2);
  r = run({"sample", "--checkpoint", other.string(), "--device", "cpu", "--out", (root() / "e3").string()});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("checkpoint format version 99; this difftrain reads version 1"), std::string::npos) << r.err;
  // No EMA: --weights ema is refused, the default falls back to the model weights.
  r = sample("noema", root() / "e4", {"--weights", "ema"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("has no EMA weights"), std::string::npos) << r.err;
  r = sample("noema", root() / "e5", {"-n", "2"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("using the model weights"), std::string::npos) << r.err;
}

// diffusers' DDIMPipeline on the exported folder, with the same seed on the CPU, draws the same
// initial noise and so must produce difftrain's samples; DDPMPipeline.from_pretrained runs too.
TEST_F(Sample, ExportedFolderReproducesTheSamplesInDiffusers) {
  if (!have_python()) GTEST_SKIP() << "no venv python with diffusers";
  const fs::path c = root() / "diffusers_case";
  Result r = run({"export", "--run", (root() / "uncond").string(), "--out", (c / "export").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  r = run({"export", "--run", (root() / "uncond").string(), "--out", (root() / "export_again").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* f : {"diffusion_pytorch_model.safetensors", "config.json", "scheduler_config.json", "model_index.json"})
    EXPECT_EQ(slurp(c / "export" / f), slurp(root() / "export_again" / f)) << f << ": export is not deterministic";
  std::ofstream(c / "ddim.json") << R"({"num_images": 4, "steps": 4, "seed": 5, "eta": 0.0})";
  std::ofstream(c / "ddpm.json") << R"({"steps": 3, "seed": 0})";
  // The fast samplers in diffusers' canonical loop (scheduler from_config of the exported one).
  struct FastRun {
    std::string name, sampler;
    int steps, order;
    bool karras;
  };
  const std::vector<FastRun> fast = {{"dpm2", "dpm_solver_multistep", 5, 2, false},
                                     {"dpm3_karras", "dpm_solver_multistep", 6, 3, true},
                                     {"unipc2", "unipc_multistep", 5, 2, false},
                                     {"unipc3_karras", "unipc_multistep", 6, 3, true},
                                     {"euler_ancestral", "euler_ancestral", 6, 2, false}};
  json runs = json::array();
  for (const auto& f : fast)
    runs.push_back({{"name", f.name},
                    {"sampler", f.sampler},
                    {"num_images", 4},
                    {"steps", f.steps},
                    {"seed", 7},
                    {"solver_order", f.order},
                    {"use_karras_sigmas", f.karras}});
  std::ofstream(c / "samplers.json") << runs.dump(1);
  ASSERT_EQ(python("tests/export/check_diffusers.py " + c.string(), root() / "diffusers.log"), 0) << slurp(root() / "diffusers.log");

  const fs::path ours = root() / "for_diffusers";
  r = sample("uncond", ours, {"-n", "4", "--batch-size", "4", "--steps", "4", "--seed", "5", "--sampler", "ddim", "--eta", "0"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto theirs = load_safetensors(c / "diffusers.safetensors").by_name();
  const auto images = theirs.at("images");  // (N, H, W, 1) uint8
  ASSERT_EQ(images.sizes(), (std::vector<int64_t>{4, 16, 16, 1}));
  for (int64_t i = 0; i < 4; ++i) {
    const auto mine = read_image_file(ours / fmt::format("{:06d}.png", i)).to(torch::kInt);  // (1, 16, 16)
    const auto diff = (mine[0] - images[i].select(-1, 0).to(torch::kInt)).abs().max().item<int>();
    EXPECT_LE(diff, 1) << "image " << i << " differs from diffusers' DDIMPipeline by " << diff << " levels";
  }
  EXPECT_EQ(theirs.at("ddpm_image").sizes(), (std::vector<int64_t>{16, 16, 1}));

  // Our sampler, the same model and seed: within one grey level of diffusers' loop (the UNet
  // forwards round alike but not identically; a grey level is 2/255 of [-1, 1]).
  for (const auto& f : fast) {
    const fs::path mine_dir = root() / ("for_diffusers_" + f.name);
    std::vector<std::string> args = {"-n",     "4", "--batch-size", "4",       "--steps",        std::to_string(f.steps),
                                     "--seed", "7", "--sampler",    f.sampler, "--solver-order", std::to_string(f.order)};
    if (f.karras) args.push_back("--karras-sigmas");
    r = sample("uncond", mine_dir, args);
    ASSERT_EQ(r.code, 0) << f.name << ": " << r.err;
    const auto want = theirs.at("images_" + f.name);  // (N, H, W, 1) uint8
    ASSERT_EQ(want.sizes(), (std::vector<int64_t>{4, 16, 16, 1})) << f.name;
    for (int64_t i = 0; i < 4; ++i) {
      const auto mine = read_image_file(mine_dir / fmt::format("{:06d}.png", i)).to(torch::kInt);  // (1, 16, 16)
      const auto diff = (mine[0] - want[i].select(-1, 0).to(torch::kInt)).abs().max().item<int>();
      EXPECT_LE(diff, 1) << f.name << " image " << i << " differs from diffusers' loop by " << diff << " levels";
    }
  }
}

// An EDM run exports UNet2DModel and EDMEulerScheduler (its "epsilon" preconditioning is Table 1's:
// c_in x in, c_noise = ¼ ln σ as the timestep, c_skip x + c_out F out), and no model_index.json:
// diffusers has no pipeline for an unconditional EDM UNet. diffusers' canonical loop with that
// scheduler reproduces `difftrain sample --sampler euler` within a grey level (the UNet forwards
// round alike but not identically), both from the paper's start σ_0 z and from diffusers' own
// init_noise_sigma = √(σ_max² + 1) z: that 8e-5 relative difference in x_0 shrinks with σ at
// every Euler step (x₁ = (σ₁/σ₀) x₀ + (1 - σ₁/σ₀) D), so it is invisible at the end.
TEST_F(Sample, EdmExportRunsInDiffusersEdmEulerScheduler) {
  if (!have_python()) GTEST_SKIP() << "no venv python with diffusers";
  const fs::path c = root() / "edm_case";
  Result r = run({"export", "--run", (root() / "edm").string(), "--out", (c / "export").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("scheduler_config.json (EDMEulerScheduler)"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(c / "export" / "model_index.json"));
  const auto sched = json::parse(slurp(c / "export" / "scheduler_config.json"));
  EXPECT_EQ(sched["_class_name"], "EDMEulerScheduler");
  EXPECT_EQ(sched["prediction_type"], "epsilon");
  EXPECT_EQ(sched["sigma_data"], 0.5);
  std::ofstream(c / "edm.json") << R"({"num_images": 4, "steps": 6, "seed": 7})";
  ASSERT_EQ(python("tests/export/check_edm.py " + c.string(), root() / "edm.log"), 0) << slurp(root() / "edm.log");
  const auto report = json::parse(slurp(c / "edm_report.json"));
  EXPECT_EQ(report["scheduler_class"], "EDMEulerScheduler");
  EXPECT_EQ(report["scheduler_config"]["sigma_max"], 80.0);

  const fs::path mine_dir = root() / "edm_euler";
  r = sample("edm", mine_dir, {"-n", "4", "--batch-size", "4", "--steps", "6", "--seed", "7", "--sampler", "euler"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("euler with 6 steps (6 network evaluations, S_churn = 0)"), std::string::npos) << r.err;
  const auto theirs = load_safetensors(c / "edm.safetensors").by_name();
  for (const char* key : {"images", "images_sigma0"}) {
    const auto want = theirs.at(key);  // (N, H, W, 1) uint8
    ASSERT_EQ(want.sizes(), (std::vector<int64_t>{4, 16, 16, 1})) << key;
    for (int64_t i = 0; i < 4; ++i) {
      const auto mine = read_image_file(mine_dir / fmt::format("{:06d}.png", i)).to(torch::kInt);  // (1, 16, 16)
      const auto diff = (mine[0] - want[i].select(-1, 0).to(torch::kInt)).abs().max().item<int>();
      EXPECT_LE(diff, 1) << key << " image " << i << " differs from diffusers' EDMEulerScheduler loop by " << diff << " levels";
    }
  }
  // Heun (the run's sampler) counts 2N - 1 evaluations; a DDPM sampler is refused for an EDM model.
  r = sample("edm", root() / "edm_heun", {"-n", "2", "--steps", "6"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("heun with 6 steps (11 network evaluations"), std::string::npos) << r.err;
  r = sample("edm", root() / "edm_ddim", {"-n", "2", "--sampler", "ddim"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--sampler ddim: this checkpoint's model is EDM (diffusion.formulation = edm); use heun or euler"),
            std::string::npos)
      << r.err;
}

// export -> train --init-from: the new run starts from exactly those weights; another
// architecture is refused with the differences listed.
TEST_F(Sample, InitFromStartsANewRunFromExportedWeights) {
  const fs::path exported = root() / "init_export";
  Result r = run({"export", "--run", (root() / "uncond").string(), "--weights", "model", "--out", exported.string()});
  ASSERT_EQ(r.code, 0) << r.err;
  // One step with a negligible learning rate: the step-1 weights are the imported ones.
  r = run(train_args("init", 1, {"--init-from", exported.string(), "--set", "train.learning_rate=1e-12", "--set",
                                 "checkpoint.every=1", "--set", "train.lr_warmup_steps=0"}));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("initial weights from"), std::string::npos) << r.err;
  const auto source = load_safetensors(ckpt("uncond", 30) / "model.safetensors").by_name();
  for (const char* part : {"model.safetensors", "ema.safetensors"}) {
    const auto got = load_safetensors(ckpt("init", 1) / part).by_name();
    ASSERT_EQ(got.size(), source.size());
    for (const auto& [name, t] : source)
      EXPECT_TRUE(torch::allclose(got.at(name), t, 0, 1e-7)) << part << " " << name;
  }
  r = run(train_args("init_wide", 1, {"--init-from", exported.string(), "--set", "model.block_out_channels=[32, 64]",
                                      "--set", "train.lr_warmup_steps=0"}));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("model.block_out_channels: folder [16,32], config [32,64]"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(root() / "init_wide")) << "refused before the run directory is made";
  r = run(train_args("init_missing", 1, {"--init-from", (root() / "nowhere").string(), "--set", "train.lr_warmup_steps=0"}));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("no such directory"), std::string::npos) << r.err;
}

TEST_F(Sample, EvalComputesFidAndKidAndCachesTheReference) {
  if (!have_python()) GTEST_SKIP() << "no venv python with torch";
  const fs::path net = root() / "net.pt";
  ASSERT_EQ(python("tests/fid/make_feature_net.py " + net.string(), root() / "net.log"), 0) << slurp(root() / "net.log");
  const std::vector<std::string> common = {"--feature-net", net.string(), "--device", "cpu", "--threads", "1",
                                           "--kid-subsets", "5", "--kid-subset-size", "20"};
  auto eval = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "eval");
    args.insert(args.end(), common.begin(), common.end());
    return run(args);
  };
  // From the checkpoint, generating on the fly; the reference is the run's dataset (256 images).
  Result r = eval({"--run", (root() / "uncond").string(), "-n", "40", "--steps", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  const json first = json::parse(r.out);
  EXPECT_EQ(first["num_generated"], 40);
  EXPECT_EQ(first["num_reference"], 256);
  EXPECT_EQ(first["feature_dim"], 8);
  EXPECT_EQ(first["step"], 30);
  EXPECT_GT(first["fid"].get<double>(), 0.0);
  EXPECT_NE(r.err.find("cached the reference statistics"), std::string::npos) << r.err;
  std::vector<fs::path> cached;
  for (const auto& e : fs::directory_iterator(root() / "uncond" / "fid_stats")) cached.push_back(e.path());
  ASSERT_EQ(cached.size(), 1u);
  // Again: the cache is used and the numbers are the same.
  r = eval({"--run", (root() / "uncond").string(), "-n", "40", "--steps", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("cached statistics"), std::string::npos) << r.err;
  EXPECT_EQ(json::parse(r.out)["fid"], first["fid"]);
  // The same images from `difftrain sample`, against the cached statistics: the same FID.
  const fs::path folder = root() / "eval_samples";
  ASSERT_EQ(sample("uncond", folder, {"-n", "40", "--steps", "2"}).code, 0);
  r = eval({"--samples", folder.string(), "--ref-stats", cached[0].string(), "--out", (root() / "eval.json").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NEAR(json::parse(r.out)["fid"].get<double>(), first["fid"].get<double>(), 1e-9);
  EXPECT_EQ(json::parse(slurp(root() / "eval.json")), json::parse(r.out));
  // A folder against itself: FID 0.
  r = eval({"--samples", folder.string(), "--ref-folder", folder.string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NEAR(json::parse(r.out)["fid"].get<double>(), 0.0, 1e-6);
  // Usage errors.
  r = eval({"--samples", folder.string(), "--checkpoint", ckpt("uncond", 30).string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("not both"), std::string::npos) << r.err;
  r = run({"eval", "--feature-net", (root() / "missing.pt").string(), "--samples", folder.string(), "--device", "cpu"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("missing.pt: no such file"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace difftrain

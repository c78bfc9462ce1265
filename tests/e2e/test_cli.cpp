// The difftrain binary end to end: help, exit codes, config print, env, and a dry run that
// prepares a run directory.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "difftrain/config.h"
#include "difftrain/data_formats.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

struct Result {
  int code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("difftrain_cli_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  Result run(const std::string& args) const {
    const fs::path out = dir_ / "stdout.txt", err = dir_ / "stderr.txt";
    const std::string cmd = test::difftrain_bin() + " " + args + " >" + out.string() + " 2>" + err.string() + " </dev/null";
    const int status = std::system(cmd.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
  }
  std::string config(const std::string& name) const { return test::source_dir() + "/configs/" + name; }
  // quickstart.json with the test data (these are dry runs: run.device = auto only picks a device).
  std::string quickstart() const { return config("quickstart.json") + " --set data.path=" + test::fashion_mnist_dir(); }

  fs::path dir_;
};

TEST_F(Cli, EveryHelpExitsZero) {
  for (const char* cmd : {"--help", "train --help", "sample --help", "eval --help", "export --help", "env --help",
                          "config --help", "config print --help", "config validate --help", "config docs --help"}) {
    SCOPED_TRACE(cmd);
    const Result r = run(cmd);
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_NE(r.out.find("Usage:"), std::string::npos);
  }
  const std::string top = run("--help").out;
  const std::string listed = top.substr(top.find("Subcommands:"));
  for (const char* sub : {"train", "sample", "eval", "export", "env", "config"})
    EXPECT_NE(listed.find(std::string("\n  ") + sub + " "), std::string::npos) << sub << " is not listed:\n" << listed;
  EXPECT_NE(run("train --help").out.find("--set"), std::string::npos);
}

TEST_F(Cli, VersionNamesLibTorch) {
  const Result r = run("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find(TORCH_VERSION), std::string::npos) << r.out;
}

TEST_F(Cli, UsageErrorsExitOne) {
  EXPECT_EQ(run("").code, 1);
  EXPECT_EQ(run("frobnicate").code, 1);
  EXPECT_EQ(run("train --no-such-option").code, 1);
  const Result sample = run("sample");
  EXPECT_EQ(sample.code, 1);
  EXPECT_NE(sample.err.find("does not exist"), std::string::npos) << sample.err;
}

// Enum options take their config spellings only (not the enum's numbers), every --device the
// grammar of run.device; the parser refuses the rest before anything runs, naming the option.
TEST_F(Cli, EnumAndDeviceOptionsAreCheckedWhenParsed) {
  const std::string out = " --out " + (dir_ / "out").string();
  for (const auto& [args, text] : std::vector<std::pair<std::string, std::string>>{
           {"sample --weights 1", "--weights: unknown value \"1\"; allowed: ema | model"},
           {"sample --sampler dpm++",
            "--sampler: unknown value \"dpm++\"; allowed: ddpm | ddim | dpm_solver_multistep | "
            "unipc_multistep | euler_ancestral"},
           {"export --dtype f16" + out, "--dtype: unknown value \"f16\"; allowed: f32 | bf16"},
           {"eval --feature-net x.pt --device tpu",
            "--device: unknown device \"tpu\"; allowed: auto | cpu | cuda | cuda:N (N = 0..999)"},
           {"sample --device cuda:1000", "--device: unknown device \"cuda:1000\""},
           {"env --device cuda:-1", "--device: unknown device \"cuda:-1\""},
           {"train --dry-run --device gpu", "--device: unknown device \"gpu\""}}) {
    const Result r = run(args);
    EXPECT_EQ(r.code, 1) << args;
    EXPECT_NE(r.err.find(text), std::string::npos) << args << ": " << r.err;
  }
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

TEST_F(Cli, ConfigPrintResolvesFileAndSet) {
  const Result r = run("config print --config " + config("cifar10_ddpm.json") + " --set train.batch_size=64 --set run.name=x");
  ASSERT_EQ(r.code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["train"]["batch_size"], 64);                          // --set
  EXPECT_EQ(j["model"]["block_out_channels"], json({128, 256, 256, 256}));  // file
  EXPECT_EQ(j["train"]["adam_beta2"], 0.999);                       // default
  EXPECT_EQ(config_from_json(j), load_config(config("cifar10_ddpm.json"), {"train.batch_size=64", "run.name=x"}));
}

TEST_F(Cli, BadConfigExitsOneAndNamesThePath) {
  std::ofstream(dir_ / "bad.json") << R"({"model": {"block_out_channels": [32, 64, 0]}})";
  for (const std::string cmd : {"config validate --config ", "train --config ", "--config "}) {
    const Result r = run(cmd + (dir_ / "bad.json").string());
    EXPECT_EQ(r.code, 1) << cmd;
    EXPECT_NE(r.err.find("model.block_out_channels[2]: must be >= 1, got 0"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("bad.json"), std::string::npos) << r.err;
  }
  const Result missing = run("--config " + (dir_ / "nope.json").string());
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.err.find("nope.json: no such file"), std::string::npos);
}

TEST_F(Cli, EnvReportsAsTextAndJson) {
  const Result text = run("env");
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("LibTorch:"), std::string::npos);
  const Result js = run("env --json");
  ASSERT_EQ(js.code, 0) << js.err;
  const json j = json::parse(js.out);
  EXPECT_EQ(j["torch"]["version"], TORCH_VERSION);
  EXPECT_EQ(run("env --device cpu").code, 0);
  // CUDA asked for: exit 0 where it is usable, else exit 1 with the reason.
  const Result cuda = run("env --device cuda");
  EXPECT_EQ(cuda.code, j["cuda"]["usable"].get<bool>() ? 0 : 1) << cuda.err;
  if (cuda.code == 1) {
    EXPECT_NE(cuda.err.find("CUDA is not usable"), std::string::npos);
  }
}

TEST_F(Cli, DryRunPreparesTheRunDirectory) {
  const std::string args = "--config " + quickstart() + " --set run.output_dir=" + dir_.string() + " --dry-run";
  const Result r = run(args);  // `difftrain --config X` is `difftrain train --config X`
  ASSERT_EQ(r.code, 0) << r.err;
  const fs::path run_dir = dir_ / "quickstart";
  ASSERT_TRUE(fs::exists(run_dir / "config.json"));
  const Config written = config_from_json(json::parse(slurp(run_dir / "config.json")));
  EXPECT_EQ(written, load_config(config("quickstart.json"),
                                 {"data.path=" + test::fashion_mnist_dir(), "run.output_dir=" + dir_.string()}));
  const std::string log = slurp(run_dir / "train.log");
  EXPECT_NE(log.find("resolved config"), std::string::npos);
  EXPECT_NE(log.find("run.device = \"auto\" chose"), std::string::npos) << log;  // and says what it chose
  // Same config again: fine. A different config in the same run directory: refused, nothing overwritten.
  EXPECT_EQ(run(args).code, 0);
  const std::string before = slurp(run_dir / "config.json");
  const Result clash = run(args + " --set train.batch_size=8");
  EXPECT_EQ(clash.code, 1);
  EXPECT_NE(clash.err.find("different config"), std::string::npos) << clash.err;
  EXPECT_EQ(slurp(run_dir / "config.json"), before);
}

TEST_F(Cli, ResumeAndPlacementChangesReuseTheRunButOthersAreRefused) {
  const std::string base = "train --dry-run --config " + quickstart() + " --set run.output_dir=" + dir_.string();
  ASSERT_EQ(run(base).code, 0);
  EXPECT_EQ(run(base + " --device cpu --set train.max_steps=6000 --set logging.log_every=10").code, 0);
  EXPECT_EQ(run(base + " --resume latest").code, 0);
  const std::string before = slurp(dir_ / "quickstart" / "config.json");
  const Result changed = run(base + " --resume latest --set train.batch_size=8");
  EXPECT_EQ(changed.code, 1);
  EXPECT_NE(changed.err.find("train.batch_size: 64 -> 8"), std::string::npos) << changed.err;
  EXPECT_EQ(slurp(dir_ / "quickstart" / "config.json"), before);
}

// The built-in defaults with only max_steps = 20 (a smoke test): the default warmup (100) is capped
// at the run's length and the log says so; a small model and data keep it short.
TEST_F(Cli, ShortRunWithTheDefaultWarmupTrains) {
  const Result r =
      run("train --device cpu --set run.output_dir=" + dir_.string() + " --set data.path=" + test::fashion_mnist_dir() +
          " --set train.max_steps=20 --set run.num_threads=1 --set data.subset=64 --set data.resolution=16"
          " --set model.sample_size=16 --set model.block_out_channels=16,32"
          " --set model.down_block_types=DownBlock2D,DownBlock2D --set model.up_block_types=UpBlock2D,UpBlock2D"
          " --set train.batch_size=8 --set sampling.num_samples=4 --set sampling.num_inference_steps=2"
          " --set sampling.num_final_samples=0");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("train.lr_warmup_steps: the default 100 exceeds train.max_steps = 20; using 20"), std::string::npos)
      << r.err;
  const json written = json::parse(slurp(dir_ / "quickstart" / "config.json"));
  EXPECT_EQ(written["train"]["lr_warmup_steps"], 20);
  EXPECT_TRUE(fs::exists(dir_ / "quickstart" / "checkpoints" / "step_00000020"));
}

TEST_F(Cli, RuntimeErrorsExitTwo) {
  std::ofstream(dir_ / "not_a_directory") << "x";
  const Result r = run("train --dry-run --set run.output_dir=" + (dir_ / "not_a_directory").string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("cannot create run directory"), std::string::npos) << r.err;
  // A dataset that is not there stops the run before training, naming the path.
  const Result data = run("train --dry-run --set run.output_dir=" + dir_.string() + " --set data.path=" + (dir_ / "nodata").string());
  EXPECT_EQ(data.code, 2);
  EXPECT_NE(data.err.find("nodata: no IDX train split"), std::string::npos) << data.err;
}

// An image folder with bad files among good ones: `train` and `--dry-run` both stop before the
// first step, naming every bad file.
TEST_F(Cli, BadImagesStopTheRunBeforeTraining) {
  const fs::path data = dir_ / "images";
  fs::create_directories(data);
  auto write = [&](const std::string& name, const std::vector<uint8_t>& b) {
    std::ofstream(data / name, std::ios::binary)
        .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  };
  std::vector<uint8_t> px(3 * 8 * 8);
  for (int i = 0; i < 16; ++i) {
    for (size_t k = 0; k < px.size(); ++k) px[k] = static_cast<uint8_t>(i * 16 + k);
    write("img" + std::to_string(10 + i) + ".png", formats::encode_png(px.data(), /*channels=*/3, /*height=*/8, /*width=*/8));
  }
  const auto png = formats::encode_png(px.data(), 3, 8, 8);
  write("cut.png", std::vector<uint8_t>(png.begin(), png.end() - 20));
  write("empty.png", {});
  write("zzz_bad.png", {'n', 'o', 't', ' ', 'a', 'n', ' ', 'i', 'm', 'a', 'g', 'e'});
  const std::string args =
      "train --config " + config("quickstart.json") + " --device cpu --set run.output_dir=" + dir_.string() +
      " --set run.num_threads=1 --set data.dataset=image_folder --set data.path=" + data.string() +
      " --set data.resolution=8 --set data.channels=3 --set data.preload=false --set data.num_workers=0 --set model.sample_size=8"
      " --set model.in_channels=3 --set model.out_channels=3 --set model.block_out_channels=[8,16]"
      " --set 'model.down_block_types=[\"DownBlock2D\",\"DownBlock2D\"]' --set "
      "'model.up_block_types=[\"UpBlock2D\",\"UpBlock2D\"]'"
      " --set train.batch_size=4 --set train.max_steps=3 --set train.lr_warmup_steps=0 --set logging.log_every=1"
      " --set logging.sample_every=0 --set checkpoint.every=1000 --set sampling.num_final_samples=0";
  for (const std::string& mode : {std::string(" --dry-run"), std::string()}) {
    SCOPED_TRACE(mode);
    const Result r = run(args + mode);
    EXPECT_EQ(r.code, 2) << r.err;
    EXPECT_NE(r.err.find("3 of 19 image files cannot be used"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("cut.png: truncated PNG"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("empty.png: empty file (0 bytes)"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("zzz_bad.png: not a PNG or JPEG file (it starts with \"not an i\")"), std::string::npos) << r.err;
    EXPECT_EQ((r.out + r.err).find("step 1/"), std::string::npos) << r.out << r.err;
  }
  // Skipped instead: the three are left out, logged, and the run trains.
  const Result skip = run(args + " --set data.on_bad_image=skip --set run.name=skip");
  EXPECT_EQ(skip.code, 0) << skip.err;
  const std::string all = skip.out + skip.err;
  EXPECT_NE(all.find("leaving out 3 of 19 image files"), std::string::npos) << all;
  EXPECT_NE(all.find("16 images, unlabelled (3 bad files left out)"), std::string::npos) << all;
  EXPECT_NE(all.find("step 3/3"), std::string::npos) << all;
}

TEST_F(Cli, CudaRequestWithoutCudaExitsOneBeforeTouchingDisk) {
  const json env = json::parse(run("env --json").out);
  if (env["cuda"]["usable"].get<bool>()) GTEST_SKIP() << "CUDA is usable here";
  const Result r = run("train --device cuda --dry-run --set run.output_dir=" + dir_.string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("run.device = \"cuda\" but CUDA is not usable"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "quickstart"));
}

}  // namespace
}  // namespace difftrain

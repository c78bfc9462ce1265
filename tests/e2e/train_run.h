// Shared by the e2e tests that run `difftrain train`: a temporary directory, a small real job on
// Fashion-MNIST, spawning the binary (optionally several, optionally through a launcher) and
// reading what it wrote.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "test_paths.h"

extern char** environ;

namespace difftrain::test {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class TrainRun : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("difftrain_train_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  // A small real job: 256 Fashion-MNIST images at 16x16, a two-level UNet with attention, batch 8,
  // on the CPU (auto would take a GPU, where bit-exact reruns are not promised: atomics).
  // The EDM formulation on top of args(): the quickstart's DDPM-only keys reset.
  static std::vector<std::string> edm(std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"--set", "diffusion.formulation=edm", "--set", "diffusion.snr_gamma=null",
                                  "--set", "sampling.sampler=heun"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  std::vector<std::string> args(const std::string& name, int64_t max_steps, std::vector<std::string> extra = {}) const {
    std::vector<std::string> a = {difftrain_bin(), "train",
                                  "--config",      source_dir() + "/configs/quickstart.json",
                                  "--set",         "run.output_dir=" + dir_.string(),
                                  "--set",         "run.name=" + name,
                                  "--set",         "run.num_threads=1",
                                  "--set",         "run.device=cpu",
                                  "--set",         "train.mixed_precision=no",  // the same arithmetic on every CPU
                                  "--set",         "data.path=" + fashion_mnist_dir(),
                                  "--set",         "data.subset=256",
                                  "--set",         "data.resolution=16",
                                  "--set",         "model.sample_size=16",
                                  "--set",         "model.block_out_channels=[16, 32]",
                                  "--set",         "model.down_block_types=[\"DownBlock2D\", \"AttnDownBlock2D\"]",
                                  "--set",         "model.up_block_types=[\"AttnUpBlock2D\", \"UpBlock2D\"]",
                                  "--set",         "data.num_workers=1",
                                  "--set",         "train.batch_size=8",
                                  "--set",         "train.max_steps=" + std::to_string(max_steps),
                                  "--set",         "train.lr_warmup_steps=5",
                                  "--set",         "train.learning_rate=0.001",
                                  "--set",         "train.lr_schedule=constant",
                                  "--set",         "logging.log_every=5",
                                  "--set",         "logging.sample_every=20",
                                  "--set",         "checkpoint.every=10",
                                  "--set",         "checkpoint.keep_last=10",
                                  "--set",         "sampling.num_samples=4",
                                  "--set",         "sampling.num_inference_steps=4",
                                  "--set",         "sampling.num_final_samples=6"};
    for (auto& e : extra) a.push_back(std::move(e));
    return a;
  }

  pid_t spawn(const std::vector<std::string>& argv, const std::string& log, const std::vector<std::string>& env = {}) const {
    std::vector<char*> cargv;
    for (const auto& s : argv) cargv.push_back(const_cast<char*>(s.c_str()));
    cargv.push_back(nullptr);
    std::vector<std::string> envs;
    for (char** e = environ; *e; ++e) envs.emplace_back(*e);
    for (const auto& e : env) envs.push_back(e);
    std::vector<char*> cenv;
    for (auto& s : envs) cenv.push_back(s.data());
    cenv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, (dir_ / (log + ".out")).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, (dir_ / (log + ".err")).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, cargv[0], &fa, nullptr, cargv.data(), cenv.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    return pid;
  }
  // Exit code, or 128 + signal.
  static int wait_for(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  int run(const std::vector<std::string>& argv, const std::string& log, const std::vector<std::string>& env = {}) const {
    return wait_for(spawn(argv, log, env));
  }
  std::string err(const std::string& log) const { return slurp(dir_ / (log + ".err")); }
  // Packs the first 256 Fashion-MNIST images into 8 WebDataset shards of 32 under dir_/shards
  // (`difftrain data pack`; false and a test failure if that fails) and sets `out` to the --set
  // arguments that train from them through their index: `streams` shard streams, streamed (not
  // preloaded), the subset of args() undone, and `extra` after them.
  bool shard_args(int64_t streams, std::vector<std::string>& out, std::vector<std::string> extra = {}) const {
    const int rc = run({difftrain_bin(), "data", "pack", "--from", "idx", "--path", fashion_mnist_dir(), "--out",
                        (dir_ / "shards").string(), "--limit", "256", "--shard-size", "32"},
                       "pack");
    EXPECT_EQ(rc, 0) << err("pack");
    out = {"--set", "data.dataset=webdataset", "--set", "data.path=" + (dir_ / "shards" / "shard-index.json").string(),
           "--set", "data.subset=0",           "--set", "data.shard_streams=" + std::to_string(streams),
           "--set", "data.preload=false"};
    out.insert(out.end(), extra.begin(), extra.end());
    return rc == 0;
  }
  // `a` followed by `more`.
  static std::vector<std::string> plus(std::vector<std::string> a, const std::vector<std::string>& more) {
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  fs::path ckpt(const std::string& name, int64_t step) const {
    char buf[32];
    std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
    return dir_ / name / "checkpoints" / buf;
  }
  // SHA-256 of every file of a checkpoint except config.json (its output_dir differs by run).
  static json digests(const fs::path& ckpt) {
    auto files = json::parse(slurp(ckpt / "manifest.json"))["files"];
    files.erase("config.json");
    return files;
  }
  // Waits until `path` exists and is not empty (a metrics.jsonl with its first line), up to `seconds`.
  static bool wait_for_content(const fs::path& path, int seconds) {
    for (int i = 0; i < seconds * 20; ++i) {
      std::error_code ec;
      if (fs::file_size(path, ec) > 0 && !ec) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  // Waits until `path` exists, up to `seconds`.
  static bool wait_for_path(const fs::path& path, int seconds) {
    for (int i = 0; i < seconds * 20; ++i) {
      if (fs::exists(path)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  fs::path dir_;
};

// Every F32 tensor of a safetensors file, read here from the format's spec (8-byte little-endian
// header length, JSON header, data), independently of difftrain's own reader.
inline std::map<std::string, std::vector<float>> read_safetensors_f32(const fs::path& path) {
  const std::string bytes = slurp(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes.at(static_cast<size_t>(i)));
  const auto header = json::parse(bytes.substr(8, n));
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__" || info["dtype"] != "F32") continue;
    const auto begin = info["data_offsets"][0].get<size_t>(), end = info["data_offsets"][1].get<size_t>();
    std::vector<float> values((end - begin) / 4);
    std::memcpy(values.data(), bytes.data() + 8 + n + begin, end - begin);
    out[name] = std::move(values);
  }
  return out;
}

// Largest |a - b| over every weight of two checkpoints' model.safetensors.
inline double max_weight_difference(const fs::path& a, const fs::path& b) {
  const auto x = read_safetensors_f32(a / "model.safetensors"), y = read_safetensors_f32(b / "model.safetensors");
  EXPECT_EQ(x.size(), y.size());
  double d = 0;
  for (const auto& [name, values] : x) {
    const auto& other = y.at(name);
    EXPECT_EQ(values.size(), other.size()) << name;
    for (size_t i = 0; i < values.size() && i < other.size(); ++i)
      d = std::max(d, static_cast<double>(std::abs(values[i] - other[i])));
  }
  return d;
}

}  // namespace difftrain::test

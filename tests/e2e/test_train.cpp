// `difftrain train` end to end on a Fashion-MNIST subset: the loss falls, the run directory is
// complete, resume is bit-exact (also after kill -9, and after a kill during a save) and reseeds
// deterministically across device types, a corrupt latest checkpoint falls back, a changed model
// is refused, stop signals checkpoint and exit 75, and a diverging run stops with an error.
#include <sstream>

#include "difftrain/checkpoint.h"
#include "difftrain/config.h"
#include "difftrain/flops.h"
#include "difftrain/safetensors.h"
#include "difftrain/version.h"
#include "e2e/train_run.h"
#include "test_paths.h"

namespace difftrain {
namespace {

using namespace test;
using Train = TrainRun;

TEST_F(Train, LossFallsAndTheRunDirectoryIsComplete) {
  ASSERT_EQ(run(args("a", 60), "a"), 0) << err("a");
  std::vector<double> losses;
  std::ifstream jsonl(dir_ / "a" / "metrics.jsonl");
  for (std::string line; std::getline(jsonl, line);) {
    const auto j = json::parse(line);
    losses.push_back(j["train/loss"].get<double>());
    EXPECT_TRUE(j.contains("train/tflops")) << line;
    EXPECT_FALSE(j.contains("train/mfu")) << "a CPU with run.peak_tflops = 0 has no peak: " << line;
  }
  ASSERT_EQ(losses.size(), 12u);  // every 5 steps
  EXPECT_LT(losses.back(), 0.5 * losses.front()) << "loss did not fall: " << losses.front() << " -> " << losses.back();
  for (const char* f : {"config.json", "train.log", "metrics.jsonl", "samples/step_00000020.png", "samples/step_00000060.png",
                        "samples/final/000000.png", "samples/final/000005.png", "samples/final/grid.png",
                        "checkpoints/step_00000060/model.safetensors", "checkpoints/step_00000060/ema.safetensors"})
    EXPECT_TRUE(fs::exists(dir_ / "a" / f)) << f;
  EXPECT_FALSE(fs::exists(dir_ / "a" / "samples/final/000006.png"));
  bool events = false;
  for (const auto& e : fs::directory_iterator(dir_ / "a")) events |= e.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  EXPECT_TRUE(events);
  EXPECT_NE(err("a").find("step 60/60"), std::string::npos) << err("a");
}

// The EDM formulation trains, samples (Heun: 4 steps are 7 network evaluations) and logs the
// loss by quartile of its ln σ distribution.
TEST_F(Train, EdmLossFallsAndLogsItsSigmaQuartiles) {
  ASSERT_EQ(run(args("edm", 60, edm()), "edm"), 0) << err("edm");
  std::vector<double> losses;
  std::ifstream jsonl(dir_ / "edm" / "metrics.jsonl");
  for (std::string line; std::getline(jsonl, line);) {
    const auto j = json::parse(line);
    losses.push_back(j["train/loss"].get<double>());
    // 40 draws per interval: a quartile is empty with probability 4 · 0.75^40 = 4e-5 (and the seed is fixed)
    for (const char* q : {"train/loss_q0", "train/loss_q1", "train/loss_q2", "train/loss_q3"})
      EXPECT_TRUE(j.contains(q)) << q << " missing: " << line;
  }
  ASSERT_EQ(losses.size(), 12u);
  EXPECT_LT(losses.back(), 0.5 * losses.front()) << "loss did not fall: " << losses.front() << " -> " << losses.back();
  EXPECT_TRUE(fs::exists(dir_ / "edm" / "samples/final/000005.png"));
  EXPECT_NE(err("edm").find("(heun 4 steps, NFE 7)"), std::string::npos) << err("edm");
}

// train/tflops is the model's FLOPs per image (forward + backward, src/flops.cpp, checked against
// FlopCounterMode in test_flops) times the interval's images per second, from the same log line;
// with run.peak_tflops set, train/mfu is tflops over that peak, and the console shows it.
TEST_F(Train, TflopsAndMfuAreLogged) {
  ASSERT_EQ(run(args("mfu", 10, {"--set", "run.peak_tflops=1", "--set", "sampling.num_final_samples=0"}), "mfu"), 0)
      << err("mfu");
  const double flops = static_cast<double>(model_flops(load_config((dir_ / "mfu" / "config.json").string()).model).total());
  EXPECT_GT(flops, 1e7);  // the two-level 16x16 test model: about 0.1 GFLOP per image
  std::ifstream jsonl(dir_ / "mfu" / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(jsonl, line); ++lines) {
    const auto j = json::parse(line);
    ASSERT_TRUE(j.contains("train/tflops") && j.contains("train/mfu")) << line;
    const double tflops = j["train/tflops"].get<double>();
    EXPECT_GT(tflops, 0) << line;
    // The same double operations as the trainer's (one rank), written to JSON with round-trip precision.
    EXPECT_DOUBLE_EQ(tflops, flops * j["train/img_per_s"].get<double>() / 1e12) << line;
    EXPECT_DOUBLE_EQ(j["train/mfu"].get<double>(), tflops / 1.0) << line;
  }
  EXPECT_EQ(lines, 2);  // steps 5 and 10
  const std::string log = err("mfu");
  EXPECT_NE(log.find("model FLOPs per image"), std::string::npos) << log;
  EXPECT_NE(log.find("train/mfu against a peak of 1 TFLOP/s per device (run.peak_tflops)"), std::string::npos) << log;
  EXPECT_NE(log.find(" img/s | MFU "), std::string::npos) << log;
}

// metrics.prom of a real run follows Prometheus' naming: counters for the totals, base units
// (seconds, bytes, images per second) with values scaled to match metrics.jsonl's, and
// difftrain_build_info; promtool (Debian's prometheus package) accepts it when it is installed.
TEST_F(Train, PrometheusTextfileFollowsTheNamingRules) {
  ASSERT_EQ(run(args("prom", 10, {"--set", "logging.prometheus=true", "--set", "sampling.num_final_samples=0"}), "prom"), 0)
      << err("prom");
  const std::string prom = slurp(dir_ / "prom" / "metrics.prom");
  auto value = [&](const std::string& name) {  // the sample of a metric labelled only with run="prom"
    const std::string key = name + "{run=\"prom\"} ";
    const auto at = prom.find(key);
    EXPECT_NE(at, std::string::npos) << name << " not in\n" << prom;
    return at == std::string::npos ? std::nan("") : std::stod(prom.substr(at + key.size()));
  };
  EXPECT_NE(prom.find("# TYPE difftrain_steps_total counter\n"), std::string::npos) << prom;
  EXPECT_EQ(value("difftrain_steps_total"), 10);
  EXPECT_EQ(value("difftrain_images_total"), 10 * 8);  // batch 8, one rank
  EXPECT_EQ(value("difftrain_skipped_steps_total"), 0);
  EXPECT_NE(prom.find(fmt::format("difftrain_build_info{{run=\"prom\",version=\"{}\",libtorch=\"", kVersion)), std::string::npos)
      << prom;
  EXPECT_NE(prom.find(",device=\"cpu\",device_name=\"cpu\"} 1\n"), std::string::npos) << prom;
  // The last metrics.jsonl line, in the metric's units.
  std::ifstream in(dir_ / "prom" / "metrics.jsonl");
  std::string line, last;
  while (std::getline(in, line)) last = line;
  const auto j = json::parse(last);
  EXPECT_EQ(value("difftrain_train_images_per_second"), j["train/img_per_s"].get<double>());
  EXPECT_DOUBLE_EQ(value("difftrain_train_host_seconds_per_step"), j["train/host_ms_per_step"].get<double>() * 1e-3);
  EXPECT_DOUBLE_EQ(value("difftrain_train_flops_per_second"), j["train/tflops"].get<double>() * 1e12);
  std::istringstream lines(prom);  // each sample's metric name, token by token: no abbreviated unit
  for (std::string l; std::getline(lines, l);) {
    if (l.starts_with("#")) continue;
    std::istringstream name(l.substr(0, l.find('{')));
    for (std::string token; std::getline(name, token, '_');)
      for (const char* abbreviated : {"s", "ms", "gb", "mb", "img", "tflops"}) EXPECT_NE(token, abbreviated) << l;
  }
  if (std::system("command -v promtool >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "promtool not installed (Debian: apt install prometheus); the format checks above ran";
  const std::string cmd = "promtool check metrics < " + (dir_ / "prom" / "metrics.prom").string() + " > " +
                          (dir_ / "promtool.out").string() + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << slurp(dir_ / "promtool.out");
  EXPECT_EQ(slurp(dir_ / "promtool.out"), "") << "promtool's lint findings";
  // The alert rules docs/MONITORING.md suggests parse and name these metrics.
  const std::string rules = test::source_dir() + "/docs/prometheus/alerts.yml";
  EXPECT_EQ(std::system(("promtool check rules " + rules + " > " + (dir_ / "rules.out").string() + " 2>&1").c_str()), 0)
      << slurp(dir_ / "rules.out");
  for (const char* metric : {"difftrain_last_log_timestamp_seconds", "difftrain_steps_total", "difftrain_train_loss",
                             "difftrain_skipped_steps_total", "difftrain_images_total"}) {
    EXPECT_NE(prom.find(std::string(metric) + "{"), std::string::npos) << metric;
    EXPECT_NE(slurp(rules).find(metric), std::string::npos) << metric;
  }
}

// TensorBoard reads the run: every metrics.jsonl value, the sample images, histograms and the
// config text, with the steps an interrupted first leg logged past its checkpoint purged.
TEST_F(Train, TensorBoardReadsTheRunAcrossAResume) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python with tensorboard";
  const std::vector<std::string> common = {"--set", "logging.sample_every=10", "--set", "logging.histogram_every=10",
                                           "--set", "checkpoint.every=20"};
  auto first = common, second = common;
  ASSERT_EQ(run(args("tb", 30, first), "first"), 0) << err("first");
  second.insert(second.end(), {"--resume", ckpt("tb", 20).string()});
  ASSERT_EQ(run(args("tb", 40, second), "second"), 0) << err("second");
  const std::string cmd = python + " " + test::source_dir() + "/tests/tensorboard/check_training_run.py " +
                          (dir_ / "tb").string() + " 10 > " + (dir_ / "check.out").string() + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << slurp(dir_ / "check.out");
  EXPECT_NE(slurp(dir_ / "check.out").find(" 4 images, 8 histogram tags, 1 texts"), std::string::npos) << slurp(dir_ / "check.out");
  std::ifstream jsonl(dir_ / "tb" / "metrics.jsonl");
  std::vector<int64_t> steps;
  for (std::string line; std::getline(jsonl, line);) steps.push_back(json::parse(line)["step"].get<int64_t>());
  EXPECT_EQ(steps, (std::vector<int64_t>{5, 10, 15, 20, 25, 30, 35, 40}));
}

// bf16 autocast on the CPU trains where the CPU has native bf16 (AVX512-BF16 or AMX) and is a
// clear configuration error elsewhere; `auto` picks bf16 exactly where it trains.
TEST_F(Train, Bf16OnTheCpuTrainsOrSaysWhyNot) {
  const int code = run(args("bf16", 30, {"--set", "train.mixed_precision=bf16"}), "bf16");
  if (code == 1) {
    const std::string e = err("bf16");
    EXPECT_TRUE(e.find("lacks AVX512-BF16 and AMX") != std::string::npos ||
                e.find("LibTorch's AVX-512 kernels are off") != std::string::npos)
        << e;
    // Where it does not, `auto` trains in fp32 and says why.
    ASSERT_EQ(run(args("auto", 2, {"--set", "train.mixed_precision=auto"}), "auto"), 0) << err("auto");
    EXPECT_NE(err("auto").find("train.mixed_precision = auto: fp32, because"), std::string::npos) << err("auto");
    return;
  }
  ASSERT_EQ(code, 0) << err("bf16");
  EXPECT_NE(err("bf16").find("BFloat16 autocast"), std::string::npos) << err("bf16");
  // Where bf16 works, `auto` picks it and says why.
  ASSERT_EQ(run(args("auto", 2, {"--set", "train.mixed_precision=auto"}), "auto"), 0) << err("auto");
  EXPECT_NE(err("auto").find("train.mixed_precision = auto: bf16 autocast"), std::string::npos) << err("auto");
  EXPECT_NE(err("auto").find("BFloat16 autocast"), std::string::npos) << err("auto");
  std::vector<double> losses;
  std::ifstream jsonl(dir_ / "bf16" / "metrics.jsonl");
  for (std::string line; std::getline(jsonl, line);) losses.push_back(json::parse(line)["train/loss"].get<double>());
  ASSERT_GE(losses.size(), 2u);
  EXPECT_LT(losses.back(), 0.6 * losses.front());
}

// logging.profile_start traces the chosen steps into a Chrome trace that the summariser reads:
// the UNet's convolutions appear with one forward per conv layer per step.
TEST_F(Train, ProfilerTracesTheChosenSteps) {
  const int code = run(args("prof", 6, {"--set", "logging.profile_start=3", "--set", "logging.profile_steps=2"}), "prof");
  ASSERT_EQ(code, 0) << err("prof");
  const fs::path trace = dir_ / "prof" / "profile" / "steps_3-4.pt.trace.json";
  ASSERT_TRUE(fs::exists(trace)) << err("prof");
  EXPECT_NE(err("prof").find("profiler trace of steps 3-4 written"), std::string::npos) << err("prof");
  const auto events = json::parse(std::ifstream(trace))["traceEvents"];
  int64_t conv_forwards = 0, backward = 0;
  for (const auto& e : events) {
    if (!e.contains("name") || e.value("cat", "") != "cpu_op") continue;
    const auto name = e["name"].get<std::string>();
    conv_forwards += name == "aten::convolution";
    backward += name == "aten::convolution_backward";
  }
  // Each Conv2d of the model (its 4-d weights in the checkpoint) runs once forward and once
  // backward per step.
  int64_t convs = 0;
  for (const auto& [name, t] : load_safetensors(dir_ / "prof" / "checkpoints" / "step_00000006" / "model.safetensors").tensors)
    convs += t.dim() == 4;
  ASSERT_GT(convs, 10);
  EXPECT_EQ(conv_forwards, 2 * convs);
  EXPECT_EQ(backward, 2 * convs);
  const std::string python = test::python();
  if (python.empty()) return;
  const std::string cmd = python + " " + test::source_dir() + "/scripts/bench/profile_ops.py " + trace.string() +
                          " --steps 2 > " + (dir_ / "ops.md").string() + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(dir_ / "ops.md");
  EXPECT_NE(slurp(dir_ / "ops.md").find("| convolution (fwd + bwd) |"), std::string::npos) << slurp(dir_ / "ops.md");
}

TEST_F(Train, ResumeIsBitExact) {
  ASSERT_EQ(run(args("straight", 40), "straight"), 0) << err("straight");
  ASSERT_EQ(run(args("halves", 20), "first"), 0) << err("first");
  ASSERT_EQ(run(args("halves", 40, {"--resume", "latest"}), "second"), 0) << err("second");
  EXPECT_NE(err("second").find("resumed from"), std::string::npos) << err("second");
  EXPECT_EQ(digests(ckpt("halves", 40)), digests(ckpt("straight", 40)));
  EXPECT_EQ(digests(ckpt("halves", 30)), digests(ckpt("straight", 30)));

  // The same streamed from WebDataset shards (through their index, 2 shard streams, 2 decode
  // threads): 8 shards of 32, 32 batches an epoch, so step 20 is mid-epoch and 40 in the next.
  std::vector<std::string> shards;
  ASSERT_TRUE(shard_args(2, shards, {"--set", "data.num_workers=2"}));
  ASSERT_EQ(run(args("wds_straight", 40, shards), "wds_straight"), 0) << err("wds_straight");
  ASSERT_EQ(run(args("wds_halves", 20, shards), "wds_first"), 0) << err("wds_first");
  ASSERT_EQ(run(args("wds_halves", 40, plus(shards, {"--resume", "latest"})), "wds_second"), 0) << err("wds_second");
  EXPECT_NE(err("wds_second").find("resumed from"), std::string::npos) << err("wds_second");
  EXPECT_EQ(digests(ckpt("wds_halves", 40)), digests(ckpt("wds_straight", 40)));
  EXPECT_NE(digests(ckpt("wds_straight", 40)), digests(ckpt("straight", 40)));  // other data order: other weights

  // EDM: its σ draws come from the same generator, so they resume with it.
  ASSERT_EQ(run(args("edm_straight", 40, edm()), "edm_straight"), 0) << err("edm_straight");
  ASSERT_EQ(run(args("edm_halves", 20, edm()), "edm_first"), 0) << err("edm_first");
  ASSERT_EQ(run(args("edm_halves", 40, edm({"--resume", "latest"})), "edm_second"), 0) << err("edm_second");
  EXPECT_EQ(digests(ckpt("edm_halves", 40)), digests(ckpt("edm_straight", 40)));
  EXPECT_NE(digests(ckpt("edm_straight", 40)), digests(ckpt("straight", 40)));
}

// A checkpoint from another device type: here one whose generator states are marked as CUDA
// ones (16-byte Philox states, as a GPU run writes them) resumed on the CPU. The streams that
// cannot move are reseeded from run.seed and the step, with a warning, so two such resumes agree
// to the bit; the result differs from the run that stayed on the CPU. A checkpoint from before
// the device record (no rng metadata) still resumes bit-exactly.
TEST_F(Train, ResumeOnAnotherDeviceReseedsDeterministically) {
  ASSERT_EQ(run(args("straight", 20), "straight"), 0) << err("straight");
  // step 10 of "straight" as a checkpoint of run `name` (run.name is part of a run's identity)
  auto copy_for = [&](const std::string& name, bool from_cuda) {
    Checkpoint c = load_checkpoint(ckpt("straight", 10));
    auto config = json::parse(c.config);
    config["run"]["name"] = name;
    c.config = config.dump(2);
    if (from_cuda) {
      const at::Tensor philox = at::arange(16, at::kByte);  // (16) seed and offset, not a CPU state
      at::Tensor cpu;
      for (const auto& [state, t] : c.tensors.at("rng"))
        if (state == "cpu") cpu = t;
      c.tensors["rng"] = {{"trainer", philox}, {"cpu", cpu}, {"device", philox}};
      c.metadata["rng"] = {{"trainer", "cuda"}, {"cpu", "cpu"}, {"device", "cuda"}};
    } else {
      c.metadata.erase("rng");
    }
    return save_checkpoint(dir_ / ("for_" + name), c);
  };
  for (const std::string name : {"x", "y"}) {
    ASSERT_EQ(run(args(name, 20, {"--resume", copy_for(name, true).string()}), name), 0) << err(name);
    EXPECT_NE(err(name).find("was written on cuda and this run is on cpu"), std::string::npos) << err(name);
    EXPECT_NE(err(name).find("reseeded from run.seed and step 10"), std::string::npos) << err(name);
  }
  EXPECT_EQ(digests(ckpt("x", 20)), digests(ckpt("y", 20)));
  EXPECT_NE(digests(ckpt("x", 20))["model.safetensors"], digests(ckpt("straight", 20))["model.safetensors"]);
  ASSERT_EQ(run(args("legacy", 20, {"--resume", copy_for("legacy", false).string()}), "legacy"), 0) << err("legacy");
  EXPECT_EQ(err("legacy").find("reseeded"), std::string::npos) << err("legacy");
  EXPECT_EQ(digests(ckpt("legacy", 20)), digests(ckpt("straight", 20)));
}

TEST_F(Train, ResumeAfterKillNineIsBitExact) {
  ASSERT_EQ(run(args("straight", 40), "straight"), 0) << err("straight");
  const pid_t pid = spawn(args("killed", 40, {"--set", "logging.sample_every=0"}), "killed");
  ASSERT_TRUE(wait_for_path(ckpt("killed", 20) / "manifest.json", 120)) << err("killed");
  kill(pid, SIGKILL);
  EXPECT_EQ(wait_for(pid), 128 + SIGKILL);
  ASSERT_EQ(run(args("killed", 40, {"--resume", "latest"}), "resumed"), 0) << err("resumed");
  EXPECT_EQ(digests(ckpt("killed", 40)), digests(ckpt("straight", 40)));
}

TEST_F(Train, KillDuringASaveKeepsThePreviousCheckpoint) {
  // DIFFTRAIN_FAULT=kill_in_save:20 sends SIGKILL to the trainer half-way through writing step 20.
  EXPECT_EQ(run(args("k", 40), "k", {"DIFFTRAIN_FAULT=kill_in_save:20"}), 128 + SIGKILL) << err("k");
  EXPECT_FALSE(fs::exists(ckpt("k", 20)));
  bool leftover = false;
  for (const auto& e : fs::directory_iterator(dir_ / "k" / "checkpoints")) leftover |= e.path().filename().string().rfind(".tmp-", 0) == 0;
  EXPECT_TRUE(leftover) << "the interrupted save's temporary directory";
  ASSERT_TRUE(fs::exists(ckpt("k", 10) / "manifest.json"));
  ASSERT_EQ(run(args("k", 40, {"--resume", "latest"}), "resumed"), 0) << err("resumed");
  EXPECT_NE(err("resumed").find("step_00000010 at step 10"), std::string::npos) << err("resumed");
  ASSERT_EQ(run(args("straight", 40), "straight"), 0) << err("straight");
  EXPECT_EQ(digests(ckpt("k", 40)), digests(ckpt("straight", 40)));
}

TEST_F(Train, CorruptLatestFallsBackToTheNewestGoodCheckpoint) {
  ASSERT_EQ(run(args("c", 30), "c"), 0) << err("c");
  {
    std::fstream f(ckpt("c", 30) / "optimizer.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-4, std::ios::end);
    f.write("\x01\x02\x03\x04", 4);
  }
  ASSERT_EQ(run(args("c", 40, {"--resume", "latest"}), "resumed"), 0) << err("resumed");
  const std::string e = err("resumed");
  EXPECT_NE(e.find("skipping checkpoint"), std::string::npos) << e;
  EXPECT_NE(e.find("optimizer.safetensors fails its SHA-256 check"), std::string::npos) << e;
  EXPECT_NE(e.find("step_00000020 at step 20"), std::string::npos) << e;
}

TEST_F(Train, StartingOverARunWithCheckpointsIsRefused) {
  ASSERT_EQ(run(args("again", 10), "first"), 0) << err("first");
  const auto before = digests(ckpt("again", 10));
  EXPECT_EQ(run(args("again", 10), "second"), 1);
  EXPECT_NE(err("second").find("already holds checkpoints (newest: step_00000010); continue it with --resume latest"),
            std::string::npos) << err("second");
  EXPECT_EQ(digests(ckpt("again", 10)), before);
  EXPECT_EQ(run(args("again", 10, {"--resume", "latest"}), "third"), 0) << err("third");
  EXPECT_NE(err("third").find("already trained to step 10"), std::string::npos) << err("third");
}

TEST_F(Train, ResumeWithAChangedModelIsRefused) {
  ASSERT_EQ(run(args("m", 10), "m"), 0) << err("m");
  // Same run directory: refused before anything is touched.
  EXPECT_EQ(run(args("m", 20, {"--resume", "latest", "--set", "model.layers_per_block=2"}), "same"), 1);
  EXPECT_NE(err("same").find("model.layers_per_block: 1 -> 2"), std::string::npos) << err("same");
  // Another run directory resuming from this checkpoint by path: refused by the checkpoint's config.
  EXPECT_EQ(run(args("other", 20, {"--resume", ckpt("m", 10).string(), "--set", "model.layers_per_block=2"}), "path"), 1);
  EXPECT_NE(err("path").find("cannot resume from"), std::string::npos) << err("path");
  EXPECT_NE(err("path").find("model.layers_per_block: 1 -> 2"), std::string::npos) << err("path");
  // A longer run is an allowed change.
  EXPECT_EQ(run(args("m", 15, {"--resume", "latest"}), "longer"), 0) << err("longer");
}

TEST_F(Train, StopSignalsCheckpointAndExit75) {
  for (int sig : {SIGTERM, SIGUSR1, SIGINT}) {
    const std::string name = "s" + std::to_string(sig);
    const pid_t pid = spawn(args(name, 100000, {"--set", "checkpoint.every=100000", "--set", "logging.sample_every=0"}), name);
    ASSERT_TRUE(wait_for_content(dir_ / name / "metrics.jsonl", 120)) << err(name);
    kill(pid, sig);
    EXPECT_EQ(wait_for(pid), 75) << err(name);
    const auto ckpts = dir_ / name / "checkpoints";
    ASSERT_TRUE(fs::exists(ckpts));
    int good = 0;
    for (const auto& e : fs::directory_iterator(ckpts)) good += fs::exists(e.path() / "manifest.json");
    EXPECT_EQ(good, 1) << "one checkpoint, at the step the signal ended";
    EXPECT_NE(err(name).find("stopped after the checkpoint"), std::string::npos) << err(name);
  }
}

TEST_F(Train, SecondInterruptExitsAtOnce) {
  // A long sample grid after every step keeps the run busy between the two interrupts.
  const pid_t pid = spawn(args("i", 100000, {"--set", "logging.log_every=1", "--set", "logging.sample_every=1",
                                             "--set", "sampling.sampler=ddpm", "--set", "sampling.num_inference_steps=1000",
                                             "--set", "sampling.num_samples=64"}), "i");
  ASSERT_TRUE(wait_for_content(dir_ / "i" / "metrics.jsonl", 120)) << err("i");
  kill(pid, SIGINT);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // two signals at once would merge into one
  kill(pid, SIGINT);
  EXPECT_EQ(wait_for(pid), 130) << err("i");
  EXPECT_NE(err("i").find("second interrupt"), std::string::npos) << err("i");
}

TEST_F(Train, DivergenceStopsWithAClearError) {
  const int code = run(args("nan", 200, {"--set", "train.learning_rate=1e30", "--set", "train.lr_warmup_steps=0",
                                         "--set", "train.max_grad_norm=0", "--set", "train.max_nonfinite_steps=3"}), "nan");
  EXPECT_EQ(code, 2) << err("nan");
  EXPECT_NE(err("nan").find("non-finite"), std::string::npos) << err("nan");
  EXPECT_NE(err("nan").find("train.max_nonfinite_steps = 3"), std::string::npos) << err("nan");
}

}  // namespace
}  // namespace difftrain

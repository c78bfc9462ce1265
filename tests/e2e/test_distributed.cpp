// Data-parallel training on the CPU over Gloo, two processes on this machine, through every
// launch path: the variables by hand, scripts/launch.sh, and torchrun --no-python.
#include "e2e/train_run.h"
#include "test_paths.h"

namespace difftrain {
namespace {

using namespace test;

class Distributed : public TrainRun {
 protected:
  int port(int offset) const { return test::rendezvous_port(offset); }
  std::vector<std::string> launch(int nproc, int master_port, std::vector<std::string> command) const {
    std::vector<std::string> a = {test::source_dir() + "/scripts/launch.sh",
                                  "--nproc-per-node",
                                  std::to_string(nproc),
                                  "--master-port",
                                  std::to_string(master_port),
                                  "--kill-grace",
                                  "5",
                                  "--"};
    a.insert(a.end(), command.begin(), command.end());
    return a;
  }
  static std::vector<std::string> rank_env(int rank, int world, int master_port) {
    return {"RANK=" + std::to_string(rank), "LOCAL_RANK=" + std::to_string(rank), "WORLD_SIZE=" + std::to_string(world),
            "LOCAL_WORLD_SIZE=" + std::to_string(world), "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + std::to_string(master_port)};
  }
};

// 2 ranks with per-rank batch B train the same weights as 1 rank with batch 2B. The two differ
// only in the order of floating-point sums (each rank sums half the batch, the all-reduce adds
// the halves), a relative difference of about 1e-6 in each gradient. AdamW moves a weight by at
// most about lr = 1e-3 per step, so over 20 steps such differences stay far below 0.1 lr = 1e-4;
// a real mistake (a wrong shard, a missing average, per-rank noise) shows up at the scale of lr,
// as the control with batch B on one rank shows.
TEST_F(Distributed, TwoRanksEqualOneRankWithTheGlobalBatch) {
  ASSERT_EQ(run(args("one", 20, {"--set", "train.batch_size=16"}), "one"), 0) << err("one");
  ASSERT_EQ(run(launch(2, port(0), args("two", 20, {"--set", "train.batch_size=8"})), "two"), 0) << err("two");
  EXPECT_NE(err("two").find("2 ranks"), std::string::npos) << err("two");
  const double d = max_weight_difference(ckpt("one", 20), ckpt("two", 20));
  EXPECT_LT(d, 1e-4) << "2 x 8 vs 1 x 16";
  ASSERT_EQ(run(args("control", 20, {"--set", "train.batch_size=8"}), "control"), 0) << err("control");
  EXPECT_GT(max_weight_difference(ckpt("one", 20), ckpt("control", 20)), 10 * 1e-4) << "the control must differ";

  // The same from WebDataset shards through their index, with 4 shard streams (each rank reads only
  // its own shards), streamed rather than preloaded: 8 shards of 32, 16 global batches an epoch.
  std::vector<std::string> shards;
  ASSERT_TRUE(shard_args(4, shards, {"--set", "data.shuffle_buffer=16"}));
  ASSERT_EQ(run(args("wds_one", 20, plus(shards, {"--set", "train.batch_size=16"})), "wds_one"), 0) << err("wds_one");
  ASSERT_EQ(run(launch(2, port(1), args("wds_two", 20, plus(shards, {"--set", "train.batch_size=8"}))), "wds_two"), 0)
      << err("wds_two");
  EXPECT_NE(err("wds_two").find("4 shard streams of 64 samples"), std::string::npos) << err("wds_two");
  EXPECT_LT(max_weight_difference(ckpt("wds_one", 20), ckpt("wds_two", 20)), 1e-4) << "2 x 8 vs 1 x 16 from shards";

  // EDM: ln σ is drawn for the global batch like t, so the same holds.
  ASSERT_EQ(run(args("edm_one", 20, edm({"--set", "train.batch_size=16"})), "edm_one"), 0) << err("edm_one");
  ASSERT_EQ(run(launch(2, port(2), args("edm_two", 20, edm({"--set", "train.batch_size=8"}))), "edm_two"), 0) << err("edm_two");
  EXPECT_LT(max_weight_difference(ckpt("edm_one", 20), ckpt("edm_two", 20)), 1e-4) << "EDM: 2 x 8 vs 1 x 16";
  ASSERT_EQ(run(args("edm_control", 20, edm({"--set", "train.batch_size=8"})), "edm_control"), 0) << err("edm_control");
  EXPECT_GT(max_weight_difference(ckpt("edm_one", 20), ckpt("edm_control", 20)), 10 * 1e-4) << "EDM: the control must differ";
}

TEST_F(Distributed, LaunchScriptTrainsCheckpointsAndResumesOnTwoRanks) {
  ASSERT_EQ(run(launch(2, port(1), args("r", 20, {"--set", "train.batch_size=8"})), "first"), 0) << err("first");
  ASSERT_TRUE(fs::exists(ckpt("r", 20) / "manifest.json"));
  ASSERT_EQ(run(launch(2, port(1), args("r", 30, {"--set", "train.batch_size=8", "--resume", "latest"})), "second"), 0)
      << err("second");
  EXPECT_NE(err("second").find("resumed from"), std::string::npos) << err("second");
  EXPECT_TRUE(fs::exists(ckpt("r", 30) / "manifest.json"));
  // Straight to 30 on two ranks gives the same weights as 20 + resume to 30.
  ASSERT_EQ(run(launch(2, port(2), args("s", 30, {"--set", "train.batch_size=8"})), "straight"), 0) << err("straight");
  EXPECT_EQ(digests(ckpt("r", 30))["model.safetensors"], digests(ckpt("s", 30))["model.safetensors"]);
}

TEST_F(Distributed, TorchrunNoPythonWorksUnchanged) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv with torchrun";
  const std::string torchrun = fs::path(python).parent_path() / "torchrun";
  std::vector<std::string> cmd = {torchrun, "--no-python", "--nproc-per-node", "2", "--master-port", std::to_string(port(3))};
  const auto a = args("t", 20, {"--set", "train.batch_size=8"});
  cmd.insert(cmd.end(), a.begin(), a.end());
  ASSERT_EQ(run(cmd, "torchrun"), 0) << err("torchrun");
  ASSERT_EQ(run(args("one", 20, {"--set", "train.batch_size=16"}), "one"), 0) << err("one");
  EXPECT_LT(max_weight_difference(ckpt("one", 20), ckpt("t", 20)), 1e-4);
}

TEST_F(Distributed, ADeadRankFailsThePeerWithinTheTimeout) {
  const auto a = args("dead", 100000, {"--set", "train.batch_size=8", "--set", "distributed.timeout_s=20",
                                       "--set", "checkpoint.every=100000", "--set", "logging.sample_every=0"});
  const pid_t r0 = spawn(a, "rank0", rank_env(0, 2, port(4)));
  const pid_t r1 = spawn(a, "rank1", rank_env(1, 2, port(4)));
  ASSERT_TRUE(wait_for_content(dir_ / "dead" / "metrics.jsonl", 120)) << err("rank0");
  kill(r1, SIGKILL);
  const auto start = std::chrono::steady_clock::now();
  const int code = wait_for(r0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  wait_for(r1);
  EXPECT_EQ(code, 2) << err("rank0");
  EXPECT_LT(secs, 20 + 10) << "rank 0 must give up within distributed.timeout_s";
  EXPECT_NE(err("rank0").find("all-reduce"), std::string::npos) << err("rank0");
}

TEST_F(Distributed, LaunchScriptStopsTheOthersWhenOneFails) {
  const pid_t launcher = spawn(launch(2, port(5), args("f", 100000, {"--set", "train.batch_size=8",
                                                                          "--set", "distributed.timeout_s=60"})), "launcher");
  ASSERT_TRUE(wait_for_content(dir_ / "f" / "metrics.jsonl", 120)) << err("launcher");
  // Kill rank 1: the launcher stops rank 0 (well before its 60 s timeout) and reports the failure.
  FILE* p = popen(("pgrep -n -P " + std::to_string(launcher)).c_str(), "r");  // the launcher's newest child: rank 1
  char buf[32] = {};
  ASSERT_TRUE(p && fgets(buf, sizeof buf, p));
  pclose(p);
  kill(std::atoi(buf), SIGKILL);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(wait_for(launcher), 128 + SIGKILL) << err("launcher");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 40);
  EXPECT_NE(err("launcher").find("failed with exit code 137; stopping the other workers"), std::string::npos) << err("launcher");
}

TEST_F(Distributed, SigtermToTheLauncherCheckpointsEveryRankAndExits75) {
  const pid_t launcher = spawn(launch(2, port(6), args("sig", 100000, {"--set", "train.batch_size=8",
                                                                            "--set", "checkpoint.every=100000",
                                                                            "--set", "logging.sample_every=0"})), "launcher");
  ASSERT_TRUE(wait_for_content(dir_ / "sig" / "metrics.jsonl", 120)) << err("launcher");
  kill(launcher, SIGTERM);
  EXPECT_EQ(wait_for(launcher), 75) << err("launcher");
  int good = 0;
  for (const auto& e : fs::directory_iterator(dir_ / "sig" / "checkpoints")) good += fs::exists(e.path() / "manifest.json");
  EXPECT_EQ(good, 1) << err("launcher");
}

}  // namespace
}  // namespace difftrain

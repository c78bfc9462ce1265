// The World from launcher environments (torchrun, Slurm, none) and Slurm hostlists.
#include <gtest/gtest.h>

#include "difftrain/distributed.h"
#include "difftrain/errors.h"

namespace difftrain {
namespace {

using Env = std::map<std::string, std::string>;

TEST(World, NoLauncherIsAWorldOfOne) {
  const World w = world_from_env({{"PATH", "/usr/bin"}});
  EXPECT_EQ(w.world_size, 1);
  EXPECT_EQ(w.rank, 0);
  EXPECT_FALSE(w.distributed());
  EXPECT_EQ(w.launcher, "none");
}

TEST(World, TorchrunVariables) {
  const World w = world_from_env({{"RANK", "5"}, {"LOCAL_RANK", "1"}, {"WORLD_SIZE", "8"}, {"LOCAL_WORLD_SIZE", "4"},
                                  {"GROUP_RANK", "1"}, {"MASTER_ADDR", "node07"}, {"MASTER_PORT", "29400"},
                                  {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "2"}});
  EXPECT_EQ(w.launcher, "torchrun");
  EXPECT_EQ(w.rank, 5);
  EXPECT_EQ(w.local_rank, 1);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_world_size, 4);
  EXPECT_EQ(w.node_rank, 1);
  EXPECT_EQ(w.master_addr, "node07");
  EXPECT_EQ(w.master_port, 29400);
  EXPECT_TRUE(w.use_agent_store);
  EXPECT_EQ(w.restart_count, 2);
  EXPECT_FALSE(world_from_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_USE_AGENT_STORE", "False"}}).use_agent_store);
}

TEST(World, SlurmVariablesAndNodelist) {
  const World w = world_from_env({{"SLURM_PROCID", "6"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"}, {"SLURM_NODEID", "1"},
                                  {"SLURM_NTASKS_PER_NODE", "4"}, {"SLURM_JOB_NODELIST", "gpu[03-05,07]"},
                                  {"SLURM_JOB_ID", "123456"}});
  EXPECT_EQ(w.launcher, "slurm");
  EXPECT_EQ(w.rank, 6);
  EXPECT_EQ(w.world_size, 8);
  EXPECT_EQ(w.local_rank, 2);
  EXPECT_EQ(w.local_world_size, 4);
  EXPECT_EQ(w.node_rank, 1);
  EXPECT_EQ(w.master_addr, "gpu03");  // the first host of the nodelist
  EXPECT_EQ(w.master_port, 15000 + 123456 % 20000);
  // SLURM_TASKS_PER_NODE's compressed form, and MASTER_ADDR set by the batch script wins.
  const World v = world_from_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_TASKS_PER_NODE", "4(x2)"},
                                  {"SLURM_JOB_NODELIST", "a[1-2]"}, {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "1234"}});
  EXPECT_EQ(v.local_world_size, 4);
  EXPECT_EQ(v.master_addr, "10.0.0.1");
  EXPECT_EQ(v.master_port, 1234);
}

TEST(World, TorchrunWinsOverSlurm) {  // torchrun inside an allocation: its variables describe the workers
  const World w = world_from_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}});
  EXPECT_EQ(w.launcher, "torchrun");
  EXPECT_EQ(w.world_size, 2);
}

TEST(World, BadValuesNameTheVariable) {
  auto message = [](const Env& env) {
    try {
      world_from_env(env);
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({{"RANK", "2"}, {"WORLD_SIZE", "2"}}).find("RANK=2"), std::string::npos);
  EXPECT_NE(message({{"RANK", "x"}, {"WORLD_SIZE", "2"}}).find("RANK=x"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}}).find("WORLD_SIZE"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}).find("MASTER_PORT=70000"), std::string::npos);
  EXPECT_NE(message({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "3"}, {"LOCAL_WORLD_SIZE", "2"}}).find("local rank 3"),
            std::string::npos);
  EXPECT_NE(message({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}}).find("SLURM_JOB_NODELIST"), std::string::npos);
  EXPECT_NE(message({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "n[1-"}}).find("hostlist"),
            std::string::npos);
}

TEST(SlurmHostlist, Expansion) {
  EXPECT_EQ(expand_slurm_nodelist("node[03-05,07]"), (std::vector<std::string>{"node03", "node04", "node05", "node07"}));
  EXPECT_EQ(expand_slurm_nodelist("a1,b[9-11]-ib,c"), (std::vector<std::string>{"a1", "b9-ib", "b10-ib", "b11-ib", "c"}));
  EXPECT_EQ(slurm_first_host("gpu-node[001-128]"), "gpu-node001");
  EXPECT_EQ(slurm_first_host("login1"), "login1");
  EXPECT_THROW(expand_slurm_nodelist("n[5-3]"), UsageError);
  EXPECT_THROW(expand_slurm_nodelist(""), UsageError);
}

}  // namespace
}  // namespace difftrain

// The World from launcher environments (torchrun, Slurm, none) and Slurm hostlists; what the
// ProcessGroup hands its backend (devices) and how it closes it.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

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

// A backend for a world of one (where every collective is the identity) that fails, as
// ProcessGroupNCCL does, when a tensor is not on the device it was declared for. Declared for
// the meta device (shapes without data), it stands in for a GPU group on this CPU-only machine:
// what ProcessGroup packs and hands over must stay on the group's device, as NCCL needs.
class DeviceCheckingBackend : public c10d::Backend {
 public:
  explicit DeviceCheckingBackend(c10::Device device) : c10d::Backend(/*rank=*/0, /*size=*/1), device_(device) {}
  const std::string getBackendName() const override { return "device-checking"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions&) override {
    return done("broadcast", tensors);
  }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions&) override {
    return done("allreduce", tensors);
  }
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions&) override { return done("barrier", {}); }
  void shutdown() override { calls.emplace_back("shutdown"); }
  void abort() override { calls.emplace_back("abort"); }

  std::vector<std::string> calls;  // in order; a collective as "<name> <numel>"

 private:
  struct Done : c10d::Work {
    bool isCompleted() override { return true; }
    bool wait(std::chrono::milliseconds) override { return true; }
  };
  c10::intrusive_ptr<c10d::Work> done(const std::string& what, const std::vector<at::Tensor>& tensors) {
    int64_t numel = 0;
    for (const auto& t : tensors) {
      TORCH_CHECK(t.device() == device_, "DeviceCheckingBackend ", what, ": tensor on ", t.device(), ", group on ", device_);
      numel += t.numel();
    }
    calls.push_back(what + " " + std::to_string(numel));
    return c10::make_intrusive<Done>();
  }
  c10::Device device_;
};

struct CheckedGroup {
  c10::intrusive_ptr<DeviceCheckingBackend> backend;
  std::unique_ptr<ProcessGroup> group;
};

CheckedGroup checked_group(c10::Device group_device, c10::Device backend_device) {
  CheckedGroup g;
  g.backend = c10::make_intrusive<DeviceCheckingBackend>(backend_device);
  g.group = std::make_unique<ProcessGroup>(World{}, c10::make_intrusive<c10d::HashStore>(), g.backend, "device-checking",
                                           group_device, std::chrono::seconds(10));
  return g;
}

const c10::Device kMeta(c10::kMeta);

// What the trainer reduces, on a group whose device is not the CPU: weights, gradients in
// buckets, the log-interval statistics ((), (4), (4), as Trainer::log_interval passes them) and
// the checkpoint barrier. Each reaches the backend on the group's device.
TEST(ProcessGroupDevices, EveryCollectiveReachesTheBackendOnTheGroupsDevice) {
  auto g = checked_group(kMeta, kMeta);
  const auto on = torch::TensorOptions().device(kMeta);
  std::vector<at::Tensor> weights = {torch::empty({8, 4}, on), torch::empty({8}, on)};
  g.group->broadcast(weights, 0);
  // 256 + 256 + 64 floats in buckets of 2 KiB: [w0, w1] = 2 KiB, then [w2].
  g.group->allreduce_mean({torch::empty({16, 16}, on), torch::empty({256}, on), torch::empty({64}, on)}, 2048);
  g.group->allreduce_sum({torch::empty({}, on), torch::empty({4}, on), torch::empty({4}, on)});
  g.group->barrier();
  EXPECT_EQ(g.backend->calls, (std::vector<std::string>{"broadcast 32", "broadcast 8", "allreduce 512", "allreduce 64",
                                                        "allreduce 9", "barrier 0"}));
}

// The bug this guards against: statistics moved to the CPU (`.cpu()`) before an all-reduce on a
// GPU group. NCCL refuses them at the first log step; Gloo would take them, so the group refuses
// them on every backend, naming the collective and both devices, before the backend sees them.
TEST(ProcessGroupDevices, ATensorOffTheGroupsDeviceIsRefusedNamingTheCollective) {
  auto g = checked_group(kMeta, kMeta);
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const RuntimeError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto cpu = torch::zeros({9});
  const auto m = message([&] { g.group->allreduce_sum({torch::empty({}, torch::TensorOptions().device(kMeta)), cpu}); });
  EXPECT_NE(m.find("all-reduce"), std::string::npos) << m;
  EXPECT_NE(m.find("a tensor on cpu"), std::string::npos) << m;
  EXPECT_NE(m.find("communicates on meta"), std::string::npos) << m;
  EXPECT_NE(message([&] { g.group->allreduce_mean({cpu}, 1 << 20); }).find("gradient all-reduce"), std::string::npos);
  std::vector<at::Tensor> w = {cpu};
  EXPECT_NE(message([&] { g.group->broadcast(w, 0); }).find("broadcast"), std::string::npos);
  EXPECT_TRUE(g.backend->calls.empty());
}

// The checking backend does fail: a group that packs on another device than its backend's is
// caught, and the failure names the collective.
TEST(ProcessGroupDevices, TheCheckingBackendCatchesTensorsOffItsDevice) {
  auto g = checked_group(c10::Device(c10::kCPU), kMeta);
  try {
    g.group->allreduce_sum({torch::zeros({4})});
    FAIL() << "a CPU tensor reached a meta backend";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("distributed all-reduce failed"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("DeviceCheckingBackend allreduce: tensor on cpu"), std::string::npos) << e.what();
  }
  try {
    g.group->allreduce_mean({torch::zeros({4})}, 1 << 20);
    FAIL() << "a CPU tensor reached a meta backend";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("gradient all-reduce"), std::string::npos) << e.what();
  }
}

// A normal end shuts the backend down (NCCL: flush, then destroy the communicators, and no
// "process group has NOT been destroyed" warning); an exception unwinding through the group
// (a peer died) aborts it instead, because flushing would wait on the dead peer.
TEST(ProcessGroupLifecycle, ShutdownOnANormalEndAbortWhileAnExceptionUnwinds) {
  auto ok = checked_group(kMeta, kMeta);
  const auto ok_backend = ok.backend;
  ok.group.reset();
  EXPECT_EQ(ok_backend->calls, std::vector<std::string>{"shutdown"});

  auto failing = checked_group(kMeta, kMeta);
  const auto failing_backend = failing.backend;
  try {
    const auto group = std::move(failing.group);
    throw RuntimeError("distributed gradient all-reduce failed");
  } catch (const RuntimeError&) {}
  EXPECT_EQ(failing_backend->calls, std::vector<std::string>{"abort"});

  // A group made while another exception is already in flight still shuts down normally.
  std::vector<std::string> inner_calls;
  try {
    struct During {
      std::vector<std::string>* out;
      ~During() {
        auto g = checked_group(kMeta, kMeta);
        const auto b = g.backend;
        g.group.reset();
        *out = b->calls;
      }
    } during{&inner_calls};
    throw RuntimeError("unwinding");
  } catch (const RuntimeError&) {}
  EXPECT_EQ(inner_calls, std::vector<std::string>{"shutdown"});
}

}  // namespace
}  // namespace difftrain

// Data parallelism over c10d, the engine PyTorch's own DDP runs on: the World read from the
// launcher's environment (torchrun, Slurm srun, scripts/launch.sh), a process group (TCPStore,
// then Gloo on the CPU or NCCL on CUDA), bucketed gradient averaging, parameter broadcast, and a
// stop request that every rank honours at the same step.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "difftrain/config.h"

namespace difftrain {

struct World {
  int64_t rank = 0, world_size = 1;
  int64_t local_rank = 0, local_world_size = 1;
  int64_t node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string launcher = "none";  // none | torchrun | slurm (launch.sh sets torchrun's variables)
  bool use_agent_store = false;   // torchrun's agent hosts the TCPStore; every rank is a client
  int64_t restart_count = 0;      // TORCHELASTIC_RESTART_COUNT (store prefix /worker/attempt_N)
  bool distributed() const { return world_size > 1; }
};

// Reads the World from environment variables: torchrun's (RANK, LOCAL_RANK, WORLD_SIZE,
// LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE,
// TORCHELASTIC_RESTART_COUNT) win over Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
// SLURM_NODEID, SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE, SLURM_JOB_NODELIST for
// MASTER_ADDR); neither gives a world of 1. Bad or inconsistent values are a UsageError naming the variable.
World world_from_env(const std::map<std::string, std::string>& env);
World world_from_environment();  // the process environment

// The first host of a Slurm nodelist: "node[03-05,07],gpu1" -> "node03".
std::string slurm_first_host(const std::string& nodelist);
// All hosts of a Slurm nodelist, in order: "a[1-2],b" -> a1 a2 b.
std::vector<std::string> expand_slurm_nodelist(const std::string& nodelist);

// The c10d process group and what the trainer does with it. Every collective has the timeout
// given; one that fails or times out throws RuntimeError naming the collective, so a dead or
// hung peer makes every other rank exit non-zero instead of waiting forever.
class ProcessGroup {
 public:
  // Connects to the TCPStore (rank 0 hosts it unless torchrun's agent does) and creates the
  // backend: NCCL for CUDA devices, Gloo for the CPU (backend auto), or the one named.
  ProcessGroup(const World& world, DistBackend backend, const c10::Device& device, std::chrono::milliseconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  const World& world() const { return world_; }
  std::string backend_name() const;

  // In place: rank `root`'s values everywhere.
  void broadcast(std::vector<at::Tensor>& tensors, int64_t root = 0);
  // In place: the mean over ranks, through flat buckets of at most bucket_bytes each (one
  // all-reduce per bucket, all in flight together). Tensors must share a device and dtype.
  void allreduce_mean(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes);
  // In place: the sum over ranks.
  void allreduce_sum(std::vector<at::Tensor>& tensors);
  void barrier();

  // A small string from rank 0 to every rank, through the store.
  std::string share_from_rank0(const std::string& key, const std::string& value_on_rank0);

  // Stop agreement without a collective: a rank that has a stop request publishes the step at
  // which all ranks stop (its step + 2: ranks are at most one step apart, being in lockstep
  // through the gradient all-reduce); the first request wins. Returns that step once any rank
  // has asked, checked with one store round trip.
  std::optional<int64_t> stop_step(bool local_request, int64_t step);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  World world_;
  std::chrono::milliseconds timeout_;
  std::optional<int64_t> stop_at_;
  bool published_ = false;
};

}  // namespace difftrain

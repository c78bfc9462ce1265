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
#include <c10/util/intrusive_ptr.h>

#include "difftrain/config.h"

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

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

// The c10d process group and what the trainer does with it. Every collective takes tensors on
// device() (NCCL accepts only tensors on its own GPU; Gloo would silently take any, so the check
// is ours and holds for every backend). A collective that fails throws RuntimeError naming it, so
// a dead or hung peer makes every other rank exit non-zero instead of waiting forever: Gloo fails
// the collective after the timeout given, NCCL's watchdog aborts it (and the process).
class ProcessGroup {
 public:
  // Connects to the TCPStore (rank 0 hosts it unless torchrun's agent does) and creates the
  // backend: NCCL for CUDA devices, Gloo for the CPU (backend auto), or the one named. `device`
  // is the rank's training device; NCCL binds to it and connects eagerly.
  ProcessGroup(const World& world, DistBackend backend, const c10::Device& device, std::chrono::milliseconds timeout);
  // Over a backend made by the caller (tests wrap one to check what reaches it).
  ProcessGroup(const World& world, c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> backend,
               std::string name, const c10::Device& device, std::chrono::milliseconds timeout);
  // Shuts the backend down (NCCL: flushes and destroys its communicators) on a normal exit, or
  // aborts it while an exception unwinds (a peer failed: flushing would wait on it).
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  const World& world() const { return world_; }
  std::string backend_name() const;
  const c10::Device& device() const { return device_; }  // where collectives take their tensors

  // In place: rank `root`'s values everywhere.
  void broadcast(std::vector<at::Tensor>& tensors, int64_t root = 0);
  // In place: the mean over ranks, through flat buckets of at most bucket_bytes each (one
  // all-reduce per bucket, all in flight together). Tensors must share a device and dtype.
  void allreduce_mean(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes);
  // In place: the sum over ranks, all tensors packed into one all-reduce (small things such as
  // logged statistics). Tensors must share a device and dtype.
  void allreduce_sum(const std::vector<at::Tensor>& tensors);
  void barrier();

  // A small string from rank 0 to every rank, through the store.
  std::string share_from_rank0(const std::string& key, const std::string& value_on_rank0);

  // Stop agreement without a collective: a rank that has a stop request publishes the step at
  // which all ranks stop (its step + 2: ranks are at most one step apart, being in lockstep
  // through the gradient all-reduce); the first request wins. Returns that step once any rank
  // has asked, checked with one store round trip.
  std::optional<int64_t> stop_step(bool local_request, int64_t step);

 private:
  // RuntimeError naming `what` unless every tensor is on device().
  void check_device(const std::vector<at::Tensor>& tensors, const char* what) const;

  struct Impl;
  std::unique_ptr<Impl> impl_;
  World world_;
  c10::Device device_;
  std::chrono::milliseconds timeout_;
  int uncaught_at_start_ = 0;  // std::uncaught_exceptions() when made: more at destruction = failing
  std::optional<int64_t> stop_at_;
  bool published_ = false;
};

}  // namespace difftrain

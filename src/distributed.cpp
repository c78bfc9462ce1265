#include "difftrain/distributed.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "difftrain/errors.h"
#include "difftrain/log.h"

#ifdef DIFFTRAIN_WITH_NCCL
#include "cuda/nccl_backend.h"
#endif

extern char** environ;

namespace difftrain {

// ---------------------------------------------------------------------------------------------
// World

namespace {

std::optional<std::string> get(const std::map<std::string, std::string>& env, const std::string& key) {
  const auto it = env.find(key);
  if (it == env.end() || it->second.empty()) return std::nullopt;
  return it->second;
}

int64_t parse_int(const std::map<std::string, std::string>& env, const std::string& key, int64_t min, int64_t max) {
  const std::string v = *get(env, key);
  size_t pos = 0;
  int64_t n = 0;
  try {
    n = std::stoll(v, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos != v.size() || n < min || n > max)
    throw UsageError(fmt::format("environment variable {}={}: expected an integer in [{}, {}]", key, v, min, max));
  return n;
}

}  // namespace

std::vector<std::string> expand_slurm_nodelist(const std::string& nodelist) {
  // Grammar: host[,host...], host = prefix[ranges]suffix? with ranges = a[-b][,c[-d]...]; zero
  // padding of a range start is kept ("node[03-05]" -> node03 node04 node05).
  std::vector<std::string> hosts;
  size_t i = 0;
  const auto bad = [&] { return UsageError(fmt::format("SLURM_JOB_NODELIST={}: not a Slurm hostlist", nodelist)); };
  while (i < nodelist.size()) {
    std::string prefix;
    while (i < nodelist.size() && nodelist[i] != ',' && nodelist[i] != '[') prefix += nodelist[i++];
    if (i < nodelist.size() && nodelist[i] == '[') {
      const size_t close = nodelist.find(']', i);
      if (close == std::string::npos) throw bad();
      const std::string ranges = nodelist.substr(i + 1, close - i - 1);
      i = close + 1;
      std::string suffix;
      while (i < nodelist.size() && nodelist[i] != ',') suffix += nodelist[i++];
      size_t r = 0;
      while (r <= ranges.size()) {
        size_t end = ranges.find(',', r);
        if (end == std::string::npos) end = ranges.size();
        const std::string range = ranges.substr(r, end - r);
        const size_t dash = range.find('-');
        const std::string lo = range.substr(0, dash), hi = dash == std::string::npos ? lo : range.substr(dash + 1);
        if (lo.empty() || hi.empty() || !std::all_of(lo.begin(), lo.end(), ::isdigit) || !std::all_of(hi.begin(), hi.end(), ::isdigit) ||
            lo.size() > 9 || hi.size() > 9)
          throw bad();
        const long a = std::stol(lo), b = std::stol(hi);
        if (b < a || b - a > 100000) throw bad();
        for (long n = a; n <= b; ++n) hosts.push_back(prefix + fmt::format("{:0{}d}", n, lo.size()) + suffix);
        r = end + 1;
      }
    } else if (!prefix.empty()) {
      hosts.push_back(prefix);
    }
    if (i < nodelist.size() && nodelist[i] == ',') ++i;
  }
  if (hosts.empty()) throw bad();
  return hosts;
}

std::string slurm_first_host(const std::string& nodelist) { return expand_slurm_nodelist(nodelist).front(); }

World world_from_env(const std::map<std::string, std::string>& env) {
  World w;
  constexpr int64_t kMax = int64_t{1} << 24;
  if (get(env, "WORLD_SIZE") || get(env, "RANK")) {  // torchrun, scripts/launch.sh, or set by hand
    for (const char* key : {"RANK", "WORLD_SIZE"})
      if (!get(env, key)) throw UsageError(fmt::format("environment: {} is set but {} is not (torchrun sets both)",
                                                       std::string(key) == "RANK" ? "WORLD_SIZE" : "RANK", key));
    w.launcher = "torchrun";
    w.world_size = parse_int(env, "WORLD_SIZE", 1, kMax);
    w.rank = parse_int(env, "RANK", 0, w.world_size - 1);
    w.local_rank = get(env, "LOCAL_RANK") ? parse_int(env, "LOCAL_RANK", 0, kMax) : w.rank;
    w.local_world_size = get(env, "LOCAL_WORLD_SIZE") ? parse_int(env, "LOCAL_WORLD_SIZE", 1, kMax) : w.world_size;
    w.node_rank = get(env, "GROUP_RANK") ? parse_int(env, "GROUP_RANK", 0, kMax) : w.rank / w.local_world_size;
    w.use_agent_store = get(env, "TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    w.restart_count = get(env, "TORCHELASTIC_RESTART_COUNT") ? parse_int(env, "TORCHELASTIC_RESTART_COUNT", 0, kMax) : 0;
  } else if (get(env, "SLURM_PROCID") && get(env, "SLURM_NTASKS")) {  // srun
    w.launcher = "slurm";
    w.world_size = parse_int(env, "SLURM_NTASKS", 1, kMax);
    w.rank = parse_int(env, "SLURM_PROCID", 0, w.world_size - 1);
    w.local_rank = get(env, "SLURM_LOCALID") ? parse_int(env, "SLURM_LOCALID", 0, kMax) : 0;
    w.node_rank = get(env, "SLURM_NODEID") ? parse_int(env, "SLURM_NODEID", 0, kMax) : 0;
    if (get(env, "SLURM_NTASKS_PER_NODE")) {
      w.local_world_size = parse_int(env, "SLURM_NTASKS_PER_NODE", 1, kMax);
    } else if (const auto tpn = get(env, "SLURM_TASKS_PER_NODE")) {  // "4(x2)" or "4,3": this node's count is what matters
      w.local_world_size = std::max<int64_t>(1, std::atoll(tpn->c_str()));
    } else {
      w.local_world_size = w.world_size;
    }
    if (!get(env, "MASTER_ADDR")) {
      const auto nodelist = get(env, "SLURM_JOB_NODELIST") ? get(env, "SLURM_JOB_NODELIST") : get(env, "SLURM_NODELIST");
      if (w.world_size > 1 && !nodelist)
        throw UsageError("environment: under Slurm with SLURM_NTASKS > 1, set MASTER_ADDR or SLURM_JOB_NODELIST");
      if (nodelist) w.master_addr = slurm_first_host(*nodelist);
    }
  } else {
    return w;  // a world of one
  }
  if (const auto addr = get(env, "MASTER_ADDR")) w.master_addr = *addr;
  if (get(env, "MASTER_PORT")) w.master_port = static_cast<int>(parse_int(env, "MASTER_PORT", 1, 65535));
  else if (w.launcher == "slurm" && get(env, "SLURM_JOB_ID"))  // a per-job port, so jobs sharing a node do not collide
    w.master_port = 15000 + static_cast<int>(parse_int(env, "SLURM_JOB_ID", 0, INT64_MAX / 2) % 20000);
  if (w.local_rank >= w.local_world_size)
    throw UsageError(fmt::format("environment: local rank {} is not below the local world size {}", w.local_rank,
                                 w.local_world_size));
  if (w.local_world_size > w.world_size)
    throw UsageError(fmt::format("environment: local world size {} exceeds the world size {}", w.local_world_size, w.world_size));
  return w;
}

World world_from_environment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return world_from_env(env);
}

// ---------------------------------------------------------------------------------------------
// ProcessGroup

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::string name;
};

namespace {
// Runs a collective and waits on it; a failure names the collective. wait() without a timeout:
// with one, NCCL's WorkNCCL::wait busy-waits on the host until the collective completes (a
// host sync per bucket per step); without, it only makes the current stream wait. The timeout
// is still enforced: Gloo fails the operation after its timeout (set per collective below),
// NCCL's watchdog aborts a collective older than ProcessGroupNCCL::Options::timeout.
template <typename Launch> void run_and_wait(Launch&& launch, const char* what, std::chrono::milliseconds timeout) {
  try {
    launch()->wait();
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("distributed {} failed (a peer died, hung past distributed.timeout_s = {} s, or lost its "
                                   "connection): {}", what, timeout.count() / 1000, e.what()));
  }
}
}  // namespace

namespace {

// The local address of this host's route to `host` (a UDP connect sends nothing); nullopt when
// there is none.
std::optional<std::string> local_address_towards(const std::string& host) {
  addrinfo hints{}, *found = nullptr;
  hints.ai_socktype = SOCK_DGRAM;
  if (getaddrinfo(host.c_str(), "9", &hints, &found) != 0) return std::nullopt;
  std::optional<std::string> out;
  for (addrinfo* a = found; a && !out; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, SOCK_DGRAM, 0);
    sockaddr_storage local{};
    socklen_t len = sizeof local;
    char text[INET6_ADDRSTRLEN] = {};
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0 &&
        getnameinfo(reinterpret_cast<sockaddr*>(&local), len, text, sizeof text, nullptr, 0, NI_NUMERICHOST) == 0)
      out = text;
    if (fd >= 0) ::close(fd);
  }
  freeaddrinfo(found);
  return out;
}

// Gloo's devices: one per interface in GLOO_SOCKET_IFNAME (comma-separated, as torch.distributed
// reads it); otherwise the address this host uses to reach MASTER_ADDR, which the other nodes can
// reach when they reach the master. (c10d's default device resolves the hostname, which Debian's
// /etc/hosts maps to a loopback address: ranks on other nodes, or in other network namespaces,
// then cannot connect.)
std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices(const std::string& master_addr) {
  std::vector<std::shared_ptr<::gloo::transport::Device>> out;
  if (const char* names = std::getenv("GLOO_SOCKET_IFNAME"); names && *names) {
    std::string list = names;
    for (size_t begin = 0; begin <= list.size();) {
      const size_t end = std::min(list.find(',', begin), list.size());
      const std::string name = list.substr(begin, end - begin);
      begin = end + 1;
      if (name.empty()) continue;
      try {
        out.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      } catch (const std::exception& e) {
        throw UsageError(fmt::format("GLOO_SOCKET_IFNAME={}: cannot use network interface \"{}\": {}", list, name, e.what()));
      }
    }
    if (!out.empty()) return out;
  }
  if (const auto local = local_address_towards(master_addr)) return {c10d::ProcessGroupGloo::createDeviceForHostname(*local)};
  return {c10d::ProcessGroupGloo::createDefaultDevice()};
}

}  // namespace

ProcessGroup::ProcessGroup(const World& world, DistBackend backend, const c10::Device& device, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()),
      world_(world),
      device_(device),
      timeout_(timeout),
      uncaught_at_start_(std::uncaught_exceptions()) {
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(world.master_port);
  so.isServer = !world.use_agent_store && world.rank == 0;
  so.numWorkers = static_cast<size_t>(world.world_size);
  so.waitWorkers = !world.use_agent_store;
  so.timeout = timeout;
  try {
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, so);
    if (world.use_agent_store)  // as torch.distributed's env:// rendezvous does under torchelastic
      store = c10::make_intrusive<c10d::PrefixStore>(fmt::format("/worker/attempt_{}", world.restart_count), store);
    impl_->store = store;
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("cannot reach the TCPStore at {}:{} as rank {} of {} (distributed.timeout_s = {}): {}",
                                   world.master_addr, world.master_port, world.rank, world.world_size, timeout.count() / 1000,
                                   e.what()));
  }
  if (backend == DistBackend::auto_) backend = device.is_cuda() ? DistBackend::nccl : DistBackend::gloo;
  if (backend == DistBackend::nccl) {
    if (!device.is_cuda())
      throw UsageError(fmt::format("distributed.backend = nccl needs CUDA devices (training on {}); use gloo or auto",
                                   device.str()));
#ifdef DIFFTRAIN_WITH_NCCL
    impl_->backend = cuda::make_nccl_backend(impl_->store, world.rank, world.world_size, device, timeout);
    impl_->name = "nccl";
#else
    throw UsageError(
        "distributed.backend = nccl: this difftrain was built without NCCL (a CPU-only LibTorch, or "
        "-DDIFFTRAIN_WITH_NCCL=OFF at configure time)");
#endif
  } else {
    // The timeout of every Gloo operation (the per-collective option below overrides it).
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices = gloo_devices(world.master_addr);
    impl_->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, static_cast<int>(world.rank),
                                                                 static_cast<int>(world.world_size), opts);
    impl_->name = "gloo";
  }
}

ProcessGroup::ProcessGroup(const World& world, c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> backend,
                           std::string name, const c10::Device& device, std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()),
      world_(world),
      device_(device),
      timeout_(timeout),
      uncaught_at_start_(std::uncaught_exceptions()) {
  impl_->store = std::move(store), impl_->backend = std::move(backend), impl_->name = std::move(name);
}

ProcessGroup::~ProcessGroup() {
  if (!impl_->backend) return;
  const bool failing = std::uncaught_exceptions() > uncaught_at_start_;
  try {
    // As torch.distributed.destroy_process_group does: without it ProcessGroupNCCL's destructor
    // warns that the group was not destroyed, and aborts. shutdown() flushes pending collectives,
    // which would wait for a dead peer; abort() does not.
    if (failing) impl_->backend->abort();
    else impl_->backend->shutdown();
  } catch (const std::exception& e) {
    log_warn("distributed: {} {} failed: {}", impl_->name, failing ? "abort" : "shutdown", e.what());
  }
}

std::string ProcessGroup::backend_name() const { return impl_->name; }

void ProcessGroup::check_device(const std::vector<at::Tensor>& tensors, const char* what) const {
  for (const auto& t : tensors)
    if (t.device() != device_)
      throw RuntimeError(
          fmt::format("distributed {}: a tensor on {}, but this process group communicates on {} (NCCL "
                      "takes only tensors on its own GPU)",
                      what, t.device().str(), device_.str()));
}

void ProcessGroup::broadcast(std::vector<at::Tensor>& tensors, int64_t root) {
  c10::NoGradGuard no_grad;
  check_device(tensors, "broadcast");
  for (auto& t : tensors) {  // one tensor per call: c10d broadcasts a list as one tensor per device
    std::vector<at::Tensor> one = {t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = timeout_;
    run_and_wait([&] { return impl_->backend->broadcast(one, o); }, "broadcast", timeout_);
  }
}

namespace {
// Consecutive tensors packed into flat buffers of at most bucket_bytes each (one tensor may
// exceed it alone), as DDP's Reducer packs them. On the tensors' device.
std::vector<std::vector<at::Tensor>> buckets_of(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  std::vector<std::vector<at::Tensor>> buckets(1);
  int64_t bytes = 0;
  for (const auto& t : tensors) {
    if (!buckets.back().empty() && bytes + static_cast<int64_t>(t.nbytes()) > bucket_bytes) buckets.emplace_back(), bytes = 0;
    buckets.back().push_back(t);
    bytes += static_cast<int64_t>(t.nbytes());
  }
  return buckets;
}

at::Tensor flatten(const std::vector<at::Tensor>& bucket) {  // (Σ numel)
  std::vector<at::Tensor> views;
  for (const auto& t : bucket) views.push_back(t.reshape({-1}));
  return at::cat(views);
}

void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& bucket) {
  int64_t offset = 0;
  for (const auto& t : bucket) {
    t.copy_(flat.slice(0, offset, offset + t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}
}  // namespace

void ProcessGroup::allreduce_sum(const std::vector<at::Tensor>& tensors) {
  c10::NoGradGuard no_grad;
  if (tensors.empty()) return;
  check_device(tensors, "all-reduce");
  std::vector<at::Tensor> flat = {flatten(tensors)};
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  run_and_wait([&] { return impl_->backend->allreduce(flat, o); }, "all-reduce", timeout_);
  unflatten(flat[0], tensors);
}

void ProcessGroup::allreduce_mean(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  c10::NoGradGuard no_grad;
  if (tensors.empty()) return;
  check_device(tensors, "gradient all-reduce");
  const auto buckets = buckets_of(tensors, bucket_bytes);
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  const char* what = "gradient all-reduce";
  try {  // every bucket in flight before the first wait
    for (const auto& bucket : buckets) {
      std::vector<at::Tensor> flat = {flatten(bucket).div_(static_cast<double>(world_.world_size))};
      c10d::AllreduceOptions o;
      o.timeout = timeout_;
      works.push_back(impl_->backend->allreduce(flat, o));
      flats.push_back(flat[0]);
    }
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("distributed {} failed: {}", what, e.what()));
  }
  for (size_t b = 0; b < buckets.size(); ++b) {
    run_and_wait([&] { return works[b]; }, what, timeout_);
    unflatten(flats[b], buckets[b]);
  }
}

void ProcessGroup::barrier() {
  c10d::BarrierOptions o;
  o.timeout = timeout_;
  if (device_.is_cuda()) o.device_ids = {device_.index()};  // NCCL's barrier all-reduces a tensor on this GPU
  run_and_wait([&] { return impl_->backend->barrier(o); }, "barrier", timeout_);
}

std::string ProcessGroup::share_from_rank0(const std::string& key, const std::string& value_on_rank0) {
  const std::string k = "difftrain/" + key;
  try {
    if (world_.rank == 0) impl_->store->set(k, std::vector<uint8_t>(value_on_rank0.begin(), value_on_rank0.end()));
    const auto v = impl_->store->get(k);  // waits up to the store timeout
    return {v.begin(), v.end()};
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("distributed: waiting for rank 0's {} failed: {}", key, e.what()));
  }
}

std::optional<int64_t> ProcessGroup::stop_step(bool local_request, int64_t step) {
  if (stop_at_) return stop_at_;
  const std::string key = "difftrain/stop_at";
  try {
    if (local_request && !published_) {
      const std::string mine = std::to_string(step + 2);
      impl_->store->compareSet(key, {}, std::vector<uint8_t>(mine.begin(), mine.end()));  // the first request wins
      published_ = true;
    }
    if (impl_->store->check({key})) {
      const auto v = impl_->store->get(key);
      stop_at_ = std::stoll(std::string(v.begin(), v.end()));
    }
  } catch (const std::exception& e) {
    throw RuntimeError(fmt::format("distributed: the store at {}:{} failed: {}", world_.master_addr, world_.master_port, e.what()));
  }
  return stop_at_;
}

}  // namespace difftrain

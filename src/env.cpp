#include "difftrain/env.h"

#include <dlfcn.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <map>
#include <thread>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "difftrain/errors.h"
#include "difftrain/peak.h"
#include "difftrain/version.h"

#ifdef DIFFTRAIN_WITH_CUDA
#include "cuda/cuda_probe.h"
#endif
#ifdef DIFFTRAIN_WITH_NCCL
#include "cuda/nccl_backend.h"
#endif

namespace difftrain {

const char* to_string(CudaState s) {
  switch (s) {
    case CudaState::ok: return "ok";
    case CudaState::not_built: return "difftrain built without CUDA";
    case CudaState::no_driver: return "no NVIDIA driver";
    case CudaState::driver_too_old: return "NVIDIA driver too old for this CUDA runtime";
    case CudaState::no_device: return "no CUDA device visible";
    case CudaState::error: return "CUDA error";
  }
  return "?";
}

namespace {

// "KEY=value" pairs of at::show_config()'s "Build settings" line: what the library we run with
// was built as (the headers only tell what we compiled against).
std::map<std::string, std::string> build_settings(const std::string& config) {
  std::map<std::string, std::string> out;
  const auto start = config.find("Build settings:");
  if (start == std::string::npos) return out;
  const std::string line = config.substr(start + 15, config.find('\n', start) - start - 15);
  size_t pos = 0;
  while (pos < line.size()) {
    size_t comma = line.find(", ", pos);
    // CXX_FLAGS holds commas of its own only rarely; a chunk without '=' belongs to the previous value.
    std::string item = line.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (auto eq = item.find('='); eq != std::string::npos) {
      size_t b = item.find_first_not_of(' ');
      out[item.substr(b, eq - b)] = item.substr(eq + 1);
    }
    if (comma == std::string::npos) break;
    pos = comma + 2;
  }
  return out;
}

bool flag_on(const std::map<std::string, std::string>& s, const std::string& key) {
  auto it = s.find(key);
  return it != s.end() && (it->second == "ON" || it->second == "1" || it->second == "TRUE");
}

// Version of a library LibTorch has already loaded (libtorch_cuda links cuDNN and NCCL).
void* loaded_symbol(const char* soname, const char* symbol) {
  void* handle = dlopen(soname, RTLD_LAZY | RTLD_NOLOAD);
  if (!handle) return nullptr;
  void* sym = dlsym(handle, symbol);
  dlclose(handle);
  return sym;
}

std::string cudnn_runtime_version() {
  using Fn = size_t (*)();
  auto fn = reinterpret_cast<Fn>(loaded_symbol("libcudnn.so.9", "cudnnGetVersion"));
  if (!fn) return {};
  const size_t v = fn();  // 9.19.0 -> 91900
  return fmt::format("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100);
}

std::string nccl_version_text(int v) { return fmt::format("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100); }  // NCCL >= 2.9

std::string nccl_runtime_version() {
  using Fn = int (*)(int*);
  auto fn = reinterpret_cast<Fn>(loaded_symbol("libnccl.so.2", "ncclGetVersion"));
  int v = 0;
  if (!fn || fn(&v) != 0) return {};
  return nccl_version_text(v);
}

// "2.28.9" -> "2.28": NCCL keeps its ABI (ncclConfig_t included) within a minor version.
std::string major_minor(const std::string& v) { return v.substr(0, v.rfind('.')); }

// The "CPU capability usage: AVX512" line of at::show_config(): the kernel level ATen dispatches
// to (ATEN_CPU_CAPABILITY can lower it; at::native::get_cpu_capability is not exported).
std::string cpu_capability_of(const std::string& config) {
  const auto p = config.find("CPU capability usage: ");
  return p == std::string::npos ? std::string() : config.substr(p + 22, config.find('\n', p) - p - 22);
}

std::string cuda_version_text(int v) { return v ? fmt::format("{}.{}", v / 1000, (v % 1000) / 10) : "none"; }

// "989.5 TFLOP/s bf16, 67 TFLOP/s fp32 (dense, datasheet)": the peaks train/mfu divides by.
std::string gpu_peak_text(const std::string& name) {
  const auto bf16 = peak_tflops(name, PeakPrecision::bf16), fp32 = peak_tflops(name, PeakPrecision::fp32);
  if (!bf16 && !fp32) return "not in the table; set run.peak_tflops for train/mfu";
  return fmt::format("{}, {} (dense, from the datasheet; the denominator of train/mfu)",
                     bf16 ? fmt::format("{:g} TFLOP/s bf16", *bf16) : std::string("no bf16"),
                     fmt::format("{:g} TFLOP/s fp32", *fp32));
}

nlohmann::ordered_json gpu_peak_json(const std::string& name) {
  nlohmann::ordered_json j;
  for (const auto p : {PeakPrecision::bf16, PeakPrecision::fp16, PeakPrecision::tf32, PeakPrecision::fp32}) {
    const auto v = peak_tflops(name, p);
    j[to_string(p)] = v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
  }
  return j;
}

}  // namespace

EnvReport collect_env() {
  EnvReport e;
  e.difftrain_version = kVersion;
  e.compiler = fmt::format("GCC {}.{}.{}", __GNUC__, __GNUC_MINOR__, __GNUC_PATCHLEVEL__);
  e.torch_version_built = TORCH_VERSION;
  const std::string config = at::show_config();  // builds a long string: ask once
  const auto settings = build_settings(config);
  auto get = [&](const char* k) { auto it = settings.find(k); return it == settings.end() ? std::string() : it->second; };
  e.torch_version_runtime = get("TORCH_VERSION");
  e.torch_cuda_built = flag_on(settings, "USE_CUDA");
  if (std::string v = get("CUDA_VERSION"); !v.empty()) {
    const auto dot = v.find('.');
    e.torch_cuda_compiled = std::atoi(v.c_str()) * 1000 + (dot == std::string::npos ? 0 : std::atoi(v.c_str() + dot + 1) * 10);
  }
  e.gloo_available = flag_on(settings, "USE_GLOO");
  e.nccl_available = flag_on(settings, "USE_NCCL");
  e.mpi_available = flag_on(settings, "USE_MPI");
#ifdef DIFFTRAIN_WITH_CUDA
  e.cuda = cuda::probe();
#else
  e.cuda.state = CudaState::not_built;
  e.torch_cuda_built = false;  // linked without libtorch_cuda, whatever the library was built with
#endif
  e.cudnn_version = cudnn_runtime_version();
  e.nccl_version = nccl_runtime_version();
#ifdef DIFFTRAIN_WITH_NCCL
  e.nccl_compiled_version = nccl_version_text(cuda::nccl_header_version());
#endif
  e.hardware_threads = static_cast<int>(std::thread::hardware_concurrency());
  e.torch_threads = at::get_num_threads();
  e.cpu_capability = cpu_capability_of(config);
  return e;
}

std::string cpu_capability() { return cpu_capability_of(at::show_config()); }

std::string format_env(const EnvReport& e) {
  std::string s;
  auto line = [&](const std::string& k, const std::string& v) { s += fmt::format("{:<22}{}\n", k + ":", v); };
  line("difftrain", fmt::format("{} ({})", e.difftrain_version, e.compiler));
  line("LibTorch", fmt::format("{} (built against {} headers){}", e.torch_version_runtime.empty() ? "?" : e.torch_version_runtime,
                               e.torch_version_built,
                               e.torch_cuda_built ? fmt::format(", CUDA {} build", cuda_version_text(e.torch_cuda_compiled))
                                                  : ", CPU-only build"));
  line("CUDA runtime", cuda_version_text(e.cuda.runtime_version));
  line("CUDA driver", e.cuda.driver_version ? cuda_version_text(e.cuda.driver_version) : "none (no NVIDIA driver found)");
  line("CUDA usable", e.cuda.state == CudaState::ok
                          ? "yes"
                          : fmt::format("no: {}{}", to_string(e.cuda.state), e.cuda.detail.empty() ? "" : " (" + e.cuda.detail + ")"));
  line("cuDNN", e.cudnn_version.empty() ? "not loaded" : e.cudnn_version);
  std::string nccl = e.nccl_version.empty() ? "not loaded" : e.nccl_version;
  if (e.nccl_compiled_version.empty()) nccl += e.torch_cuda_built ? "; difftrain built without its NCCL backend" : "";
  else if (!e.nccl_version.empty() && major_minor(e.nccl_version) != major_minor(e.nccl_compiled_version))
    nccl += fmt::format(
        " -- MISMATCH: the NCCL backend was compiled against nccl.h {}; rebuild against the NCCL LibTorch "
        "loads",
        e.nccl_compiled_version);
  else nccl += fmt::format(" (compiled against {})", e.nccl_compiled_version);
  line("NCCL", nccl);
  if (e.cuda.gpus.empty()) line("GPUs", "none");
  for (const auto& g : e.cuda.gpus)
    line(fmt::format("GPU {}", g.index), fmt::format("{}, {:.1f} GiB, compute capability {}.{}, {} SMs", g.name,
                                                     static_cast<double>(g.total_memory_bytes) / (1024.0 * 1024.0 * 1024.0), g.major,
                                                     g.minor, g.multiprocessor_count));
  for (const auto& g : e.cuda.gpus) line(fmt::format("GPU {} peak", g.index), gpu_peak_text(g.name));
  line("CPU threads", fmt::format("{} hardware, {} used by LibTorch{}", e.hardware_threads, e.torch_threads,
                                  e.cpu_capability.empty() ? "" : ", " + e.cpu_capability));
  std::string backends;
  if (e.gloo_available) backends += "gloo ";
  if (e.nccl_available && e.cuda.state == CudaState::not_built) backends += "nccl (not in this build) ";
  else if (e.nccl_available) backends += e.cuda.state == CudaState::ok ? "nccl " : "nccl (needs a GPU) ";
  if (e.mpi_available) backends += "mpi ";
  line("Distributed backends", backends.empty() ? "none" : backends.substr(0, backends.size() - 1));
  return s;
}

nlohmann::ordered_json env_to_json(const EnvReport& e) {
  nlohmann::ordered_json gpus = nlohmann::ordered_json::array();
  for (const auto& g : e.cuda.gpus)
    gpus.push_back({{"index", g.index},
                    {"name", g.name},
                    {"total_memory_bytes", g.total_memory_bytes},
                    {"compute_capability", fmt::format("{}.{}", g.major, g.minor)},
                    {"multiprocessor_count", g.multiprocessor_count},
                    {"peak_tflops", gpu_peak_json(g.name)}});
  return {
      {"difftrain_version", e.difftrain_version},
      {"compiler", e.compiler},
      {"torch",
       {{"version", e.torch_version_runtime},
        {"built_against", e.torch_version_built},
        {"cuda_build", e.torch_cuda_built},
        {"cuda_compiled", e.torch_cuda_built ? cuda_version_text(e.torch_cuda_compiled) : ""}}},
      {"cuda",
       {{"usable", e.cuda.state == CudaState::ok},
        {"state", to_string(e.cuda.state)},
        {"detail", e.cuda.detail},
        {"runtime_version", e.cuda.runtime_version ? cuda_version_text(e.cuda.runtime_version) : ""},
        {"driver_version", e.cuda.driver_version ? cuda_version_text(e.cuda.driver_version) : ""}}},
      {"cudnn_version", e.cudnn_version},
      {"nccl_version", e.nccl_version},
      {"nccl_compiled_version", e.nccl_compiled_version},
      {"gpus", gpus},
      {"cpu", {{"hardware_threads", e.hardware_threads}, {"torch_threads", e.torch_threads}, {"capability", e.cpu_capability}}},
      {"distributed_backends", {{"gloo", e.gloo_available}, {"nccl", e.nccl_available}, {"mpi", e.mpi_available}}},
  };
}

int configure_threads(int num_threads) {
  const int n = num_threads > 0 ? num_threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  at::set_num_threads(n);
  return at::get_num_threads();
}

DeviceChoice resolve_device(const std::string& spec, const CudaStatus& cuda) {
  const std::string quoted = nlohmann::json(spec).dump();  // user text, escaped
  const std::optional<DeviceSpec> parsed = parse_device_spec(spec);
  if (!parsed) throw UsageError(fmt::format("run.device: unknown device {}; allowed: {}", quoted, kDeviceGrammar));
  if (parsed->kind == DeviceSpec::Kind::cpu) return {c10::Device(c10::kCPU), "run.device = \"cpu\""};
  const bool usable = cuda.state == CudaState::ok && !cuda.gpus.empty();
  auto reason = [&] {
    std::string why = cuda.state == CudaState::ok ? "no CUDA device could be queried" : to_string(cuda.state);
    return cuda.detail.empty() ? why : why + ": " + cuda.detail;
  };
  if (parsed->kind == DeviceSpec::Kind::auto_) {
    if (usable) return {c10::Device(c10::kCUDA, 0), fmt::format("run.device = \"auto\" chose cuda:0 ({})", cuda.gpus[0].name)};
    return {c10::Device(c10::kCPU), fmt::format("run.device = \"auto\" chose the CPU: CUDA is not usable ({})", reason())};
  }
  const int index = parsed->index.value_or(0);  // "cuda" is cuda:0
  if (!usable) {
    std::string why;
    switch (cuda.state) {
      case CudaState::not_built:
        why =
            "this difftrain was built without CUDA (a CPU-only LibTorch, or DIFFTRAIN_CUDA=OFF as in the CPU image); "
            "use a build against a CUDA LibTorch (see README) or the CUDA image (docs/DOCKER.md)";
        break;
      case CudaState::no_driver: why = "no NVIDIA driver was found (is libcuda.so installed and is this a GPU machine?)"; break;
      case CudaState::driver_too_old:
        why = fmt::format("the NVIDIA driver (CUDA {}) is older than the CUDA runtime ({}); update the driver",
                          cuda_version_text(cuda.driver_version), cuda_version_text(cuda.runtime_version));
        break;
      case CudaState::no_device: {
        const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
        why = fmt::format("the driver sees no CUDA device{}",
                          visible ? fmt::format(" (CUDA_VISIBLE_DEVICES={})", nlohmann::json(visible).dump()) : "");
        break;
      }
      case CudaState::ok: why = "no CUDA device could be queried"; break;
      case CudaState::error: why = "CUDA failed to initialise"; break;
    }
    if (!cuda.detail.empty()) why += " [" + cuda.detail + "]";
    throw UsageError(fmt::format("run.device = {} but CUDA is not usable: {}. Use run.device = \"cpu\" to train on the CPU.",
                                 quoted, why));
  }
  for (const auto& g : cuda.gpus)
    if (g.index == index)
      return {c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(g.index)),
              fmt::format("run.device = {}: {}", quoted, g.name)};
  throw UsageError(fmt::format("run.device = {} but only {} CUDA device(s) are visible (cuda:0 .. cuda:{})", quoted,
                               cuda.gpus.size(), cuda.gpus.size() - 1));
}

int local_cuda_device(int64_t local_rank, int64_t local_world_size, int device_count, std::optional<int> requested,
                      const std::string& launcher) {
  const bool slurm = launcher == "slurm";
  const std::string vars =
      fmt::format("{}={}, {}={}", slurm ? "SLURM_LOCALID" : "LOCAL_RANK", local_rank,
                  slurm ? "SLURM_NTASKS_PER_NODE (or SLURM_TASKS_PER_NODE)" : "LOCAL_WORLD_SIZE", local_world_size);
  if (local_rank < 0 || local_world_size < 1 || local_rank >= local_world_size)
    throw UsageError(fmt::format("environment: {}: the local rank must be in [0, local world size)", vars));
  if (device_count < 1)
    throw UsageError(fmt::format("{}: no CUDA device is visible to this rank (after CUDA_VISIBLE_DEVICES)", vars));
  if (requested) {
    if (*requested < 0 || *requested >= device_count)
      throw UsageError(fmt::format("run.device = \"cuda:{}\" but {} CUDA device(s) are visible to this rank ({})", *requested,
                                   device_count, vars));
    if (local_world_size == 1 || device_count == 1) return *requested;
    throw UsageError(
        fmt::format("run.device = \"cuda:{}\" would put all {} ranks of this node on one GPU ({}, {} CUDA devices "
                    "visible); use run.device = cuda or auto, and each rank takes its own",
                    *requested, local_world_size, vars, device_count));
  }
  if (device_count >= local_world_size) return static_cast<int>(local_rank);
  if (device_count == 1) return 0;
  throw UsageError(
      fmt::format("{} but {} CUDA device(s) are visible to this rank (after CUDA_VISIBLE_DEVICES): each rank needs "
                  "its own GPU, so either every rank sees at least {} devices (GPU = local rank) or exactly one "
                  "(srun --gpus-per-task=1). Start at most {} ranks per node, or change which GPUs each rank sees.",
                  vars, device_count, local_world_size, device_count));
}

}  // namespace difftrain

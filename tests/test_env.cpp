// Environment report and device choice. The report is checked against PyTorch itself (the same
// wheel, asked from Python), and the device rules against every CUDA failure state.
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "difftrain/config.h"
#include "difftrain/env.h"
#include "difftrain/errors.h"
#include "test_paths.h"

namespace difftrain {
namespace {

std::string capture(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

TEST(Env, VersionsAreConsistent) {
  const EnvReport e = collect_env();
  ASSERT_FALSE(e.torch_version_runtime.empty()) << "no TORCH_VERSION in at::show_config()";
  EXPECT_EQ(e.torch_version_runtime, TORCH_VERSION) << "running with a different LibTorch than the headers";
  EXPECT_EQ(e.hardware_threads, static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_TRUE(e.gloo_available) << "every LibTorch build this project supports has Gloo";
  EXPECT_EQ(e.cuda.state == CudaState::ok, !e.cuda.gpus.empty());
}

// The same facts, asked of PyTorch in the venv (same wheel, independent code path).
TEST(Env, AgreesWithPyTorch) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no project venv python";
  const std::string script =
      "import json, os, torch\n"
      "cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None\n"
      "try:\n  nccl = '.'.join(map(str, torch.cuda.nccl.version()))\nexcept Exception:\n  nccl = None\n"
      "print(json.dumps({'version': torch.__version__.split('+')[0], 'cuda_build': torch.version.cuda is not None,"
      " 'cuda': torch.cuda.is_available(), 'devices': torch.cuda.device_count(), 'cudnn': cudnn, 'nccl': nccl,"
      " 'gloo': torch.distributed.is_gloo_available(), 'cpus': os.cpu_count()}))\n";
  const std::string out = capture(python + " -c \"" + script + "\" 2>/dev/null");
  ASSERT_FALSE(out.empty()) << "python produced nothing";
  const auto py = nlohmann::json::parse(out.substr(out.find('{')));
  const EnvReport e = collect_env();
  EXPECT_EQ(e.torch_version_runtime, py["version"].get<std::string>());
  EXPECT_EQ(e.gloo_available, py["gloo"].get<bool>());
  EXPECT_EQ(e.hardware_threads, py["cpus"].get<int>());
#ifndef DIFFTRAIN_WITH_CUDA
  // Linked without libtorch_cuda (a CPU-only LibTorch, or -DDIFFTRAIN_CUDA=OFF against the CUDA
  // wheel that Python imports whole): no CUDA, cuDNN or NCCL, whatever PyTorch reports.
  EXPECT_FALSE(e.torch_cuda_built);
  EXPECT_EQ(e.cuda.state, CudaState::not_built);
  EXPECT_TRUE(e.cuda.gpus.empty());
  EXPECT_EQ(e.cudnn_version, "");
  EXPECT_EQ(e.nccl_version, "");
  return;
#endif
  EXPECT_EQ(e.torch_cuda_built, py["cuda_build"].get<bool>());
  EXPECT_EQ(e.cuda.state == CudaState::ok, py["cuda"].get<bool>());
  EXPECT_EQ(static_cast<int>(e.cuda.gpus.size()), py["devices"].get<int>());
  if (!py["cudnn"].is_null()) {
    const int v = py["cudnn"].get<int>();  // 91900
    EXPECT_EQ(e.cudnn_version, std::to_string(v / 10000) + "." + std::to_string(v % 10000 / 100) + "." + std::to_string(v % 100));
  }
  if (!py["nccl"].is_null()) {
    EXPECT_EQ(e.nccl_version, py["nccl"].get<std::string>());
  }
}

// The NCCL backend is compiled against the nccl.h of the NCCL that LibTorch loads: PyTorch's own
// answer (torch.cuda.nccl.version(), the library its wheel carries) has the same major.minor,
// within which NCCL keeps ncclConfig_t, which ProcessGroupNCCL::Options embeds.
TEST(Env, NcclBackendMatchesTheLoadedNccl) {
  const EnvReport e = collect_env();
#ifdef DIFFTRAIN_WITH_NCCL
  ASSERT_FALSE(e.nccl_compiled_version.empty());
  const std::string python = DIFFTRAIN_PYTHON;
  if (python.empty()) GTEST_SKIP() << "no project venv python";
  const std::string loaded =
      capture(python + " -c \"import torch; print('.'.join(map(str, torch.cuda.nccl.version()[:2])))\" 2>/dev/null");
  ASSERT_FALSE(loaded.empty());
  const std::string compiled = e.nccl_compiled_version.substr(0, e.nccl_compiled_version.rfind('.'));
  EXPECT_EQ(compiled + "\n", loaded) << "nccl.h " << e.nccl_compiled_version << " vs the NCCL PyTorch loads";
  EXPECT_EQ(format_env(e).find("MISMATCH"), std::string::npos) << format_env(e);
  EXPECT_EQ(env_to_json(e)["nccl_compiled_version"], e.nccl_compiled_version);
#else
  EXPECT_TRUE(e.nccl_compiled_version.empty());
  if (e.torch_cuda_built) EXPECT_NE(format_env(e).find("built without its NCCL backend"), std::string::npos);
#endif
}

TEST(Env, TextAndJsonCarryTheSameFacts) {
  const EnvReport e = collect_env();
  const std::string text = format_env(e);
  for (const char* key : {"LibTorch:", "CUDA runtime:", "CUDA driver:", "CUDA usable:", "cuDNN:", "NCCL:", "GPUs", "CPU threads:",
                          "Distributed backends:"})
    EXPECT_NE(text.find(key), std::string::npos) << key;
  EXPECT_NE(text.find(e.torch_version_runtime), std::string::npos);
  const auto j = env_to_json(e);
  EXPECT_EQ(j["torch"]["version"], e.torch_version_runtime);
  EXPECT_EQ(j["cuda"]["usable"], e.cuda.state == CudaState::ok);
  EXPECT_EQ(j["gpus"].size(), e.cuda.gpus.size());
  EXPECT_EQ(j["cpu"]["hardware_threads"], e.hardware_threads);
}

// Each GPU's datasheet peak (the denominator of train/mfu), or how to supply one.
TEST(Env, ReportsEachGpusPeak) {
  EnvReport e = collect_env();
  e.cuda.gpus = {GpuInfo{0, "NVIDIA H100 80GB HBM3", 85ull << 30, 9, 0, 132}, GpuInfo{1, "Tesla T4", 15ull << 30, 7, 5, 40},
                 GpuInfo{2, "Some Future GPU", 1ull << 30, 12, 0, 1}};
  const std::string text = format_env(e);
  EXPECT_NE(text.find("GPU 0 peak:           989.5 TFLOP/s bf16, 67 TFLOP/s fp32"), std::string::npos) << text;
  EXPECT_NE(text.find("GPU 1 peak:           no bf16, 8.1 TFLOP/s fp32"), std::string::npos) << text;
  EXPECT_NE(text.find("GPU 2 peak:           not in the table; set run.peak_tflops"), std::string::npos) << text;
  const auto j = env_to_json(e);
  EXPECT_EQ(j["gpus"][0]["peak_tflops"]["bf16"], 989.5);
  EXPECT_EQ(j["gpus"][0]["peak_tflops"]["tf32"], 494.5);
  EXPECT_TRUE(j["gpus"][1]["peak_tflops"]["bf16"].is_null());
  EXPECT_EQ(j["gpus"][1]["peak_tflops"]["fp16"], 65);
  EXPECT_TRUE(j["gpus"][2]["peak_tflops"]["fp32"].is_null());
}

TEST(Env, ThreadsDefaultToAllCores) {
  EXPECT_EQ(configure_threads(0), static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_EQ(configure_threads(1), 1);
  configure_threads(0);
}

// ---------------------------------------------------------------------------------------------
// Device choice: every CUDA state, synthesised.

CudaStatus status(CudaState s, int gpus = 0) {
  CudaStatus c;
  c.state = s;
  c.runtime_version = 13000;
  c.driver_version = s == CudaState::no_driver || s == CudaState::not_built ? 0 : 12040;
  for (int i = 0; i < gpus; ++i) c.gpus.push_back(GpuInfo{i, "NVIDIA H100 80GB HBM3", 85ull << 30, 9, 0, 132});
  return c;
}

std::string device_error(const std::string& spec, const CudaStatus& c) {
  try {
    resolve_device(spec, c);
  } catch (const UsageError& e) {
    return e.what();
  }
  return {};
}

TEST(Device, CudaRequestNeverFallsBackAndNamesTheCause) {
  EXPECT_NE(device_error("cuda", status(CudaState::not_built)).find("CPU-only LibTorch"), std::string::npos);
  EXPECT_NE(device_error("cuda", status(CudaState::no_driver)).find("no NVIDIA driver"), std::string::npos);
  EXPECT_NE(device_error("cuda", status(CudaState::driver_too_old)).find("driver (CUDA 12.4) is older than the CUDA runtime (13.0)"),
            std::string::npos);
  EXPECT_NE(device_error("cuda:0", status(CudaState::no_device)).find("sees no CUDA device"), std::string::npos);
  EXPECT_NE(device_error("cuda", status(CudaState::error)).find("failed to initialise"), std::string::npos);
  EXPECT_NE(device_error("cuda:1", status(CudaState::ok, 1)).find("only 1 CUDA device(s)"), std::string::npos);
  EXPECT_NE(device_error("tpu", status(CudaState::ok, 1)).find("unknown device \"tpu\""), std::string::npos);
  for (const char* bad : {"cuda:-1", "cuda:abc", "cuda:1x", "cuda:", "cuda:+1", "cuda:99999999999"})
    EXPECT_NE(device_error(bad, status(CudaState::ok, 1)).find("unknown device"), std::string::npos) << bad;
  EXPECT_NE(device_error("cuda", status(CudaState::ok, 0)).find("no CUDA device could be queried"), std::string::npos);
}

TEST(Device, GpusAreFoundByTheirIndex) {
  CudaStatus c = status(CudaState::ok, 3);
  c.gpus.erase(c.gpus.begin() + 1);  // device 1 could not be queried
  EXPECT_EQ(resolve_device("cuda:2", c).device, c10::Device(c10::kCUDA, 2));
  EXPECT_NE(device_error("cuda:1", c).find("only 2 CUDA device(s)"), std::string::npos);
}

// One grammar for run.device and every --device: auto | cpu | cuda | cuda:N with N of 1..3 digits.
TEST(Device, TheGrammarAcceptsAutoCpuCudaAndCudaN) {
  using Kind = DeviceSpec::Kind;
  auto kind = [](const char* s) { return parse_device_spec(s)->kind; };
  auto index = [](const char* s) { return parse_device_spec(s)->index; };
  EXPECT_EQ(kind("auto"), Kind::auto_);
  EXPECT_EQ(kind("cpu"), Kind::cpu);
  EXPECT_EQ(kind("cuda"), Kind::cuda);
  EXPECT_EQ(index("cuda"), std::nullopt);  // any GPU: resolve_device takes cuda:0, a distributed rank its own
  EXPECT_EQ(kind("cuda:0"), Kind::cuda);
  EXPECT_EQ(index("cuda:0"), 0);
  EXPECT_EQ(index("cuda:12"), 12);
  EXPECT_EQ(index("cuda:007"), 7);
  EXPECT_EQ(index("cuda:999"), kMaxCudaDeviceIndex);  // the bound
  for (const char* bad :
       {"",        "tpu",     "CPU",      "Cuda",    "auto ",    " cuda",   "cuda:",   "cuda:1000",        "cuda:0001",
        "cuda:-1", "cuda:+1", "cuda:0x1", "cuda:1x", "cuda:abc", "cuda: 1", "cuda:1 ", "cuda:99999999999", "cuda:1:2",
        "cuda0",   "cpu:0",   "mps"})
    EXPECT_FALSE(parse_device_spec(bad).has_value()) << '"' << bad << '"';
}

TEST(Device, ConfigValidationAndResolveDeviceShareTheGrammar) {
  for (const char* spec : {"auto", "cpu", "cuda", "cuda:0", "cuda:999", "cuda:1000", "cuda:-1", "tpu", "cuda:"}) {
    Config cfg;
    cfg.run.device = spec;
    const bool valid_config = validate(cfg).empty();
    const bool grammar_error = device_error(spec, status(CudaState::ok, 1)).find("unknown device") != std::string::npos;
    EXPECT_EQ(valid_config, parse_device_spec(spec).has_value()) << spec;
    EXPECT_EQ(grammar_error, !parse_device_spec(spec).has_value()) << spec;
  }
  Config cfg;
  cfg.run.device = "cuda:1000";
  const auto errors = validate(cfg);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("run.device: unknown device \"cuda:1000\"; allowed: auto | cpu | cuda | cuda:N (N = 0..999)"),
            std::string::npos)
      << errors[0];
}

TEST(Device, AutoPicksCudaWhenUsableAndSaysWhyNot) {
  const DeviceChoice gpu = resolve_device("auto", status(CudaState::ok, 2));
  EXPECT_EQ(gpu.device, c10::Device(c10::kCUDA, 0));
  EXPECT_NE(gpu.note.find("H100"), std::string::npos);
  const DeviceChoice cpu = resolve_device("auto", status(CudaState::no_driver));
  EXPECT_TRUE(cpu.device.is_cpu());
  EXPECT_NE(cpu.note.find("no NVIDIA driver"), std::string::npos);
  EXPECT_EQ(resolve_device("cuda:1", status(CudaState::ok, 2)).device, c10::Device(c10::kCUDA, 1));
  EXPECT_TRUE(resolve_device("cpu", status(CudaState::ok, 2)).device.is_cpu());
}

std::string local_device_error(int64_t local_rank, int64_t local_world_size, int count, std::optional<int> requested,
                               const std::string& launcher = "torchrun") {
  try {
    local_cuda_device(local_rank, local_world_size, count, requested, launcher);
  } catch (const UsageError& e) {
    return e.what();
  }
  return {};
}

TEST(Device, EachRankTakesItsLocalRankOrItsOnlyGpu) {
  EXPECT_EQ(local_cuda_device(3, 4, 4, std::nullopt), 3);           // torchrun on a node of 4 GPUs
  EXPECT_EQ(local_cuda_device(1, 2, 8, std::nullopt), 1);           // more GPUs than ranks
  EXPECT_EQ(local_cuda_device(3, 4, 1, std::nullopt, "slurm"), 0);  // srun --gpus-per-task=1: each task sees its own
  EXPECT_EQ(local_cuda_device(0, 1, 1, std::nullopt), 0);
  // A fixed cuda:N where it cannot put two ranks on one GPU: one rank on the node, or one visible GPU.
  EXPECT_EQ(local_cuda_device(0, 1, 4, 2), 2);
  EXPECT_EQ(local_cuda_device(2, 4, 1, 0), 0);
}

TEST(Device, TooFewGpusForTheLocalRanksIsAnErrorNamingTheVariables) {
  const std::string e = local_device_error(2, 4, 2, std::nullopt);
  EXPECT_NE(e.find("LOCAL_RANK=2, LOCAL_WORLD_SIZE=4 but 2 CUDA device(s) are visible"), std::string::npos) << e;
  EXPECT_NE(e.find("at most 2 ranks per node"), std::string::npos) << e;
  // Rank 0 of the same node is refused as well: the node as a whole does not fit.
  EXPECT_NE(local_device_error(0, 4, 2, std::nullopt).find("LOCAL_WORLD_SIZE=4"), std::string::npos);
  const std::string slurm = local_device_error(1, 3, 2, std::nullopt, "slurm");
  EXPECT_NE(slurm.find("SLURM_LOCALID=1, SLURM_NTASKS_PER_NODE (or SLURM_TASKS_PER_NODE)=3"), std::string::npos) << slurm;
  EXPECT_NE(local_device_error(0, 2, 0, std::nullopt).find("no CUDA device is visible"), std::string::npos);
  EXPECT_NE(local_device_error(2, 2, 2, std::nullopt).find("local rank must be in [0, local world size)"), std::string::npos);
  EXPECT_NE(local_device_error(0, 2, 1, 1).find("run.device = \"cuda:1\" but 1 CUDA device(s) are visible"), std::string::npos);
  const std::string fixed = local_device_error(1, 4, 4, 0);
  EXPECT_NE(fixed.find("run.device = \"cuda:0\" would put all 4 ranks of this node on one GPU"), std::string::npos) << fixed;
}

TEST(Device, RealEnvironmentIsConsistent) {
  const EnvReport e = collect_env();
  if (e.cuda.state == CudaState::ok) {
    EXPECT_TRUE(resolve_device("cuda", e.cuda).device.is_cuda());
  } else {
    EXPECT_THROW(resolve_device("cuda", e.cuda), UsageError);
  }
}

}  // namespace
}  // namespace difftrain

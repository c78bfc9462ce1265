// The CUDA path (label gpu): each test skips itself, with the reason, where CUDA is not usable, so
// CPU CI stays green; scripts/gpu-verify.sh runs them on a GPU machine (docs/GPU.md).
// Comparisons with the CPU turn TF32 off, so that both sides compute in float32.
#include <chrono>
#include <filesystem>
#include <fstream>

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDAFunctions.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include "difftrain/amp.h"
#include "difftrain/checkpoint.h"
#include "difftrain/data.h"
#include "difftrain/distributed.h"
#include "difftrain/ema.h"
#include "difftrain/env.h"
#include "difftrain/optim.h"
#include "difftrain/sampling.h"
#include "difftrain/scheduler.h"
#include "difftrain/trainer.h"
#include "difftrain/unet.h"
#include "numerics.h"
#include "stand_in.h"
#include "test_paths.h"
#include "unet_formats.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

const c10::Device kCuda(c10::kCUDA, 0);

// TF32 off for the test's lifetime (cuBLAS and cuDNN), restored after. With the precision API the
// trainer uses (train.allow_tf32): torch 2.9+ raises when it is mixed with setAllowTF32CuBLAS.
struct NoTf32 {
  using B = at::Float32Backend;
  using Op = at::Float32Op;
  at::Float32Precision matmul = at::globalContext().float32Precision(B::CUDA, Op::MATMUL),
                       conv = at::globalContext().float32Precision(B::CUDA, Op::CONV);
  NoTf32() { set(at::Float32Precision::IEEE, at::Float32Precision::IEEE); }
  ~NoTf32() { set(matmul, conv); }
  static void set(at::Float32Precision m, at::Float32Precision c) {
    at::globalContext().setFloat32Precision(B::CUDA, Op::MATMUL, m);
    at::globalContext().setFloat32Precision(B::CUDA, Op::CONV, c);
  }
};

// Every host-device synchronisation in scope throws (torch.cuda.set_sync_debug_mode("error")).
struct NoHostSync {
  NoHostSync() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR); }
  ~NoHostSync() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
};

ModelConfig small_model(int channels = 1, int resolution = 16) {
  ModelConfig m;
  m.in_channels = m.out_channels = channels;
  m.sample_size = resolution;
  m.block_out_channels = {32, 64};
  m.down_block_types = {BlockType::DownBlock2D, BlockType::AttnDownBlock2D};
  m.up_block_types = {BlockType::AttnUpBlock2D, BlockType::UpBlock2D};
  m.norm_num_groups = 8;
  return m;
}

double max_rel(const at::Tensor& got, const at::Tensor& want) {
  return (got.cpu().to(at::kDouble) - want.cpu().to(at::kDouble)).abs().max().item<double>() /
         std::max(1e-30, want.cpu().to(at::kDouble).abs().max().item<double>());
}

std::shared_ptr<Dataset> stand_in_data(int64_t n = 64, int64_t resolution = 16) { return test::stand_in_data(n, resolution); }

class GpuRun : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("difftrain_gpu_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A small training job on the stand-in data, preloaded onto the device.
  Config config(const std::string& device, MixedPrecision mp = MixedPrecision::bf16) const {
    Config c;
    c.run.device = device;
    c.run.output_dir = dir_.string();
    c.model = small_model();
    c.data.channels = 1, c.data.resolution = 16, c.data.preload = true, c.data.num_workers = 0;
    c.train.batch_size = 16, c.train.max_steps = 8, c.train.lr_warmup_steps = 2, c.train.mixed_precision = mp;
    c.logging.log_every = 2, c.logging.sample_every = 0;
    c.checkpoint.every = 1000;
    c.sampling.num_samples = 4, c.sampling.num_inference_steps = 2, c.sampling.num_final_samples = 0;
    return c;
  }
  TrainerOptions options(const c10::Device& device, const std::string& name) const {
    TrainerOptions o;
    o.run_dir = dir_ / name;
    fs::create_directories(o.run_dir);
    o.device = device;
    return o;
  }

  fs::path dir_;
};

// ---------------------------------------------------------------------------------------------

TEST(Gpu, CudaCudnnAndNcclLoad) {
  DIFFTRAIN_REQUIRE_CUDA();
  const EnvReport e = collect_env();
  ASSERT_FALSE(e.cuda.gpus.empty());
  const auto& g = e.cuda.gpus.front();
  ::testing::Test::RecordProperty("gpu", g.name);
  ::testing::Test::RecordProperty("compute_capability", std::to_string(g.major) + "." + std::to_string(g.minor));
  std::cout << "GPU 0: " << g.name << ", compute capability " << g.major << "." << g.minor << ", " << g.multiprocessor_count
            << " SMs\n";
  EXPECT_GE(g.major, 7) << "LibTorch 2.11's CUDA 13 build needs compute capability 7.5 or newer";
  // A convolution pulls cuDNN in; NCCL comes with libtorch_cuda.
  (void)at::conv2d(torch::randn({1, 1, 8, 8}, kCuda), torch::randn({1, 1, 3, 3}, kCuda));
  EXPECT_FALSE(collect_env().cudnn_version.empty()) << "cuDNN did not load";
  EXPECT_FALSE(e.nccl_version.empty()) << "NCCL did not load";
#ifdef DIFFTRAIN_WITH_NCCL
  EXPECT_EQ(e.nccl_version.substr(0, e.nccl_version.rfind('.')),
            e.nccl_compiled_version.substr(0, e.nccl_compiled_version.rfind('.')));
#endif
}

// The same weights and inputs on both devices, TF32 off: float32 on both sides, differing in
// summation order only (cuDNN's algorithms against oneDNN's), within 1e-5 of the largest value.
TEST(Gpu, UNetForwardAndBackwardMatchTheCpuInFloat32) {
  DIFFTRAIN_REQUIRE_CUDA();
  NoTf32 no_tf32;
  torch::manual_seed(0);
  UNet2DModel cpu(small_model()), gpu(small_model());
  {
    torch::NoGradGuard no_grad;
    auto src = cpu->parameters(), dst = gpu->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  }
  gpu->to(kCuda);
  const auto x = torch::randn({4, 1, 16, 16}), t = torch::tensor({0L, 10L, 500L, 999L});
  const auto out_cpu = cpu->forward(x, t), out_gpu = gpu->forward(x.to(kCuda), t.to(kCuda));
  EXPECT_LT(max_rel(out_gpu, out_cpu), 1e-5);
  out_cpu.pow(2).mean().backward();
  out_gpu.pow(2).mean().backward();
  auto pc = cpu->named_parameters(), pg = gpu->named_parameters();
  for (size_t i = 0; i < pc.size(); ++i) EXPECT_LT(max_rel(pg[i].value().grad(), pc[i].value().grad()), 1e-5) << pc[i].key();
}

// bf16 autocast keeps 8 bits of mantissa (relative 2^-8 = 4e-3 per rounding): within 1e-2.
TEST(Gpu, UNetBf16AutocastIsCloseToFloat32) {
  DIFFTRAIN_REQUIRE_CUDA();
  NoTf32 no_tf32;
  torch::manual_seed(0);
  UNet2DModel model(small_model());
  model->to(kCuda);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({4, 1, 16, 16}, kCuda), t = torch::tensor({0L, 10L, 500L, 999L}, kCuda);
  const auto f32 = model->forward(x, t);
  at::Tensor bf16;
  {
    AutocastScope scope(c10::kCUDA, at::kBFloat16);
    bf16 = model->forward(x, t);
  }
  EXPECT_LT(max_rel(bf16.to(at::kFloat), f32), 1e-2);
}

TEST(Gpu, AutocastScopeCastsAndRestores) {
  DIFFTRAIN_REQUIRE_CUDA();
  const bool before = at::autocast::is_autocast_enabled(c10::kCUDA);
  const auto before_dtype = at::autocast::get_autocast_dtype(c10::kCUDA);
  const auto x = torch::randn({2, 8, 8, 8}, kCuda), w = torch::randn({8, 8, 3, 3}, kCuda);
  {
    AutocastScope scope(c10::kCUDA, at::kBFloat16);
    EXPECT_TRUE(at::autocast::is_autocast_enabled(c10::kCUDA));
    EXPECT_EQ(at::conv2d(x, w).scalar_type(), at::kBFloat16) << "conv runs in bf16";
    EXPECT_EQ(at::group_norm(x.to(at::kBFloat16), 4).scalar_type(), at::kFloat) << "GroupNorm runs in float32";
  }
  EXPECT_EQ(at::autocast::is_autocast_enabled(c10::kCUDA), before);
  EXPECT_EQ(at::autocast::get_autocast_dtype(c10::kCUDA), before_dtype);
  EXPECT_EQ(at::conv2d(x, w).scalar_type(), at::kFloat);
}

// After a first step (lazy initialisation may sync), three training steps with every host sync an
// error: the step can be captured in a CUDA graph.
TEST_F(GpuRun, TrainingStepsDoNotSyncWithTheHost) {
  DIFFTRAIN_REQUIRE_CUDA();
  for (MixedPrecision mp : {MixedPrecision::bf16, MixedPrecision::fp16})
    for (bool capturable : {false, true}) {  // the capturable state (train.cuda_graph's) too: a sync would fail the capture
      SCOPED_TRACE(to_string(mp) + (capturable ? " capturable" : ""));
      TrainerOptions o = options(kCuda, "nosync_" + to_string(mp) + (capturable ? "_capturable" : ""));
      o.capturable_state = capturable;
      Trainer trainer(config("cuda", mp), stand_in_data(), o);
      trainer.train_step();
      c10::cuda::device_synchronize();
      {
        NoHostSync guard;
        EXPECT_NO_THROW(for (int i = 0; i < 3; ++i) trainer.train_step());
      }
      c10::cuda::device_synchronize();
      EXPECT_EQ(trainer.step(), 4);
    }
}

// Forward, backward, clip, AdamW and EMA from the same weights, inputs and noise on both devices.
TEST(Gpu, OneFullStepMatchesTheCpu) {
  DIFFTRAIN_REQUIRE_CUDA();
  NoTf32 no_tf32;
  torch::manual_seed(1);
  const NoiseSchedule schedule{SchedulerConfig{}};
  const auto x0 = torch::rand({8, 1, 16, 16}) * 2 - 1, noise = torch::randn({8, 1, 16, 16});
  const auto t = torch::randint(1000, {8}, torch::kLong);
  const double lr = 1e-3, eps = 1e-8;
  auto step = [&](const c10::Device& d) {
    torch::manual_seed(2);
    UNet2DModel model(small_model());
    model->to(d);
    std::vector<std::pair<std::string, at::Tensor>> named;
    std::vector<at::Tensor> params, shadow;
    for (auto& p : model->named_parameters()) named.emplace_back(p.key(), p.value()), params.push_back(p.value());
    for (auto& p : params) shadow.push_back(p.detach().clone());
    AdamWOptions o;
    o.impl = OptimizerImpl::fused, o.eps = eps;
    AdamW opt(named, o);
    EmaConfig ec;
    ec.use_ema_warmup = false, ec.decay = 0.9, ec.min_decay = 0.9;
    EMAModel ema(shadow, ec);
    const auto xs = x0.to(d), ns = noise.to(d), ts = t.to(d);
    const auto out = model->forward(schedule.add_noise(xs, ns, ts), ts);
    diffusion_loss(out, ns, schedule.loss_weights(ts, std::nullopt)).mean().backward();
    std::vector<at::Tensor> grads;
    for (auto& p : params) grads.push_back(p.grad());
    clip_grad_norm_(grads, 1.0);
    std::vector<at::Tensor> clipped;
    for (auto& g : grads) clipped.push_back(g.detach().cpu().clone());
    opt.step(lr);
    ema.step(params);
    std::vector<at::Tensor> p_out, s_out;
    for (auto& p : params) p_out.push_back(p.detach().cpu());
    for (auto& s : shadow) s_out.push_back(s.detach().cpu());
    return std::tuple{clipped, p_out, s_out};
  };
  const auto [g_cpu, p_cpu, s_cpu] = step(c10::kCPU);
  const auto [g_gpu, p_gpu, s_gpu] = step(kCuda);
  for (size_t i = 0; i < g_cpu.size(); ++i) {
    EXPECT_LT(max_rel(g_gpu[i], g_cpu[i]), 1e-5) << "gradient " << i;
    // AdamW's first step moves each weight by lr·g/(|g| + eps) (plus decay): a gradient difference
    // Δg moves it by at most lr·|Δg|/(|g| + eps), which bounds the weights; EMA takes (1 - decay) of that.
    const auto dg = (g_gpu[i] - g_cpu[i]).abs().to(at::kDouble);
    const auto bound = lr * dg / (g_cpu[i].abs().to(at::kDouble) + eps) + 4 * test::kFloatEps * p_cpu[i].abs().to(at::kDouble);
    EXPECT_TRUE(test::within_ulps(p_gpu[i], p_cpu[i], bound / test::kFloatEps, 1)) << "parameter " << i;
    EXPECT_TRUE(test::within_ulps(s_gpu[i], s_cpu[i],
                                  (0.1 * bound + 4 * test::kFloatEps * s_cpu[i].abs().to(at::kDouble)) / test::kFloatEps, 1))
        << "EMA " << i;
  }
}

TEST(Gpu, FusedAdamWAndLossScalerSkipInfAndNan) {
  DIFFTRAIN_REQUIRE_CUDA();
  for (float bad : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    SCOPED_TRACE(bad);
    auto w = torch::randn({4, 4}, kCuda).requires_grad_();
    AdamWOptions o;
    o.impl = OptimizerImpl::fused, o.weight_decay = 0.1;
    AdamW opt({{"w", w}}, o);
    GradScaler scaler(GradScalerOptions{1024.0, 2.0, 0.5, 2}, kCuda);
    w.mutable_grad() = torch::randn({4, 4}, kCuda);
    w.mutable_grad()[1][2] = bad;
    auto found_inf = scaler.unscale_({w.grad()});
    EXPECT_EQ(found_inf.item<float>(), 1.0f);
    const auto before = w.detach().clone();
    opt.step(1e-2, found_inf);
    EXPECT_TRUE(torch::equal(w, before)) << "a step with a non-finite gradient changes nothing";
    scaler.update(found_inf);
    EXPECT_EQ(scaler.scale_tensor().item<float>(), 512.0f) << "the scale backs off";
    w.mutable_grad() = torch::randn({4, 4}, kCuda);
    found_inf = scaler.unscale_({w.grad()});
    EXPECT_EQ(found_inf.item<float>(), 0.0f);
    opt.step(1e-2, found_inf);
    EXPECT_FALSE(torch::equal(w, before));
  }
}

// The three ways batches reach the GPU give the same batches: decoded on the CPU, streamed to the
// GPU through pinned memory, and preloaded on the GPU.
TEST(Gpu, LoaderBatchesAreTheSameOnEveryPath) {
  DIFFTRAIN_REQUIRE_CUDA();
  const auto data = stand_in_data();
  LoaderOptions o;
  o.batch_size = 8, o.seed = 3, o.num_workers = 1;
  Loader cpu(data, o);
  o.device = kCuda;
  Loader streamed(data, o);
  o.preload = true;
  Loader preloaded(data, o);
  for (int i = 0; i < 10; ++i) {  // past an epoch of 8 batches
    const auto a = cpu.next(), b = streamed.next(), c = preloaded.next();
    EXPECT_TRUE(b.images.is_cuda() && c.images.is_cuda());
    EXPECT_TRUE(torch::equal(a.images, b.images.cpu())) << "batch " << i;
    EXPECT_TRUE(torch::equal(a.images, c.images.cpu())) << "batch " << i;
    EXPECT_TRUE(torch::equal(a.labels, c.labels.cpu())) << "batch " << i;
  }
}

// A checkpoint written on the GPU loads back equal, and a resume on the CPU (a device change the
// resume check allows) starts instead of failing on the generator states.
TEST_F(GpuRun, CheckpointRoundTripAndResumeOnTheCpu) {
  DIFFTRAIN_REQUIRE_CUDA();
  fs::path saved;
  std::vector<at::Tensor> weights;
  {
    Trainer trainer(config("cuda"), stand_in_data(), options(kCuda, "run"));
    for (int i = 0; i < 2; ++i) trainer.train_step();
    saved = trainer.save_checkpoint_now();
    for (auto& p : trainer.model()->parameters()) weights.push_back(p.detach().cpu().clone());
  }
  EXPECT_EQ(verify_checkpoint(saved), "");
  Config cpu = config("cpu", MixedPrecision::no);
  cpu.checkpoint.resume = saved.string();
  std::unique_ptr<Trainer> resumed;
  ASSERT_NO_THROW(resumed = std::make_unique<Trainer>(cpu, stand_in_data(), options(c10::kCPU, "run")));
  EXPECT_EQ(resumed->step(), 2);
  auto params = resumed->model()->parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i], weights[i])) << i;
  EXPECT_NO_THROW(resumed->train_step());
}

// A world of one over NCCL runs the whole loop, log intervals included (their statistics are
// all-reduced on the GPU); the step time with and without the process group is recorded.
TEST_F(GpuRun, NcclWorldOfOneThroughTheLogInterval) {
  DIFFTRAIN_REQUIRE_CUDA();
#ifndef DIFFTRAIN_WITH_NCCL
  GTEST_SKIP() << "built without the NCCL backend";
#else
  World world;
  world.master_port = test::rendezvous_port(0);
  ProcessGroup group(world, DistBackend::nccl, kCuda, std::chrono::seconds(60));
  EXPECT_EQ(group.backend_name(), "nccl");
  auto timed = [&](ProcessGroup* pg, const std::string& name) {
    TrainerOptions o = options(kCuda, name);
    o.process_group = pg;
    Trainer trainer(config("cuda"), stand_in_data(), o);
    trainer.train_step();
    c10::cuda::device_synchronize();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 5; ++i) trainer.train_step();
    c10::cuda::device_synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / 5;
  };
  const double with_group = timed(&group, "nccl"), without = timed(nullptr, "alone");
  ::testing::Test::RecordProperty("ms_per_step_nccl_world_1", std::to_string(with_group));
  ::testing::Test::RecordProperty("ms_per_step_no_group", std::to_string(without));
  std::cout << "ms per step: " << with_group << " with a world-1 NCCL group, " << without << " without\n";
  TrainerOptions o = options(kCuda, "loop");
  o.process_group = &group;
  Trainer trainer(config("cuda"), stand_in_data(), o);
  EXPECT_EQ(trainer.train(), 0);
  EXPECT_EQ(trainer.step(), 8);
  EXPECT_TRUE(fs::exists(dir_ / "loop" / "metrics.jsonl"));
#endif
}

// ---------------------------------------------------------------------------------------------
// train.cuda_graph (issue 15): replayed steps against eager steps, a resume, accumulation with
// channels-last, and the timing scalars.

std::vector<at::Tensor> trained_weights(Trainer& t) {
  std::vector<at::Tensor> out;
  for (auto& p : t.model()->parameters()) out.push_back(p.detach().cpu().clone());
  for (auto& p : t.sampling_model()->parameters()) out.push_back(p.detach().cpu().clone());
  return out;
}

// The same kernels on the same inputs: replays equal eager steps. Kernels that sum with atomics
// (cuDNN's weight gradients may) can reorder float32 sums between any two runs, graph or not, and
// Adam turns a rounding-size gradient into a step-size update, so the bound is what two eager runs
// differ by, measured here, times 2, plus 8 ulps of the weights; bit-equality is recorded.
void expect_replays_match(const std::vector<at::Tensor>& eager, const std::vector<at::Tensor>& eager2,
                          const std::vector<at::Tensor>& graphed, const std::string& what) {
  double noise = 0, diff = 0, scale = 0;
  bool equal = true;
  for (size_t i = 0; i < eager.size(); ++i) {
    noise = std::max(noise, (eager[i] - eager2[i]).abs().max().item<double>());
    diff = std::max(diff, (eager[i] - graphed[i]).abs().max().item<double>());
    scale = std::max(scale, eager[i].abs().max().item<double>());
    equal = equal && torch::equal(eager[i], graphed[i]);
  }
  ::testing::Test::RecordProperty("cuda_graph_bit_equal_" + what, equal ? "yes" : "no");
  std::cout << what << ": graph vs eager max |diff| " << diff << " (eager vs eager " << noise << "), bit-equal "
            << (equal ? "yes" : "no") << "\n";
  EXPECT_LE(diff, 2 * noise + 8 * test::kFloatEps * scale) << what;
}

TEST_F(GpuRun, CudaGraphReplaysComputeWhatEagerStepsCompute) {
  DIFFTRAIN_REQUIRE_CUDA();
  NoTf32 no_tf32;
  for (MixedPrecision mp : {MixedPrecision::no, MixedPrecision::bf16, MixedPrecision::fp16}) {
    SCOPED_TRACE(to_string(mp));
    auto run = [&](bool graph, const std::string& name) {
      Config c = config("cuda", mp);
      c.train.cuda_graph = graph;
      TrainerOptions o = options(kCuda, name + to_string(mp));
      o.capturable_state = true;  // eager steps with the graph's state (a float32 rate on CUDA): the graph is the only difference
      Trainer trainer(c, stand_in_data(), o);
      for (int i = 0; i < 8; ++i) trainer.train_step();  // 3 eager warm-up steps, then 5 replays
      c10::cuda::device_synchronize();
      return trained_weights(trainer);
    };
    expect_replays_match(run(false, "eager"), run(false, "eager2"), run(true, "graph"), to_string(mp));
  }
}

// Straight 8 steps against 4, a checkpoint and a resume to 8, both with the switch on (the resumed
// run warms up eagerly again): the same bits, as eager resumes are on this device.
TEST_F(GpuRun, CudaGraphRunsResumeExactly) {
  DIFFTRAIN_REQUIRE_CUDA();
  Config c = config("cuda");
  c.train.cuda_graph = true;
  std::vector<at::Tensor> straight;
  {
    Trainer t(c, stand_in_data(), options(kCuda, "straight"));
    for (int i = 0; i < 8; ++i) t.train_step();
    straight = trained_weights(t);
  }
  fs::path saved;
  {
    Trainer t(c, stand_in_data(), options(kCuda, "halves"));
    for (int i = 0; i < 4; ++i) t.train_step();
    saved = t.save_checkpoint_now();
  }
  c.checkpoint.resume = saved.string();
  Trainer t(c, stand_in_data(), options(kCuda, "halves"));
  for (int i = 0; i < 4; ++i) t.train_step();
  const auto resumed = trained_weights(t);
  for (size_t i = 0; i < resumed.size(); ++i) EXPECT_TRUE(torch::equal(resumed[i], straight[i])) << "tensor " << i;
}

// Gradient accumulation replays the micro-step graph k times per optimizer step; with
// channels-last and class conditioning (a second random draw in the graph). Then the whole loop,
// whose log holds host and device time per step.
TEST_F(GpuRun, CudaGraphWithAccumulationChannelsLastAndTheLoop) {
  DIFFTRAIN_REQUIRE_CUDA();
  NoTf32 no_tf32;
  auto run = [&](bool graph, const std::string& name) {
    Config c = config("cuda", MixedPrecision::no);
    c.train.gradient_accumulation_steps = 2, c.train.channels_last = true, c.train.cuda_graph = graph;
    c.model.num_class_embeds = 10;
    TrainerOptions o = options(kCuda, name);
    o.capturable_state = true;
    Trainer trainer(c, stand_in_data(), o);
    for (int i = 0; i < 6; ++i) trainer.train_step();
    c10::cuda::device_synchronize();
    return trained_weights(trainer);
  };
  expect_replays_match(run(false, "eager"), run(false, "eager2"), run(true, "graph"), "accumulation_channels_last");
  Config c = config("cuda");
  c.train.cuda_graph = true;
  Trainer trainer(c, stand_in_data(), options(kCuda, "loop"));
  EXPECT_EQ(trainer.train(), 0);
  std::ifstream log(dir_ / "loop" / "metrics.jsonl");
  std::string line, last;
  while (std::getline(log, line)) last = line;
  const auto j = nlohmann::json::parse(last);
  EXPECT_GT(j.value("train/host_ms_per_step", 0.0), 0.0) << last;
  EXPECT_GT(j.value("train/device_ms_per_step", 0.0), 0.0) << last;
}

// train.channels_last on CUDA: every stage of the UNet keeps NHWC, in float32 and under bf16
// autocast (cuDNN convolutions, the CUDA GroupNorm and attention), forward and through backward.
TEST(Gpu, ChannelsLastSurvivesEveryStageOfTheUNet) {
  DIFFTRAIN_REQUIRE_CUDA();
  for (const bool bf16 : {false, true}) {
    SCOPED_TRACE(bf16 ? "bf16 autocast" : "float32");
    torch::manual_seed(0);
    UNet2DModel model(small_model());
    model->to(kCuda);
    model->set_memory_format(at::MemoryFormat::ChannelsLast);
    const auto x = torch::randn({4, 1, 16, 16}, kCuda).contiguous(at::MemoryFormat::ChannelsLast);
    const auto t = torch::randint(1000, {4}, torch::TensorOptions().dtype(torch::kLong).device(kCuda));
    AutocastScope autocast(c10::kCUDA, bf16 ? std::optional<c10::ScalarType>(at::kBFloat16) : std::nullopt);
    for (const auto& [stage, nhwc] : test::channels_last_trace(model, x, t)) {
      ::testing::Test::RecordProperty(std::string("channels_last_") + (bf16 ? "bf16_" : "fp32_") + stage, nhwc ? "NHWC" : "NCHW");
      EXPECT_TRUE(nhwc) << stage << " returned NCHW";
    }
    model->forward(x, t).sum().backward();
    for (auto& p : model->parameters()) {
      if (p.dim() == 4) {
        EXPECT_TRUE(p.grad().is_contiguous(at::MemoryFormat::ChannelsLast));
      }
    }
  }
}

TEST(Gpu, SamplingRepeatsExactlyForASeed) {
  DIFFTRAIN_REQUIRE_CUDA();
  torch::manual_seed(0);
  UNet2DModel model(small_model());
  model->to(kCuda);
  SamplingOptions o;
  o.num_samples = 4, o.batch_size = 4, o.num_inference_steps = 5, o.seed = 7;
  const auto a = generate(model, SchedulerConfig{}, o, kCuda), b = generate(model, SchedulerConfig{}, o, kCuda);
  EXPECT_TRUE(a.is_cuda());
  EXPECT_TRUE(torch::equal(a, b));
  o.seed = 8;
  EXPECT_FALSE(torch::equal(a, generate(model, SchedulerConfig{}, o, kCuda)));
}

}  // namespace
}  // namespace difftrain

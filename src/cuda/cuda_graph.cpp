#include "cuda/cuda_graph.h"

#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace difftrain::cuda {

struct StreamScope::Impl {
  c10::cuda::CUDAStream previous, stream;
  c10::cuda::CUDAStreamGuard guard;
  explicit Impl(int device_index)
      : previous(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index))),
        stream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device_index))),
        guard(stream) {
    at::cuda::CUDAEvent ready;
    ready.record(previous);
    ready.block(stream);  // the side stream starts after the model, data and state were set up
  }
  ~Impl() {
    at::cuda::CUDAEvent done;
    done.record(stream);
    done.block(previous);  // and whatever runs after the loop starts after it
  }
};

StreamScope::StreamScope(int device_index) : impl_(std::make_unique<Impl>(device_index)) {}
StreamScope::~StreamScope() = default;

struct Graph::Impl {
  at::cuda::CUDAGraph graph;
  std::vector<at::Generator> generators;
  at::cuda::MempoolId_t pool;
};

Graph::Graph(std::vector<at::Generator> generators, const Graph* share_pool_with) : impl_(std::make_unique<Impl>()) {
  impl_->generators = std::move(generators);
  impl_->pool = share_pool_with ? share_pool_with->impl_->pool : at::cuda::graph_pool_handle();
}

Graph::~Graph() = default;

void Graph::capture(const std::function<void()>& body) {
  for (const auto& g : impl_->generators) impl_->graph.register_generator_state(g);
  const bool cache = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(false);
  // Thread-local: the loader's worker threads may allocate pinned memory meanwhile, which global
  // mode would turn into a failed capture; this thread (and autograd's, launching into the
  // capturing stream) is still checked.
  impl_->graph.capture_begin(impl_->pool, cudaStreamCaptureModeThreadLocal);
  try {
    body();
  } catch (...) {
    try {
      impl_->graph.capture_end();  // leaves capture mode; the (invalidated) capture itself may fail
    } catch (...) {
    }
    at::autocast::set_autocast_cache_enabled(cache);
    throw;
  }
  impl_->graph.capture_end();
  at::autocast::set_autocast_cache_enabled(cache);
}

void Graph::replay() { impl_->graph.replay(); }

struct StepTimer::Impl {
  std::vector<std::pair<at::cuda::CUDAEvent, at::cuda::CUDAEvent>> events;  // reused between intervals
  size_t used = 0;
};

StepTimer::StepTimer() : impl_(std::make_unique<Impl>()) {}
StepTimer::~StepTimer() = default;

void StepTimer::begin() {
  if (impl_->used == impl_->events.size())
    impl_->events.emplace_back(at::cuda::CUDAEvent(cudaEventDefault), at::cuda::CUDAEvent(cudaEventDefault));
  impl_->events[impl_->used].first.record();
}

void StepTimer::end() { impl_->events[impl_->used++].second.record(); }

double StepTimer::take_device_ms() {
  double ms = 0;
  if (impl_->used > 0) impl_->events[impl_->used - 1].second.synchronize();
  for (size_t i = 0; i < impl_->used; ++i) ms += static_cast<double>(impl_->events[i].first.elapsed_time(impl_->events[i].second));
  impl_->used = 0;
  return ms;
}

}  // namespace difftrain::cuda

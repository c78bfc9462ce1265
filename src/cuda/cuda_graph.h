// CUDA graphs for the training step (train.cuda_graph): a side stream for the whole loop, graphs
// that record a body once and replay it, and CUDA events that time steps on the device. Built
// only against a CUDA LibTorch; the trainer decides what goes into a graph.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include <ATen/core/Generator.h>

namespace difftrain::cuda {

// Makes a pool stream of `device_index` current for this thread while it lives: graphs cannot be
// captured on the legacy default stream, and warm-up, capture and replay must share one stream.
// It starts after the work queued so far on the default stream, which waits for it at the end.
class StreamScope {
 public:
  explicit StreamScope(int device_index);
  ~StreamScope();
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One captured body. `generators` (beyond the device's default one, which CUDA graphs register
// themselves) advance their Philox offsets on every replay as the body's eager run would, so a
// replay draws the noise an eager step would draw (CUDAGraph::register_generator_state). Graphs
// made with `share_pool_with` allocate from its memory pool: replay them in capture order.
class Graph {
 public:
  explicit Graph(std::vector<at::Generator> generators, const Graph* share_pool_with = nullptr);
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  // Records `body` on the current (non-default) stream without running it, with autocast's weight
  // cache off (a cached cast would be baked into the graph). A body that throws ends the capture.
  void capture(const std::function<void()>& body);
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Host time spent issuing steps against device time from CUDA events around them: events are
// recorded on the current stream and read only by take(), after the caller has synced (a log
// interval), so timing adds no sync.
class StepTimer {
 public:
  StepTimer();
  ~StepTimer();
  void begin();  // before a step's first kernel
  void end();    // after its last
  // The summed device milliseconds of the steps timed since the last take(); waits for the last event.
  double take_device_ms();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace difftrain::cuda

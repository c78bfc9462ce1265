// The run's metrics sinks, one call per log interval: TensorBoard events (tensorboard.h),
// metrics.jsonl (one JSON object per line) and metrics.prom (the Prometheus text exposition
// format, prometheus.io/docs/instrumenting/exposition_formats, for node_exporter's textfile
// collector). No LibTorch here; the trainer makes one on rank 0 and hands it plain numbers.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "difftrain/tensorboard.h"

namespace difftrain {

struct MetricsOptions {
  bool tensorboard = true;  // events.out.tfevents.* in the run directory
  bool jsonl = true;        // metrics.jsonl: {"step", "wall_time", <tag>: value, ...} per scalars() call
  bool prometheus = false;  // metrics.prom: the last value of every scalar, replaced atomically on each scalars() call
  std::string run_name;     // the `run` label in metrics.prom; empty: the run directory's name
  // Labels of the difftrain_build_info gauge (value 1), e.g. version, libtorch, cuda, device; none: no gauge.
  std::vector<std::pair<std::string, std::string>> build_info = {};
};

// The Prometheus metric for a scalar tag, named as Prometheus asks (prometheus.io/docs/practices/
// naming, and promtool check metrics): "difftrain_" + the tag with every character outside
// [a-zA-Z0-9_:] made '_', and each '_'-separated abbreviated unit spelled out in base units, the
// value scaled to match: ms -> seconds (x 1e-3), s -> seconds ("per_s" -> "per_second"),
// gb / mb -> bytes (x 2^30 / 2^20: difftrain's _gb scalars are GiB), img -> images, tflops ->
// flops_per_second (x 1e12). "train/img_per_s" -> difftrain_train_images_per_second.
struct PrometheusMetric {
  std::string name;
  double scale = 1.0;  // value in the metric = value of the scalar x scale
};
PrometheusMetric prometheus_metric(const std::string& tag);
std::string prometheus_name(const std::string& tag);  // prometheus_metric(tag).name

class MetricsLogger {
 public:
  // Opens the sinks in `run_dir`. With `resume_step` (a resume from a checkpoint at that step):
  // the event file starts with SessionLog START at resume_step, and metrics.jsonl is rewritten
  // (atomically) without the lines at step >= resume_step or that do not parse, so both hold one
  // history with the interrupted run's orphaned steps gone.
  MetricsLogger(const std::filesystem::path& run_dir, MetricsOptions options, std::optional<int64_t> resume_step = std::nullopt);
  ~MetricsLogger();
  MetricsLogger(const MetricsLogger&) = delete;
  MetricsLogger& operator=(const MetricsLogger&) = delete;

  // One point per tag at `step`, in the order given: a TensorBoard scalar each, one metrics.jsonl
  // line (non-finite values become null, JSON having no NaN), and a new metrics.prom. "step" and
  // "wall_time" are not allowed as tags.
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  // A counter in metrics.prom (`name` should end in _total), written with the next scalars():
  // its running total. A run resumed from a checkpoint continues from what the checkpoint holds.
  void set_counter(const std::string& name, const std::string& help, double total);
  // TensorBoard only. `pixels` is channels (1, 3, 4) x height x width uint8 in CHW order.
  void image(const std::string& tag, int64_t step, const uint8_t* pixels, int64_t channels, int64_t height, int64_t width);
  void histogram(const std::string& tag, int64_t step, std::span<const float> values);
  void text(const std::string& tag, int64_t step, const std::string& markdown);  // e.g. the resolved config at step 0
  // fdatasync of the event file and metrics.jsonl (each line and record is already written whole).
  void flush();

  const std::filesystem::path& run_dir() const { return run_dir_; }
  const tensorboard::EventWriter* events() const { return events_.get(); }  // null when tensorboard is off

 private:
  void write_prometheus(int64_t step, double wall_time);
  std::filesystem::path run_dir_;
  MetricsOptions options_;
  std::unique_ptr<tensorboard::EventWriter> events_;
  int jsonl_fd_ = -1;
  struct Gauge {
    std::string tag, name;  // name: prometheus_name(tag), with _2, _3... when another tag has it
    double value;           // the last logged, scaled to the metric's unit
  };
  std::vector<Gauge> gauges_;  // in the order first logged
  struct Counter {
    std::string name, help;
    double total;
  };
  std::vector<Counter> counters_;
};

}  // namespace difftrain

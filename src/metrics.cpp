#include "difftrain/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "difftrain/errors.h"
#include "difftrain/io.h"

namespace difftrain {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void io_error(const std::string& what, const fs::path& path) {
  throw RuntimeError("cannot " + what + " " + path.string() + ": " + std::strerror(errno));
}

// A sample value in the text format: Go's ParseFloat syntax, with NaN, +Inf and -Inf.
std::string prom_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
  return std::string(buf, r.ptr);
}

// Escapes for a label value (\\, \", \n) and for HELP text (\\, \n).
std::string prom_escape(const std::string& s, bool quote) {
  std::string out;
  for (char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '"' && quote) out += "\\\"";
    else out += c;
  }
  return out;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Drops the lines of metrics.jsonl at step >= resume_step, and any that do not parse (a line cut
// by a power loss), rewriting the file only when something goes.
void purge_jsonl(const fs::path& path, int64_t resume_step) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return;  // no file yet
  std::string line, kept;
  bool dropped = false;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded() && j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() < resume_step)
      kept += line + "\n";
    else
      dropped = true;
  }
  if (in.bad()) io_error("read", path);
  if (dropped) write_file_atomic(path, kept);
}

}  // namespace

PrometheusMetric prometheus_metric(const std::string& tag) {
  std::string sanitized;
  for (char c : tag) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == ':';
    sanitized += ok ? c : '_';
  }
  PrometheusMetric m{"difftrain", 1.0};
  std::string previous;
  size_t begin = 0;
  while (begin <= sanitized.size()) {  // each '_'-separated token, empty ones kept ("a__b")
    const size_t end = std::min(sanitized.find('_', begin), sanitized.size());
    std::string token = sanitized.substr(begin, end - begin);
    if (token == "ms") token = "seconds", m.scale *= 1e-3;
    else if (token == "s" || token == "sec") token = previous == "per" ? "second" : "seconds";
    else if (token == "gb") token = "bytes", m.scale *= 1073741824.0;
    else if (token == "mb") token = "bytes", m.scale *= 1048576.0;
    else if (token == "img") token = "images";
    else if (token == "tflops") token = "flops_per_second", m.scale *= 1e12;
    m.name += "_" + token;
    previous = token;
    begin = end + 1;
  }
  return m;
}

std::string prometheus_name(const std::string& tag) { return prometheus_metric(tag).name; }

MetricsLogger::MetricsLogger(const fs::path& run_dir, MetricsOptions options, std::optional<int64_t> resume_step)
    : run_dir_(run_dir), options_(std::move(options)) {
  std::error_code ec;
  fs::create_directories(run_dir_, ec);
  if (ec) throw RuntimeError("cannot create the run directory " + run_dir_.string() + ": " + ec.message());
  if (options_.run_name.empty()) {
    const fs::path p = fs::absolute(run_dir_).lexically_normal();
    options_.run_name = (p.has_filename() ? p : p.parent_path()).filename().string();
  }
  if (options_.tensorboard) events_ = std::make_unique<tensorboard::EventWriter>(run_dir_, resume_step);
  if (options_.jsonl) {
    const fs::path jsonl = run_dir_ / "metrics.jsonl";
    if (resume_step) purge_jsonl(jsonl, *resume_step);
    jsonl_fd_ = ::open(jsonl.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (jsonl_fd_ < 0) io_error("open", jsonl);
  }
}

MetricsLogger::~MetricsLogger() {
  if (jsonl_fd_ >= 0) ::close(jsonl_fd_);
}

void MetricsLogger::scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  const double wall_time = now_seconds();
  nlohmann::ordered_json line = {{"step", step}, {"wall_time", wall_time}};
  for (const auto& [tag, v] : values)  // before anything is written
    if (tag == "step" || tag == "wall_time" || tag.empty())
      throw RuntimeError("metrics: \"" + tag + "\" cannot be a scalar tag (step and wall_time are metrics.jsonl's own keys)");
  for (const auto& [tag, v] : values) {
    if (events_) events_->add_scalar(tag, v, step);
    line[tag] = v;  // nlohmann writes non-finite numbers as null
    if (!options_.prometheus) continue;
    const auto metric = prometheus_metric(tag);
    auto g = std::find_if(gauges_.begin(), gauges_.end(), [&](const Gauge& x) { return x.tag == tag; });
    if (g != gauges_.end()) {
      g->value = v * metric.scale;
      continue;
    }
    auto taken = [&](const std::string& n) {
      return n == "difftrain_step" || n == "difftrain_last_log_timestamp_seconds" || n == "difftrain_build_info" ||
             std::any_of(gauges_.begin(), gauges_.end(), [&](const Gauge& x) { return x.name == n; }) ||
             std::any_of(counters_.begin(), counters_.end(), [&](const Counter& x) { return x.name == n; });
    };
    std::string name = metric.name;
    for (int k = 2; taken(name); ++k) name = metric.name + "_" + std::to_string(k);
    gauges_.push_back({tag, name, v * metric.scale});
  }
  if (jsonl_fd_ >= 0) write_all(jsonl_fd_, line.dump() + "\n", run_dir_ / "metrics.jsonl");
  if (options_.prometheus) write_prometheus(step, wall_time);
}

void MetricsLogger::set_counter(const std::string& name, const std::string& help, double total) {
  auto c = std::find_if(counters_.begin(), counters_.end(), [&](const Counter& x) { return x.name == name; });
  if (c != counters_.end()) c->total = total;
  else counters_.push_back({name, help, total});
}

void MetricsLogger::write_prometheus(int64_t step, double wall_time) {
  const std::string run = "run=\"" + prom_escape(options_.run_name, /*quote=*/true) + "\"";
  std::ostringstream out;
  auto metric = [&](const std::string& name, const char* type, const std::string& help, const std::string& labels,
                    const std::string& value) {
    out << "# HELP " << name << " " << prom_escape(help, /*quote=*/false) << "\n# TYPE " << name << " " << type << "\n"
        << name << "{" << labels << "} " << value << "\n";
  };
  if (!options_.build_info.empty()) {
    std::string labels = run;
    for (const auto& [k, v] : options_.build_info) labels += "," + k + "=\"" + prom_escape(v, /*quote=*/true) + "\"";
    metric("difftrain_build_info", "gauge", "difftrain's version, LibTorch, CUDA and the device of the run; always 1.", labels,
           "1");
  }
  metric("difftrain_step", "gauge", "Training step of the last log.", run, std::to_string(step));
  metric("difftrain_last_log_timestamp_seconds", "gauge", "Unix time of the last log.", run, prom_value(wall_time));
  for (const auto& c : counters_) metric(c.name, "counter", c.help, run, prom_value(c.total));
  for (const auto& g : gauges_) metric(g.name, "gauge", "Last value of the scalar \"" + g.tag + "\".", run, prom_value(g.value));
  write_file_atomic(run_dir_ / "metrics.prom", out.str());
}

void MetricsLogger::image(const std::string& tag, int64_t step, const uint8_t* pixels, int64_t channels, int64_t height, int64_t width) {
  if (events_) events_->add_image(tag, pixels, channels, height, width, step);
}

void MetricsLogger::histogram(const std::string& tag, int64_t step, std::span<const float> values) {
  if (events_) events_->add_histogram(tag, values, step);
}

void MetricsLogger::text(const std::string& tag, int64_t step, const std::string& markdown) {
  if (events_) events_->add_text(tag, markdown, step);
}

void MetricsLogger::flush() {
  if (events_) events_->flush();
  if (jsonl_fd_ >= 0 && ::fdatasync(jsonl_fd_) != 0) io_error("sync", run_dir_ / "metrics.jsonl");
}

}  // namespace difftrain

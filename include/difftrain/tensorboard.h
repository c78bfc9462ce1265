// TensorBoard event files with no TensorFlow and no protobuf library: TFRecord framing
// (tensorflow/core/lib/io/record_writer.cc), CRC-32C, and a hand-written protobuf (proto3 wire
// format) encoding of the few messages TensorBoard reads. Field numbers are those of
// tensorflow/core/util/event.proto and framework/{summary,histogram,tensor,tensor_shape}.proto, as
// checked against tensorboard 2.21's compat/proto descriptors (note Event.session_log is 7; 6 is
// log_message). What goes in each Summary mirrors torch.utils.tensorboard's SummaryWriter, so a
// file from here and one from SummaryWriter decode to the same Events but for wall_time, the
// writer's name and the PNG bytes (tests/tensorboard/check_events.py compares them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "difftrain/errors.h"

namespace difftrain::tensorboard {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78; RFC 3720 B.4), slice-by-8. `crc` is the
// CRC of the bytes before `data`, to extend it (0 to start).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);
// TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t size);

// One TFRecord: uint64 little-endian length, masked CRC of those 8 bytes, data, masked CRC of data.
std::string frame_record(const std::string& data);

// The record payloads (serialized Events) of a TFRecord file, both CRCs checked. A final record
// cut short (a crash mid-write) ends the list with truncated_tail set; a CRC mismatch anywhere is
// a RuntimeError naming the file, the record and its offset.
struct EventFileRecords {
  std::vector<std::string> records;
  bool truncated_tail = false;
};
EventFileRecords read_event_file(const std::filesystem::path& path);

// A histogram as torch.utils.tensorboard's make_histogram(values, bins='tensorflow') builds it:
// np.histogram over default_bucket_edges() (left-closed bins, the last one closed), trimmed to the
// bins with counts plus one empty bin on the left; bucket_limit[i] is the right edge of bucket[i].
// Two deviations, both so that the bucket counts always sum to `num`: values beyond the outermost
// edges (|v| >~ 1e20) go to the outermost bins rather than being dropped, and non-finite values
// are left out of everything (num counts finite values only). No finite values: num == 0, no buckets.
struct Histogram {
  double min = 0, max = 0, num = 0, sum = 0, sum_squares = 0;
  std::vector<double> bucket_limit, bucket;
};
Histogram make_histogram(std::span<const double> values);
Histogram make_histogram(std::span<const float> values);
// SummaryWriter.default_bins: -v..., 0, ...v for v = 1e-12 * 1.1^k below 1e20 (1549 edges).
const std::vector<double>& default_bucket_edges();

// Appends Events to a new file <log_dir>/events.out.tfevents.<10-digit unix time>.<hostname>.<pid>.<n>
// (n counts the files this process opened, as tensorboard's EventFileWriter does). Each record is
// written whole with one write(2) as it is added, unbuffered: a crash of the process loses nothing
// and cannot tear a record, TensorBoard sees each point at once, and the cost (one syscall per
// record, records a few per log interval) is nothing next to a training step. flush() adds an
// fdatasync, for power loss. Not thread-safe.
class EventWriter {
 public:
  // Creates log_dir and the file, and writes Event{wall_time, file_version: "brain.Event:2",
  // source_metadata{writer: "difftrain"}}; then, given `purge_step` (a resume, as
  // SummaryWriter(purge_step=)), add_session_start(purge_step).
  explicit EventWriter(const std::filesystem::path& log_dir, std::optional<int64_t> purge_step = std::nullopt);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // Summary.Value{tag, simple_value} (a float32), as SummaryWriter.add_scalar.
  void add_scalar(const std::string& tag, double value, int64_t step);
  // Summary.Value{tag, image{height, width, colorspace = channels, PNG}}, as SummaryWriter.add_image,
  // except that gray stays one channel (colorspace 1) where SummaryWriter repeats it to RGB.
  // `pixels` is channels (1 gray, 3 RGB, 4 RGBA) x height x width uint8 in CHW order.
  void add_image(const std::string& tag, const uint8_t* pixels, int64_t channels, int64_t height, int64_t width, int64_t step);
  // Summary.Value{tag, histo: make_histogram(values)}, as SummaryWriter.add_histogram(bins='tensorflow').
  // Writes nothing when no value is finite.
  void add_histogram(const std::string& tag, std::span<const float> values, int64_t step);
  void add_histogram(const std::string& tag, std::span<const double> values, int64_t step);
  // The text plugin's format, as SummaryWriter.add_text: Summary.Value{tag + "/text_summary",
  // metadata{plugin_data{plugin_name: "text"}}, tensor{DT_STRING, shape [1], string_val: markdown}}.
  void add_text(const std::string& tag, const std::string& markdown, int64_t step);
  // Event{step, session_log{status: START}}: TensorBoard drops every point at step >= `step` read
  // before it, so the steps an interrupted run logged past its last checkpoint disappear on resume.
  void add_session_start(int64_t step);
  // fdatasync: what was added is on disk.
  void flush();

  const std::filesystem::path& path() const { return path_; }

 private:
  void write_event(const std::string& event);
  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace difftrain::tensorboard

#include "difftrain/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>

#include "difftrain/data_formats.h"
#include "difftrain/io.h"

namespace difftrain::tensorboard {

namespace fs = std::filesystem;

namespace {

// ---- CRC-32C, slice-by-8: table[s][b] is the CRC of byte b followed by s zero bytes.
using CrcTables = std::array<std::array<uint32_t, 256>, 8>;

constexpr CrcTables make_crc_tables() {
  CrcTables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    t[0][i] = c;
  }
  for (size_t s = 1; s < 8; ++s)
    for (size_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}
constexpr CrcTables kCrc = make_crc_tables();

uint32_t le32(const uint8_t* p) { return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24; }
uint64_t le64(const uint8_t* p) { return uint64_t{le32(p)} | uint64_t{le32(p + 4)} << 32; }
void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}
template <typename T, typename From>
T bit_cast(From f) {
  static_assert(sizeof(T) == sizeof(From));
  T t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}

// ---- Protobuf wire format (protobuf.dev/programming-guides/encoding): a tag is the varint
// (field << 3 | wire type); 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Fields of proto3
// scalars without presence are skipped at their default, as the reference encoders do (a
// double's default is +0.0 only: -0.0 is written); oneof members and messages are always written.
class Proto {
 public:
  Proto& varint(int field, uint64_t v) { return tag(field, 0).raw_varint(v); }
  Proto& int64(int field, int64_t v) { return v == 0 ? *this : varint(field, static_cast<uint64_t>(v)); }  // also int32, enum
  Proto& fixed64(int field, double v) {
    tag(field, 1);
    put_le(buf_, bit_cast<uint64_t>(v), 8);
    return *this;
  }
  Proto& fixed32(int field, float v) {
    tag(field, 5);
    put_le(buf_, bit_cast<uint32_t>(v), 4);
    return *this;
  }
  Proto& dbl(int field, double v) { return bit_cast<uint64_t>(v) == 0 ? *this : fixed64(field, v); }
  Proto& bytes(int field, const std::string& s) {
    tag(field, 2).raw_varint(s.size());
    buf_ += s;
    return *this;
  }
  Proto& str(int field, const std::string& s) { return s.empty() ? *this : bytes(field, s); }
  Proto& msg(int field, const Proto& m) { return bytes(field, m.buf_); }
  Proto& packed_doubles(int field, const std::vector<double>& v) {  // repeated double, [packed = true] in proto3
    if (v.empty()) return *this;
    tag(field, 2).raw_varint(8 * v.size());
    for (double d : v) put_le(buf_, bit_cast<uint64_t>(d), 8);
    return *this;
  }
  const std::string& bytes() const { return buf_; }

 private:
  Proto& tag(int field, int wire) { return raw_varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire)); }
  Proto& raw_varint(uint64_t v) {
    for (; v >= 0x80; v >>= 7) buf_.push_back(static_cast<char>(v | 0x80));
    buf_.push_back(static_cast<char>(v));
    return *this;
  }
  std::string buf_;
};

// Field numbers (event.proto, summary.proto, histogram.proto, tensor.proto, tensor_shape.proto).
namespace event { enum { kWallTime = 1, kStep = 2, kFileVersion = 3, kSummary = 5, kSessionLog = 7, kSourceMetadata = 10 }; }
namespace source_metadata { enum { kWriter = 1 }; }
namespace session_log { enum { kStatus = 1, kStart = 1 }; }
namespace summary { enum { kValue = 1 }; }
namespace value { enum { kTag = 1, kSimpleValue = 2, kImage = 4, kHisto = 5, kTensor = 8, kMetadata = 9 }; }
namespace image { enum { kHeight = 1, kWidth = 2, kColorspace = 3, kEncodedImageString = 4 }; }
namespace histo { enum { kMin = 1, kMax = 2, kNum = 3, kSum = 4, kSumSquares = 5, kBucketLimit = 6, kBucket = 7 }; }
namespace metadata { enum { kPluginData = 1, kPluginName = 1, kContent = 2 }; }
namespace tensor { enum { kDtype = 1, kTensorShape = 2, kStringVal = 8, kDim = 2, kDimSize = 1, kDtString = 7 }; }  // kDim*: TensorShapeProto

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

Proto event_header(int64_t step) { return std::move(Proto().dbl(event::kWallTime, now_seconds()).int64(event::kStep, step)); }

std::string summary_event(int64_t step, const Proto& value) {
  return event_header(step).msg(event::kSummary, Proto().msg(summary::kValue, value)).bytes();
}

std::string io_message(const std::string& what, const fs::path& path) { return what + " " + path.string() + ": " + std::strerror(errno); }

template <typename T>
Histogram histogram_of(std::span<const T> values) {
  const auto& edges = default_bucket_edges();
  const size_t bins = edges.size() - 1, zero = edges.size() / 2;  // edges[zero] == 0
  const double log_step = std::log(1.1);
  std::vector<double> counts(bins, 0.0);
  Histogram h;
  h.min = std::numeric_limits<double>::infinity();
  h.max = -h.min;
  for (T t : values) {
    const double v = static_cast<double>(t);
    if (!std::isfinite(v)) continue;
    h.min = std::min(h.min, v);
    h.max = std::max(h.max, v);
    h.num += 1;
    h.sum += v;
    h.sum_squares += v * v;
    // Guess the bin from the geometric spacing, then settle it on the exact edges: bin i holds
    // edges[i] <= v < edges[i + 1] (np.histogram), the last bin also its right edge, and the
    // outermost bins whatever lies beyond.
    const double a = std::fabs(v);
    const double k = a < 1e-12 ? -1.0 : std::min(std::floor(std::log(a / 1e-12) / log_step), double(zero));
    const auto off = static_cast<ptrdiff_t>(k) + 1;
    size_t i = static_cast<size_t>(std::clamp<ptrdiff_t>(v >= 0 ? ptrdiff_t(zero) + off : ptrdiff_t(zero) - off - 1, 0,
                                                         ptrdiff_t(bins) - 1));
    while (i + 1 < bins && edges[i + 1] <= v) ++i;
    while (i > 0 && edges[i] > v) --i;
    counts[i] += 1;
  }
  if (h.num == 0) return Histogram{};
  // make_histogram's trim: the bins from the first to the last with a count, plus the empty bin
  // left of them (bins [-1] when the first bin has a count: an empty one is made up); the limits
  // are the right edges.
  size_t first = 0, last = bins - 1;
  while (counts[first] == 0) ++first;
  while (counts[last] == 0) --last;
  h.bucket_limit.assign(edges.begin() + static_cast<ptrdiff_t>(first), edges.begin() + static_cast<ptrdiff_t>(last) + 2);
  if (first > 0) {
    h.bucket.assign(counts.begin() + static_cast<ptrdiff_t>(first) - 1, counts.begin() + static_cast<ptrdiff_t>(last) + 1);
  } else {
    h.bucket.assign(1, 0.0);
    h.bucket.insert(h.bucket.end(), counts.begin(), counts.begin() + static_cast<ptrdiff_t>(last) + 1);
  }
  return h;
}

std::atomic<int> g_file_counter{0};  // tensorboard's event_file_writer._global_uid

}  // namespace

uint32_t crc32c(const void* data, size_t size, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (; size >= 8; p += 8, size -= 8) {
    const uint32_t lo = le32(p) ^ crc, hi = le32(p + 4);
    crc = kCrc[7][lo & 0xFF] ^ kCrc[6][(lo >> 8) & 0xFF] ^ kCrc[5][(lo >> 16) & 0xFF] ^ kCrc[4][lo >> 24] ^
          kCrc[3][hi & 0xFF] ^ kCrc[2][(hi >> 8) & 0xFF] ^ kCrc[1][(hi >> 16) & 0xFF] ^ kCrc[0][hi >> 24];
  }
  for (; size > 0; ++p, --size) crc = (crc >> 8) ^ kCrc[0][(crc ^ *p) & 0xFF];
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t crc = crc32c(data, size);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string frame_record(const std::string& data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(out, data.size(), 8);
  put_le(out, masked_crc32c(out.data(), 8), 4);
  out += data;
  put_le(out, masked_crc32c(data.data(), data.size()), 4);
  return out;
}

EventFileRecords read_event_file(const fs::path& path) {
  const std::string bytes = read_text(path);
  const auto* b = reinterpret_cast<const uint8_t*>(bytes.data());
  EventFileRecords r;
  for (size_t off = 0; off < bytes.size();) {
    const size_t left = bytes.size() - off;
    const auto where = [&] { return path.string() + ": record " + std::to_string(r.records.size()) + " at offset " + std::to_string(off); };
    if (left < 12) {
      r.truncated_tail = true;
      break;
    }
    if (le32(b + off + 8) != masked_crc32c(b + off, 8)) throw RuntimeError(where() + ": length CRC mismatch (corrupt event file)");
    const uint64_t len = le64(b + off);
    if (len > left - 12 || left - 12 - len < 4) {
      r.truncated_tail = true;
      break;
    }
    const auto n = static_cast<size_t>(len);
    if (le32(b + off + 12 + n) != masked_crc32c(b + off + 12, n)) throw RuntimeError(where() + ": data CRC mismatch (corrupt event file)");
    r.records.emplace_back(bytes, off + 12, n);
    off += 16 + n;
  }
  return r;
}

const std::vector<double>& default_bucket_edges() {
  static const std::vector<double> edges = [] {
    std::vector<double> pos;
    for (double v = 1e-12; v < 1e20; v *= 1.1) pos.push_back(v);  // the same double arithmetic as SummaryWriter
    std::vector<double> e;
    for (auto it = pos.rbegin(); it != pos.rend(); ++it) e.push_back(-*it);
    e.push_back(0.0);
    e.insert(e.end(), pos.begin(), pos.end());
    return e;
  }();
  return edges;
}

Histogram make_histogram(std::span<const double> values) { return histogram_of(values); }
Histogram make_histogram(std::span<const float> values) { return histogram_of(values); }

EventWriter::EventWriter(const fs::path& log_dir, std::optional<int64_t> purge_step) {
  std::error_code ec;
  fs::create_directories(log_dir, ec);
  if (ec) throw RuntimeError("cannot create the TensorBoard log directory " + log_dir.string() + ": " + ec.message());
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "localhost");
  const auto unix_time = static_cast<long long>(std::time(nullptr));
  char name[400];
  std::snprintf(name, sizeof name, "events.out.tfevents.%010lld.%s.%d.%d", unix_time, host, static_cast<int>(::getpid()),
                g_file_counter.fetch_add(1));
  path_ = log_dir / name;
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw RuntimeError(io_message("cannot create", path_));
  try {
    write_event(event_header(/*step=*/0)
                    .str(event::kFileVersion, "brain.Event:2")
                    .msg(event::kSourceMetadata, Proto().str(source_metadata::kWriter, "difftrain"))
                    .bytes());
    if (purge_step) add_session_start(*purge_step);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

EventWriter::~EventWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void EventWriter::write_event(const std::string& event) { write_all(fd_, frame_record(event), path_); }

void EventWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  write_event(summary_event(step, Proto().str(value::kTag, tag).fixed32(value::kSimpleValue, static_cast<float>(value))));
}

void EventWriter::add_image(const std::string& tag, const uint8_t* pixels, int64_t channels, int64_t height, int64_t width,
                            int64_t step) {
  if (channels != 1 && channels != 3 && channels != 4)
    throw RuntimeError("TensorBoard image " + tag + ": " + std::to_string(channels) + " channels (must be 1 gray, 3 RGB or 4 RGBA)");
  const auto png = formats::encode_png(pixels, channels, height, width);
  const Proto img = std::move(Proto()
                                  .int64(image::kHeight, height)
                                  .int64(image::kWidth, width)
                                  .int64(image::kColorspace, channels)
                                  .bytes(image::kEncodedImageString, std::string(png.begin(), png.end())));
  write_event(summary_event(step, Proto().str(value::kTag, tag).msg(value::kImage, img)));
}

namespace {
Proto histo_proto(const Histogram& h) {
  return std::move(Proto()
                       .dbl(histo::kMin, h.min)
                       .dbl(histo::kMax, h.max)
                       .dbl(histo::kNum, h.num)
                       .dbl(histo::kSum, h.sum)
                       .dbl(histo::kSumSquares, h.sum_squares)
                       .packed_doubles(histo::kBucketLimit, h.bucket_limit)
                       .packed_doubles(histo::kBucket, h.bucket));
}
}  // namespace

void EventWriter::add_histogram(const std::string& tag, std::span<const float> values, int64_t step) {
  const Histogram h = make_histogram(values);
  if (h.num > 0) write_event(summary_event(step, Proto().str(value::kTag, tag).msg(value::kHisto, histo_proto(h))));
}

void EventWriter::add_histogram(const std::string& tag, std::span<const double> values, int64_t step) {
  const Histogram h = make_histogram(values);
  if (h.num > 0) write_event(summary_event(step, Proto().str(value::kTag, tag).msg(value::kHisto, histo_proto(h))));
}

void EventWriter::add_text(const std::string& tag, const std::string& markdown, int64_t step) {
  // TextPluginData{version: 0} serializes to nothing, so plugin_data carries no content.
  const Proto meta = std::move(Proto().msg(metadata::kPluginData, Proto().str(metadata::kPluginName, "text")));
  const Proto shape = std::move(Proto().msg(tensor::kDim, Proto().int64(tensor::kDimSize, 1)));
  const Proto t = std::move(Proto().int64(tensor::kDtype, tensor::kDtString).msg(tensor::kTensorShape, shape).bytes(tensor::kStringVal, markdown));
  write_event(summary_event(step, Proto().str(value::kTag, tag + "/text_summary").msg(value::kTensor, t).msg(value::kMetadata, meta)));
}

void EventWriter::add_session_start(int64_t step) {
  write_event(event_header(step).msg(event::kSessionLog, Proto().int64(session_log::kStatus, session_log::kStart)).bytes());
}

void EventWriter::flush() {
  if (::fdatasync(fd_) != 0) throw RuntimeError(io_message("cannot sync", path_));
}

}  // namespace difftrain::tensorboard

// TensorBoard event files and the metrics sinks, without LibTorch: CRC-32C against RFC 3720's
// check values, TFRecord framing (round trip, a cut tail, corruption), every Event decoded by a
// protobuf wire-format reader written here against the .proto definitions, PNGs decoded back,
// histogram invariants, metrics.jsonl and metrics.prom; then a run directory read by the real
// TensorBoard and compared with torch.utils.tensorboard.SummaryWriter (tests/tensorboard/check_events.py).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <regex>
#include <sstream>
#include <thread>
#include <tuple>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "difftrain/data_formats.h"
#include "difftrain/metrics.h"
#include "difftrain/tensorboard.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using tensorboard::EventWriter;

// ---- A protobuf wire-format reader (protobuf.dev/programming-guides/encoding), independent of
// the writer: every field must be in the schema below with its wire type, fields come in
// ascending number order (as the reference encoders write them), and a non-repeated field appears once.
enum Wire { kVarint = 0, kI64 = 1, kLen = 2, kI32 = 5 };

struct Msg;
struct Field {
  int number = 0, wire = 0;
  uint64_t num = 0;     // varint value, or the bits of a fixed64 / fixed32
  std::string bytes;    // a length-delimited payload
  std::shared_ptr<Msg> sub;
};
struct Msg {
  std::string type;
  std::vector<Field> fields;
  bool has(int n) const {
    for (const auto& f : fields)
      if (f.number == n) return true;
    return false;
  }
  const Field& one(int n) const {
    for (const auto& f : fields)
      if (f.number == n) return f;
    throw std::runtime_error(type + ": no field " + std::to_string(n));
  }
  double dbl(int n) const { return has(n) ? std::bit_cast<double>(one(n).num) : 0.0; }  // proto3: absent = 0
  int64_t i64(int n) const { return has(n) ? static_cast<int64_t>(one(n).num) : 0; }
  std::string str(int n) const { return has(n) ? one(n).bytes : ""; }
  const Msg& sub(int n) const { return *one(n).sub; }
};

struct FieldSpec {
  Wire wire;
  std::string sub;  // message type of a length-delimited field, "" for string/bytes/packed
  bool repeated = false;
};
// From tensorflow/core/util/event.proto and framework/{summary,histogram,tensor,tensor_shape}.proto.
const std::map<std::string, std::map<int, FieldSpec>>& schema() {
  static const std::map<std::string, std::map<int, FieldSpec>> s = {
      {"Event", {{1, {kI64, ""}},             // double wall_time
                 {2, {kVarint, ""}},          // int64 step
                 {3, {kLen, ""}},             // string file_version
                 {5, {kLen, "Summary"}},      // Summary summary
                 {7, {kLen, "SessionLog"}},   // SessionLog session_log
                 {10, {kLen, "SourceMetadata"}}}},
      {"SourceMetadata", {{1, {kLen, ""}}}},  // string writer
      {"SessionLog", {{1, {kVarint, ""}}, {2, {kLen, ""}}, {3, {kLen, ""}}}},  // status, checkpoint_path, msg
      {"Summary", {{1, {kLen, "Value", true}}}},
      {"Value", {{1, {kLen, ""}},                 // string tag
                 {2, {kI32, ""}},                 // float simple_value
                 {4, {kLen, "Image"}},
                 {5, {kLen, "HistogramProto"}},
                 {8, {kLen, "TensorProto"}},
                 {9, {kLen, "SummaryMetadata"}}}},
      {"Image", {{1, {kVarint, ""}}, {2, {kVarint, ""}}, {3, {kVarint, ""}}, {4, {kLen, ""}}}},  // height, width, colorspace, png
      {"HistogramProto", {{1, {kI64, ""}}, {2, {kI64, ""}}, {3, {kI64, ""}}, {4, {kI64, ""}}, {5, {kI64, ""}},  // min max num sum sum_squares
                          {6, {kLen, ""}}, {7, {kLen, ""}}}},  // packed double bucket_limit, bucket
      {"SummaryMetadata", {{1, {kLen, "PluginData"}}}},
      {"PluginData", {{1, {kLen, ""}}, {2, {kLen, ""}}}},  // plugin_name, content
      {"TensorProto", {{1, {kVarint, ""}}, {2, {kLen, "TensorShapeProto"}}, {8, {kLen, "", true}}}},  // dtype, shape, string_val
      {"TensorShapeProto", {{2, {kLen, "Dim", true}}}},
      {"Dim", {{1, {kVarint, ""}}}},  // int64 size
  };
  return s;
}

Msg decode(const std::string& type, const std::string& b) {
  const auto& spec = schema().at(type);
  Msg m{type, {}};
  size_t i = 0;
  auto fail = [&](const std::string& why) { return std::runtime_error(type + " at byte " + std::to_string(i) + ": " + why); };
  auto varint = [&] {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (i >= b.size() || shift > 63) throw fail("bad varint");
      const auto byte = static_cast<uint8_t>(b[i++]);
      v |= uint64_t{byte & 0x7Fu} << shift;
      if (!(byte & 0x80)) return v;
    }
  };
  auto fixed = [&](size_t n) {
    if (b.size() - i < n) throw fail("truncated fixed" + std::to_string(8 * n));
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t{static_cast<uint8_t>(b[i + k])} << (8 * k);
    i += n;
    return v;
  };
  while (i < b.size()) {
    const uint64_t key = varint();
    Field f;
    f.number = static_cast<int>(key >> 3);
    f.wire = static_cast<int>(key & 7);
    const auto it = spec.find(f.number);
    if (it == spec.end()) throw fail("field " + std::to_string(f.number) + " is not in the schema");
    if (it->second.wire != f.wire)
      throw fail("field " + std::to_string(f.number) + " has wire type " + std::to_string(f.wire) + ", expected " + std::to_string(it->second.wire));
    if (!m.fields.empty() && f.number < m.fields.back().number) throw fail("fields out of order");
    if (!it->second.repeated && m.has(f.number)) throw fail("field " + std::to_string(f.number) + " repeated");
    switch (f.wire) {
      case kVarint: f.num = varint(); break;
      case kI64: f.num = fixed(8); break;
      case kI32: f.num = fixed(4); break;
      case kLen: {
        const uint64_t n = varint();
        if (n > b.size() - i) throw fail("length " + std::to_string(n) + " past the end");
        f.bytes = b.substr(i, n);
        i += n;
        if (!it->second.sub.empty()) f.sub = std::make_shared<Msg>(decode(it->second.sub, f.bytes));
        break;
      }
      default: throw fail("wire type " + std::to_string(f.wire));
    }
    m.fields.push_back(std::move(f));
  }
  return m;
}

std::vector<double> packed_doubles(const std::string& bytes) {
  EXPECT_EQ(bytes.size() % 8, 0u);
  std::vector<double> v(bytes.size() / 8);
  std::memcpy(v.data(), bytes.data(), 8 * v.size());  // little-endian host (x86-64, aarch64)
  return v;
}

// The single Summary.Value of a summary Event.
const Msg& value_of(const Msg& event) {
  const Msg& summary = event.sub(5);
  EXPECT_EQ(summary.fields.size(), 1u);
  return summary.sub(1);
}

double unix_now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

class TensorBoard : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("difftrain_tb_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  static void write(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; }
  static std::string slurp(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), {});
  }
  static std::vector<fs::path> event_files(const fs::path& dir) {
    std::vector<fs::path> v;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().filename().string().starts_with("events.out.tfevents.")) v.push_back(e.path());
    std::sort(v.begin(), v.end());
    return v;
  }
  static std::vector<Msg> events_in(const fs::path& file) {
    const auto r = tensorboard::read_event_file(file);
    EXPECT_FALSE(r.truncated_tail);
    std::vector<Msg> v;
    for (const auto& rec : r.records) v.push_back(decode("Event", rec));
    return v;
  }
  fs::path dir_;
};

TEST_F(TensorBoard, Crc32cCheckValues) {  // RFC 3720 B.4, and the usual "123456789" check value
  const std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xFF);
  std::vector<uint8_t> up(32), down(32);
  for (int i = 0; i < 32; ++i) up[i] = static_cast<uint8_t>(i), down[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(tensorboard::crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(tensorboard::crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(tensorboard::crc32c(up.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(tensorboard::crc32c(down.data(), 32), 0x113FDB5Cu);
  EXPECT_EQ(tensorboard::crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(tensorboard::crc32c("", 0), 0u);
  // Extending in pieces of every split (covers the slice-by-8 loop and its byte tail).
  const std::string s = "The quick brown fox jumps over the lazy dog, twice over the lazy dog.";
  const uint32_t whole = tensorboard::crc32c(s.data(), s.size());
  for (size_t k = 0; k <= s.size(); ++k)
    ASSERT_EQ(tensorboard::crc32c(s.data() + k, s.size() - k, tensorboard::crc32c(s.data(), k)), whole) << k;
  const uint32_t crc = tensorboard::crc32c("123456789", 9);
  EXPECT_EQ(tensorboard::masked_crc32c("123456789", 9), ((crc >> 15) | (crc << 17)) + 0xa282ead8u);
}

TEST_F(TensorBoard, FramingRoundTrip) {
  const std::vector<std::string> payloads = {"", "a", std::string(100000, '\x7f'), std::string("\0\1\2", 3)};
  std::string file;
  for (const auto& p : payloads) file += tensorboard::frame_record(p);
  // Layout of one record: uint64 LE length, masked CRC32C of it, data, masked CRC32C of the data.
  const std::string rec = tensorboard::frame_record("abc");
  ASSERT_EQ(rec.size(), 8u + 4 + 3 + 4);
  EXPECT_EQ(rec.substr(0, 8), std::string("\3\0\0\0\0\0\0\0", 8));
  uint32_t c1 = 0, c2 = 0;
  std::memcpy(&c1, rec.data() + 8, 4);
  std::memcpy(&c2, rec.data() + 15, 4);
  EXPECT_EQ(c1, tensorboard::masked_crc32c(rec.data(), 8));
  EXPECT_EQ(c2, tensorboard::masked_crc32c("abc", 3));
  EXPECT_EQ(rec.substr(12, 3), "abc");

  write(dir_ / "f", file);
  const auto r = tensorboard::read_event_file(dir_ / "f");
  EXPECT_FALSE(r.truncated_tail);
  EXPECT_EQ(r.records, payloads);
  write(dir_ / "empty", "");
  EXPECT_TRUE(tensorboard::read_event_file(dir_ / "empty").records.empty());
  EXPECT_THROW(tensorboard::read_event_file(dir_ / "missing"), RuntimeError);
}

TEST_F(TensorBoard, TruncatedTailStopsCleanly) {
  const std::string a = tensorboard::frame_record("first"), b = tensorboard::frame_record("second record");
  for (size_t cut = 1; cut < b.size(); ++cut) {  // every cut inside the last record: header, data or CRC
    write(dir_ / "f", a + b.substr(0, cut));
    const auto r = tensorboard::read_event_file(dir_ / "f");
    EXPECT_TRUE(r.truncated_tail) << cut;
    ASSERT_EQ(r.records.size(), 1u) << cut;
    EXPECT_EQ(r.records[0], "first");
  }
}

TEST_F(TensorBoard, CorruptionIsDetected) {
  const std::string a = tensorboard::frame_record("first"), b = tensorboard::frame_record("second"), c = tensorboard::frame_record("third");
  const std::string good = a + b + c;
  // Flip each byte of the middle record: length, length CRC, data or data CRC.
  for (size_t k = a.size(); k < a.size() + b.size(); ++k) {
    std::string bad = good;
    bad[k] = static_cast<char>(bad[k] ^ 0x20);
    write(dir_ / "f", bad);
    try {
      tensorboard::read_event_file(dir_ / "f");
      ADD_FAILURE() << "no error for a flipped byte at " << k;
    } catch (const RuntimeError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find((dir_ / "f").string()), std::string::npos) << msg;
      EXPECT_NE(msg.find("record 1 at offset " + std::to_string(a.size())), std::string::npos) << msg;
      EXPECT_NE(msg.find("CRC mismatch"), std::string::npos) << msg;
    }
  }
}

TEST_F(TensorBoard, EveryEventDecodesAgainstTheProtos) {
  const double before = unix_now();
  const std::string path = [&] {
    EventWriter w(dir_);
    w.add_scalar("train/loss", 0.125, 7);
    w.add_scalar("zero", 0.0, 8);  // simple_value is a oneof member: written even at 0
    const std::vector<uint8_t> gray = {0, 50, 100, 150, 200, 250};  // 1 x 2 x 3
    w.add_image("gray", gray.data(), 1, 2, 3, 9);
    std::vector<uint8_t> rgb(3 * 4 * 5);
    for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 37);
    w.add_image("rgb", rgb.data(), 3, 4, 5, 10);
    const std::vector<float> values = {-2.5f, -1e-13f, 0.f, 0.f, 1e-3f, 1.f, 3.f, 3.f, 100.f};
    w.add_histogram("hist", values, 11);
    w.add_text("config", "# Config\n`{\"a\": 1}`", 12);
    w.add_session_start(13);
    w.flush();
    return w.path().string();
  }();
  const double after = unix_now();

  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::regex name(R"(events\.out\.tfevents\.(\d{10})\.(.+)\.(\d+)\.(\d+))");
  std::smatch m;
  const std::string file = fs::path(path).filename().string();
  ASSERT_TRUE(std::regex_match(file, m, name)) << file;
  EXPECT_NEAR(std::stod(m[1]), before, 2.0);
  EXPECT_EQ(m[2], std::string(host));
  EXPECT_EQ(m[3], std::to_string(::getpid()));
  {  // the counter: the next writer's file ends in n + 1
    EventWriter w2(dir_ / "other");
    EXPECT_TRUE(w2.path().filename().string().ends_with("." + std::to_string(std::stoi(m[4]) + 1))) << w2.path();
  }

  const auto ev = events_in(path);
  ASSERT_EQ(ev.size(), 8u);
  for (const auto& e : ev) {  // wall_time: the time of writing, to the microsecond
    EXPECT_GE(e.dbl(1), before - 1e-3);
    EXPECT_LE(e.dbl(1), after + 1e-3);
  }
  EXPECT_NE(ev[0].dbl(1), std::floor(ev[0].dbl(1)));  // sub-second (fails one time in ~1e6)
  EXPECT_EQ(ev[0].str(3), "brain.Event:2");
  EXPECT_FALSE(ev[0].has(2));  // step 0 is proto3's default: not written
  EXPECT_EQ(ev[0].sub(10).str(1), "difftrain");

  EXPECT_EQ(ev[1].i64(2), 7);
  EXPECT_EQ(value_of(ev[1]).str(1), "train/loss");
  EXPECT_EQ(std::bit_cast<float>(static_cast<uint32_t>(value_of(ev[1]).one(2).num)), 0.125f);
  EXPECT_TRUE(value_of(ev[2]).has(2));
  EXPECT_EQ(value_of(ev[2]).one(2).num, 0u);

  for (int k : {3, 4}) {
    const Msg& v = value_of(ev[k]);
    EXPECT_EQ(v.str(1), k == 3 ? "gray" : "rgb");
    const Msg& img = v.sub(4);
    const std::string png = img.str(4);
    const auto d = formats::decode_image(reinterpret_cast<const uint8_t*>(png.data()), png.size(), "event png");
    EXPECT_EQ(img.i64(1), d.height);
    EXPECT_EQ(img.i64(2), d.width);
    EXPECT_EQ(img.i64(3), d.channels);  // colorspace: 1 gray, 3 RGB
    EXPECT_EQ(d.channels, k == 3 ? 1 : 3);
    std::vector<uint8_t> want = {0, 50, 100, 150, 200, 250};
    if (k == 4) {
      want.resize(3 * 4 * 5);
      for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<uint8_t>(i * 37);
    }
    EXPECT_EQ(d.pixels, want);
  }

  {
    const Msg& v = value_of(ev[5]);
    EXPECT_EQ(v.str(1), "hist");
    const Msg& h = v.sub(5);
    const auto limits = packed_doubles(h.str(6)), counts = packed_doubles(h.str(7));
    const std::vector<float> values = {-2.5f, -1e-13f, 0.f, 0.f, 1e-3f, 1.f, 3.f, 3.f, 100.f};
    const auto want = tensorboard::make_histogram(values);
    EXPECT_EQ(h.dbl(1), -2.5);
    EXPECT_EQ(h.dbl(2), 100.0);
    EXPECT_EQ(h.dbl(3), 9.0);
    EXPECT_EQ(h.dbl(4), want.sum);
    EXPECT_EQ(h.dbl(5), want.sum_squares);
    EXPECT_EQ(limits, want.bucket_limit);
    EXPECT_EQ(counts, want.bucket);
  }
  {
    const Msg& v = value_of(ev[6]);
    EXPECT_EQ(v.str(1), "config/text_summary");
    const Msg& plugin = v.sub(9).sub(1);
    EXPECT_EQ(plugin.str(1), "text");
    EXPECT_FALSE(plugin.has(2));  // TextPluginData{version: 0} serializes to nothing
    const Msg& t = v.sub(8);
    EXPECT_EQ(t.i64(1), 7);  // DT_STRING
    ASSERT_EQ(t.sub(2).fields.size(), 1u);
    EXPECT_EQ(t.sub(2).sub(2).i64(1), 1);  // shape [1]
    EXPECT_EQ(t.str(8), "# Config\n`{\"a\": 1}`");
  }
  EXPECT_EQ(ev[7].i64(2), 13);
  EXPECT_EQ(ev[7].sub(7).i64(1), 1);  // SessionLog.START
  EXPECT_FALSE(ev[7].has(5));

  // A resume: the first Event, then SessionLog START at the purge step.
  EventWriter w3(dir_ / "resumed", /*purge_step=*/40);
  const auto ev3 = events_in(w3.path());
  ASSERT_EQ(ev3.size(), 2u);
  EXPECT_EQ(ev3[0].str(3), "brain.Event:2");
  EXPECT_EQ(ev3[1].i64(2), 40);
  EXPECT_EQ(ev3[1].sub(7).i64(1), 1);

  std::vector<uint8_t> two(2 * 2 * 2);
  EXPECT_THROW(w3.add_image("la", two.data(), 2, 2, 2, 0), RuntimeError);  // gray+alpha is not a TensorBoard colorspace
}

TEST_F(TensorBoard, HistogramInvariants) {
  const auto& edges = tensorboard::default_bucket_edges();
  ASSERT_EQ(edges.size(), 1549u);
  EXPECT_EQ(edges[774], 0.0);
  EXPECT_EQ(edges[775], 1e-12);
  for (size_t i = 0; i + 1 < edges.size(); ++i) ASSERT_LT(edges[i], edges[i + 1]);

  std::mt19937 rng(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> values;
  for (int i = 0; i < 20000; ++i) values.push_back(normal(rng) * std::pow(10.0, i % 9 - 4));
  for (size_t i = 0; i < edges.size(); i += 7) values.push_back(edges[i]);  // exactly on edges (left-closed bins)
  for (double v : {0.0, -0.0, 1e-15, -1e-15, 1e-12, -1e-12, 1e25, -1e25, edges.back(), edges.front(), 5e-324})
    values.push_back(v);
  const size_t finite = values.size();
  for (double v : {std::nan(""), std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()}) values.push_back(v);

  const auto h = tensorboard::make_histogram(values);
  EXPECT_EQ(h.num, static_cast<double>(finite));
  double total = 0, mn = 1e300, mx = -1e300, sum = 0, sq = 0;
  for (double c : h.bucket) total += c;
  EXPECT_EQ(total, h.num);
  for (size_t i = 0; i < finite; ++i) {
    mn = std::min(mn, values[i]);
    mx = std::max(mx, values[i]);
    sum += values[i];
    sq += values[i] * values[i];
  }
  EXPECT_EQ(h.min, mn);
  EXPECT_EQ(h.max, mx);
  EXPECT_DOUBLE_EQ(h.sum, sum);
  EXPECT_DOUBLE_EQ(h.sum_squares, sq);
  ASSERT_EQ(h.bucket.size(), h.bucket_limit.size());
  for (size_t i = 0; i + 1 < h.bucket_limit.size(); ++i) ASSERT_LT(h.bucket_limit[i], h.bucket_limit[i + 1]);
  EXPECT_EQ(h.bucket.front(), 0.0);  // the empty bin left of the data
  EXPECT_GT(h.bucket.back(), 0.0);

  // Against a plain binary search over the edges (np.histogram: edges[i] <= v < edges[i + 1], the
  // last bin closed), with values past the outermost edges in the outermost bins.
  std::vector<double> counts(edges.size() - 1, 0.0);
  for (size_t i = 0; i < finite; ++i) {
    const double v = values[i];
    auto k = static_cast<size_t>(std::upper_bound(edges.begin(), edges.end(), v) - edges.begin());
    k = std::clamp<size_t>(k, 1, edges.size() - 1) - 1;
    counts[k] += 1;
  }
  auto trimmed = [&](const std::vector<double>& c) {  // make_histogram's trim, written out again
    size_t first = 0, last = c.size() - 1;
    while (c[first] == 0) ++first;
    while (c[last] == 0) --last;
    std::vector<double> lim(edges.begin() + static_cast<ptrdiff_t>(first), edges.begin() + static_cast<ptrdiff_t>(last) + 2);
    std::vector<double> cnt = {0.0};
    if (first > 0) cnt.clear();
    cnt.insert(cnt.end(), c.begin() + static_cast<ptrdiff_t>(first > 0 ? first - 1 : 0), c.begin() + static_cast<ptrdiff_t>(last) + 1);
    return std::make_pair(lim, cnt);
  };
  EXPECT_GT(counts.front(), 0.0);  // -1e25 lands in the first bin (the made-up empty bin case)
  const auto [lim, cnt] = trimmed(counts);
  EXPECT_EQ(h.bucket_limit, lim);
  EXPECT_EQ(h.bucket, cnt);

  // Values inside: the trim keeps the real empty bin left of the data.
  std::vector<double> mid;
  for (int i = 0; i < 5000; ++i) mid.push_back(normal(rng));
  std::fill(counts.begin(), counts.end(), 0.0);
  for (double v : mid) counts[static_cast<size_t>(std::upper_bound(edges.begin(), edges.end(), v) - edges.begin()) - 1] += 1;
  const auto hm = tensorboard::make_histogram(mid);
  const auto [lim2, cnt2] = trimmed(counts);
  EXPECT_EQ(hm.bucket_limit, lim2);
  EXPECT_EQ(hm.bucket, cnt2);
  EXPECT_EQ(hm.num, 5000.0);
}

TEST_F(TensorBoard, HistogramEdgeCases) {
  EXPECT_EQ(tensorboard::make_histogram(std::vector<double>{}).num, 0.0);
  const auto nan = tensorboard::make_histogram(std::vector<double>{std::nan("")});
  EXPECT_EQ(nan.num, 0.0);
  EXPECT_TRUE(nan.bucket.empty());
  // One value: an empty bin on its left and its own bin, limits the two edges around it.
  const auto one = tensorboard::make_histogram(std::vector<float>{1.0f});
  ASSERT_EQ(one.bucket.size(), 2u);
  EXPECT_EQ(one.bucket, (std::vector<double>{0, 1}));
  EXPECT_LE(one.bucket_limit[0], 1.0);
  EXPECT_GT(one.bucket_limit[1], 1.0);
  EXPECT_LT(one.bucket_limit[1] / one.bucket_limit[0], 1.1 + 1e-9);
  // The first bin holding data gets a made-up empty bin on its left, with the first edge as limit.
  const auto low = tensorboard::make_histogram(std::vector<double>{-1e30});
  EXPECT_EQ(low.bucket, (std::vector<double>{0, 1}));
  EXPECT_EQ(low.bucket_limit[0], tensorboard::default_bucket_edges()[0]);
  // All-NaN input writes nothing.
  EventWriter w(dir_);
  w.add_histogram("h", std::vector<float>{std::nanf("")}, 1);
  EXPECT_EQ(events_in(w.path()).size(), 1u);
}

TEST_F(TensorBoard, PngRoundTrip) {
  for (int c = 1; c <= 4; ++c) {
    const int h = 7, w = 9;
    std::vector<uint8_t> chw(static_cast<size_t>(c * h * w));
    for (size_t i = 0; i < chw.size(); ++i) chw[i] = static_cast<uint8_t>((i * 53 + 11) % 256);
    const auto png = formats::encode_png(chw.data(), c, h, w);
    const auto d = formats::decode_image(png.data(), png.size(), "png");
    EXPECT_EQ(d.channels, c);
    EXPECT_EQ(d.height, h);
    EXPECT_EQ(d.width, w);
    EXPECT_EQ(d.pixels, chw) << c;
    std::vector<uint8_t> hwc(chw.size());  // the same image given interleaved
    for (int k = 0; k < c; ++k)
      for (int i = 0; i < h * w; ++i) hwc[static_cast<size_t>(i * c + k)] = chw[static_cast<size_t>(k * h * w + i)];
    EXPECT_EQ(formats::encode_png(hwc.data(), c, h, w, formats::PixelLayout::kHWC), png);
  }
  const uint8_t px[4] = {};
  EXPECT_THROW(formats::encode_png(px, 5, 1, 1), formats::FormatError);
  EXPECT_THROW(formats::encode_png(px, 1, 0, 4), formats::FormatError);
  EXPECT_THROW(formats::encode_png(px, 1, int64_t{1} << 40, int64_t{1} << 40), formats::FormatError);
}

// ---- metrics.jsonl and metrics.prom

std::vector<nlohmann::ordered_json> jsonl(const fs::path& p) {
  std::ifstream in(p);
  std::vector<nlohmann::ordered_json> v;
  for (std::string line; std::getline(in, line);) v.push_back(nlohmann::ordered_json::parse(line));
  return v;
}

// Checks the text exposition format line by line: HELP, TYPE (gauge or counter), one sample
// labelled run="..." and perhaps more labels. Returns name -> value, and name -> type in `types`.
std::map<std::string, std::string> parse_prom(const std::string& text, std::map<std::string, std::string>* types = nullptr) {
  const std::regex help(R"(# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) ([^\n]*))"),
      type(R"(# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (gauge|counter))");
  const std::regex sample(
      R"re(([a-zA-Z_:][a-zA-Z0-9_:]*)\{run="(?:[^"\\\n]|\\[\\"n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\} (\S+))re");
  std::map<std::string, std::string> samples;
  std::istringstream in(text);
  EXPECT_TRUE(text.ends_with("\n"));
  std::string l1, l2, l3;
  while (std::getline(in, l1)) {
    std::smatch m1, m2, m3;
    EXPECT_TRUE(std::regex_match(l1, m1, help)) << l1;
    EXPECT_TRUE(std::getline(in, l2) && std::regex_match(l2, m2, type)) << l2;
    EXPECT_TRUE(std::getline(in, l3) && std::regex_match(l3, m3, sample)) << l3;
    if (m1.empty() || m2.empty() || m3.empty()) break;
    EXPECT_EQ(m1[1], m2[1]);
    EXPECT_EQ(m1[1], m3[1]);
    EXPECT_TRUE(samples.emplace(m3[1], m3[2]).second) << "duplicate metric " << m3[1];
    if (types) (*types)[m3[1]] = m2[2];
    if (m2[2] == "counter") {
      EXPECT_TRUE(std::string(m3[1]).ends_with("_total")) << m3[1];
    }
    std::size_t used = 0;
    const std::string v = m3[2];
    if (v != "NaN" && v != "+Inf" && v != "-Inf") {
      std::stod(v, &used);
      EXPECT_EQ(used, v.size()) << v;
    }
  }
  return samples;
}

TEST_F(TensorBoard, JsonlAndPrometheus) {
  const fs::path run = dir_ / "my_run";
  {
    MetricsLogger log(run, MetricsOptions{.tensorboard = true, .jsonl = true, .prometheus = true, .run_name = ""});
    log.scalars(0, {{"train/loss", 0.5}, {"lr", 1e-4}});
    log.scalars(10, {{"train/loss", 0.25}, {"train/grad-norm", std::nan("")}, {"a/b", 1.0}, {"a_b", 2.0}});
    log.flush();
    EXPECT_THROW(log.scalars(20, {{"step", 1.0}}), RuntimeError);
  }
  const auto lines = jsonl(run / "metrics.jsonl");
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["step"], 0);
  EXPECT_NEAR(lines[0]["wall_time"].get<double>(), unix_now(), 60.0);
  EXPECT_EQ(lines[0]["train/loss"], 0.5);
  EXPECT_EQ(lines[0]["lr"], 1e-4);
  EXPECT_EQ(lines[1]["step"], 10);
  EXPECT_EQ(lines[1]["train/loss"], 0.25);
  EXPECT_TRUE(lines[1]["train/grad-norm"].is_null());
  EXPECT_EQ(lines[1].begin().key(), "step");  // key order: step, wall_time, then the tags as given

  const auto prom = parse_prom(slurp(run / "metrics.prom"));
  EXPECT_EQ(prom.at("difftrain_step"), "10");
  EXPECT_EQ(prom.at("difftrain_train_loss"), "0.25");
  EXPECT_EQ(prom.at("difftrain_lr"), "1e-04");  // the last value, though not logged at step 10
  EXPECT_EQ(prom.at("difftrain_train_grad_norm"), "NaN");
  EXPECT_EQ(prom.at("difftrain_a_b"), "1");
  EXPECT_EQ(prom.at("difftrain_a_b_2"), "2");  // a second tag with the same name gets a suffix
  EXPECT_TRUE(prom.count("difftrain_last_log_timestamp_seconds"));
  EXPECT_NE(slurp(run / "metrics.prom").find("difftrain_step{run=\"my_run\"} 10\n"), std::string::npos);
  for (const auto& e : fs::directory_iterator(run))  // no temporary left behind
    EXPECT_FALSE(e.path().filename().string().ends_with(".tmp")) << e.path();
  ASSERT_EQ(event_files(run).size(), 1u);
  EXPECT_EQ(events_in(event_files(run)[0]).size(), 1u + 2 + 4);

  EXPECT_EQ(prometheus_name("train/loss"), "difftrain_train_loss");
  EXPECT_EQ(prometheus_name("ema:decay 0.999"), "difftrain_ema:decay_0_999");
  // Abbreviated units spelled out in base units, the value scaled (whole '_' tokens only).
  const std::vector<std::tuple<std::string, std::string, double>> units = {
      {"train/img_per_s", "difftrain_train_images_per_second", 1.0},
      {"train/host_ms_per_step", "difftrain_train_host_seconds_per_step", 1e-3},
      {"system/gpu_mem_peak_gb", "difftrain_system_gpu_mem_peak_bytes", 1073741824.0},
      {"x/cache_mb", "difftrain_x_cache_bytes", 1048576.0},
      {"train/tflops", "difftrain_train_flops_per_second", 1e12},
      {"eval/sampling_s", "difftrain_eval_sampling_seconds", 1.0},
      {"msg_sms", "difftrain_msg_sms", 1.0}};
  for (const auto& [tag, name, scale] : units) {
    EXPECT_EQ(prometheus_metric(tag).name, name) << tag;
    EXPECT_EQ(prometheus_metric(tag).scale, scale) << tag;
  }

  // A run name that needs escaping in a label value.
  MetricsLogger quoted(dir_ / "q", MetricsOptions{.tensorboard = false, .jsonl = false, .prometheus = true, .run_name = "a\"b\\c\nd"});
  quoted.scalars(1, {{"x", 3.0}});
  const std::string q = slurp(dir_ / "q" / "metrics.prom");
  EXPECT_NE(q.find("difftrain_x{run=\"a\\\"b\\\\c\\nd\"} 3\n"), std::string::npos) << q;
  parse_prom(q);
  EXPECT_TRUE(event_files(dir_ / "q").empty());
  EXPECT_FALSE(fs::exists(dir_ / "q" / "metrics.jsonl"));

  // Counters, scaled gauges and the build-info gauge.
  MetricsLogger full(dir_ / "f", MetricsOptions{.tensorboard = false,
                                                .jsonl = false,
                                                .prometheus = true,
                                                .run_name = "f",
                                                .build_info = {{"version", "1.2.3"}, {"device", "cuda:0"}}});
  full.set_counter("difftrain_steps_total", "Steps.", 20);
  full.scalars(20, {{"train/host_ms_per_step", 250.0}, {"train/img_per_s", 128.0}});
  full.set_counter("difftrain_steps_total", "Steps.", 40);
  full.scalars(40, {{"train/host_ms_per_step", 500.0}});
  std::map<std::string, std::string> types;
  const std::string f = slurp(dir_ / "f" / "metrics.prom");
  const auto fp = parse_prom(f, &types);
  EXPECT_EQ(fp.at("difftrain_steps_total"), "40");
  EXPECT_EQ(types.at("difftrain_steps_total"), "counter");
  EXPECT_EQ(fp.at("difftrain_train_host_seconds_per_step"), "0.5");
  EXPECT_EQ(fp.at("difftrain_train_images_per_second"), "128");
  EXPECT_EQ(types.at("difftrain_train_images_per_second"), "gauge");
  EXPECT_NE(f.find("difftrain_build_info{run=\"f\",version=\"1.2.3\",device=\"cuda:0\"} 1\n"), std::string::npos) << f;
}

TEST_F(TensorBoard, ResumePurgesOrphanedSteps) {
  {
    MetricsLogger log(dir_, MetricsOptions{});
    for (int s = 0; s <= 50; s += 10) log.scalars(s, {{"loss", s / 100.0}});
  }
  std::ofstream(dir_ / "metrics.jsonl", std::ios::app) << "{\"step\": 6";  // a line cut by a power loss
  {
    MetricsLogger log(dir_, MetricsOptions{}, /*resume_step=*/30);
    ASSERT_NE(log.events(), nullptr);
    const auto ev = events_in(log.events()->path());
    ASSERT_EQ(ev.size(), 2u);
    EXPECT_EQ(ev[1].i64(2), 30);
    EXPECT_EQ(ev[1].sub(7).i64(1), 1);
    for (int s = 30; s <= 40; s += 10) log.scalars(s, {{"loss", -s / 100.0}});
  }
  std::vector<std::pair<int64_t, double>> got;
  for (const auto& j : jsonl(dir_ / "metrics.jsonl")) got.emplace_back(j["step"], j["loss"]);
  EXPECT_EQ(got, (std::vector<std::pair<int64_t, double>>{{0, 0.0}, {10, 0.1}, {20, 0.2}, {30, -0.3}, {40, -0.4}}));
}

// ---- The real TensorBoard: a run with a resume, read by EventAccumulator and compared with
// SummaryWriter's output for the same calls.

TEST_F(TensorBoard, RealTensorBoardReadsTheRun) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python";
  const fs::path run = dir_ / "run";
  nlohmann::json ops = nlohmann::json::array();
  auto scalars = [&](MetricsLogger& log, int64_t step, const std::vector<std::pair<std::string, double>>& v) {
    log.scalars(step, v);
    for (const auto& [tag, x] : v) ops.push_back({{"op", "scalar"}, {"tag", tag}, {"step", step}, {"value", x}});
  };
  auto image = [&](MetricsLogger& log, const std::string& tag, int64_t step, int64_t c, int64_t h, int64_t w, int seed) {
    std::vector<uint8_t> px(static_cast<size_t>(c * h * w));
    for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<uint8_t>((i * 29 + static_cast<size_t>(seed) * 71) % 256);
    log.image(tag, step, px.data(), c, h, w);
    ops.push_back({{"op", "image"}, {"tag", tag}, {"step", step}, {"channels", c}, {"height", h}, {"width", w}, {"pixels", px}});
  };
  auto histogram = [&](MetricsLogger& log, const std::string& tag, int64_t step, float scale) {
    std::mt19937 rng(static_cast<unsigned>(step));
    std::normal_distribution<float> normal(0.f, scale);
    std::vector<float> v(1000);
    for (auto& x : v) x = normal(rng);
    v[0] = 0.f;
    log.histogram(tag, step, v);
    ops.push_back({{"op", "histogram"}, {"tag", tag}, {"step", step}, {"values", v}});
  };
  {
    ops.push_back({{"op", "open"}, {"purge_step", nullptr}});
    MetricsLogger log(run, MetricsOptions{.tensorboard = true, .jsonl = true, .prometheus = true, .run_name = ""});
    const std::string md = "## Config\n\n```json\n{\"train\": {\"lr\": 0.0001}}\n```";
    log.text("config", 0, md);
    ops.push_back({{"op", "text"}, {"tag", "config"}, {"step", 0}, {"text", md}});
    for (int64_t s = 0; s <= 30; s += 10) scalars(log, s, {{"train/loss", 1.0 / (1 + s)}, {"train/lr", 1e-4 * s}});
    image(log, "samples/gray", 10, 1, 6, 8, 1);
    image(log, "samples/rgb", 10, 3, 5, 7, 2);
    histogram(log, "weights", 10, 0.5f);
    image(log, "samples/gray", 30, 1, 6, 8, 3);  // past the resume step: purged
    histogram(log, "weights", 30, 2.0f);
  }
  // A resume happens later than the first run: a new second keeps the file names in order.
  const auto t0 = std::time(nullptr);
  while (std::time(nullptr) == t0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    ops.push_back({{"op", "open"}, {"purge_step", 20}});
    MetricsLogger log(run, MetricsOptions{.tensorboard = true, .jsonl = true, .prometheus = true, .run_name = ""}, /*resume_step=*/20);
    for (int64_t s = 20; s <= 40; s += 10) scalars(log, s, {{"train/loss", -1.0 * static_cast<double>(s)}, {"train/lr", 2e-4 * s}});
    image(log, "samples/rgb", 40, 3, 5, 7, 4);
    histogram(log, "weights", 40, 1.0f);
    log.flush();
  }
  // What TensorBoard must show after purging the orphaned steps >= 20 of the first run.
  const nlohmann::json expect = {
      {"scalars",
       {{"train/loss", {{0, 1.0}, {10, 1.0 / 11}, {20, -20.0}, {30, -30.0}, {40, -40.0}}},
        {"train/lr", {{0, 0.0}, {10, 1e-3}, {20, 4e-3}, {30, 6e-3}, {40, 8e-3}}}}},
      {"images", {{"samples/gray", {10}}, {"samples/rgb", {10, 40}}}},
      {"histograms", {{"weights", {10, 40}}}},
      {"texts", {{"config", {0}}}}};
  std::ofstream(dir_ / "expected.json") << nlohmann::json{{"ops", ops}, {"expect", expect}}.dump();

  const std::string cmd = python + " " + test::source_dir() + "/tests/tensorboard/check_events.py " + run.string() + " " +
                          (dir_ / "expected.json").string() + " > " + (dir_ / "check.log").string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  const std::string log = slurp(dir_ / "check.log");
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd << "\n" << log;
  std::cout << log;
}

}  // namespace
}  // namespace difftrain

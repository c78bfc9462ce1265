#include "difftrain/webdataset.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/randperm.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "difftrain/data_formats.h"
#include "difftrain/log.h"
#include "difftrain/rng.h"
#include "difftrain/tar.h"

namespace difftrain {

namespace fs = std::filesystem;
using formats::FormatError;

namespace {

bool all_digits(const std::string& s) {  // ASCII digits only (std::isdigit takes no negative chars)
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// `a{000..012}b` -> a000b ... a012b (zero-padded to the endpoints' width when they have the same
// width, as braceexpand does); several groups expand left to right.
std::vector<std::string> expand_braces(const std::string& spec) {
  const auto open = spec.find('{');
  if (open == std::string::npos) return {spec};
  const auto close = spec.find('}', open);
  const auto dots = spec.find("..", open);
  if (close == std::string::npos || dots == std::string::npos || dots > close)
    throw FormatError(
        fmt::format("data.path {}: a brace pattern is {{FIRST..LAST}} with numbers, e.g. "
                    "shards/train-{{000000..000127}}.tar",
                    spec));
  const std::string a = spec.substr(open + 1, dots - open - 1), b = spec.substr(dots + 2, close - dots - 2);
  auto digits = [](const std::string& s) { return !s.empty() && s.size() <= 12 && all_digits(s); };
  if (!digits(a) || !digits(b) || std::stoll(a) > std::stoll(b) || std::stoll(b) - std::stoll(a) > 10'000'000)
    throw FormatError(fmt::format("data.path {}: the range {{{}..{}}} is not FIRST..LAST with FIRST <= LAST", spec, a, b));
  const long long first = std::stoll(a), last = std::stoll(b);
  const size_t width = a.size() == b.size() ? a.size() : 0;
  std::vector<std::string> out;
  const auto rests = expand_braces(spec.substr(close + 1));
  for (long long i = first; i <= last; ++i)
    for (const auto& rest : rests) out.push_back(spec.substr(0, open) + fmt::format("{:0{}d}", i, width) + rest);
  return out;
}

bool is_image_extension(const std::string& ext) { return ext == "png" || ext == "jpg" || ext == "jpeg"; }

int64_t parse_label(const std::string& text, const std::string& where) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  size_t j = text.size();
  while (j > i && std::isspace(static_cast<unsigned char>(text[j - 1]))) --j;
  const std::string t = text.substr(i, j - i);
  if (t.empty() || t.size() > 9 || !all_digits(t))
    throw FormatError(fmt::format("{}: the label '{}' is not a class number 0..999999999", where, t.substr(0, 40)));
  return std::stoll(t);
}

// Each thread keeps its last 16 shards open: the stream goes shard by shard (mixed only across
// the shuffle buffer), so this saves an open() per sample, which on a network filesystem costs
// more than decoding a small image. Keyed by dataset instance, never reused, so a shard
// rewritten for a new WebDataset is opened afresh.
class OpenShards {
 public:
  OpenShards(const OpenShards&) = delete;
  OpenShards& operator=(const OpenShards&) = delete;
  OpenShards() = default;
  ~OpenShards() {
    for (auto& e : entries_)
      if (e.fd >= 0) ::close(e.fd);
  }
  // The descriptor of shard `shard` of dataset `instance`, or -1 with errno set.
  int get(uint64_t instance, int32_t shard, const std::string& path) {
    for (auto& e : entries_)
      if (e.fd >= 0 && e.instance == instance && e.shard == shard) return e.fd;
    auto& e = entries_[next_++ % entries_.size()];
    if (e.fd >= 0) ::close(e.fd);
    e = {instance, shard, ::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    return e.fd;
  }

 private:
  struct Entry {
    uint64_t instance = 0;
    int32_t shard = -1;
    int fd = -1;
  };
  std::array<Entry, 16> entries_;
  size_t next_ = 0;
};

std::atomic<uint64_t> next_instance{0};

}  // namespace

namespace {

// A shard index in webdataset's wids format: {"__kind__": "wids-shard-index-v1", "shardlist":
// [{"url": ..., "nsamples": N}, ...]}, urls relative to the index; "num_classes" is difftrain's.
ShardList read_shard_index(const std::string& spec) {
  std::ifstream in(spec);
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  const std::string usage =
      "a shard index is {\"__kind__\": \"wids-shard-index-v1\", \"shardlist\": [{\"url\": "
      "\"shard-000000.tar\", \"nsamples\": 1000}, ...]} (difftrain data pack writes one)";
  if (j.is_discarded() || !j.is_object()) throw FormatError(fmt::format("data.path {}: not JSON; {}", spec, usage));
  if (j.value("__kind__", std::string()) != "wids-shard-index-v1" || !j.contains("shardlist") || !j["shardlist"].is_array() ||
      j["shardlist"].empty())
    throw FormatError(fmt::format("data.path {}: not a shard index with shards; {}", spec, usage));
  ShardList list;
  const fs::path base = fs::path(spec).parent_path();
  for (const auto& e : j["shardlist"]) {
    if (!e.is_object() || !e.contains("url") || !e["url"].is_string() || !e.contains("nsamples") ||
        !e["nsamples"].is_number_integer() || e["nsamples"].get<int64_t>() < 0)
      throw FormatError(fmt::format("data.path {}: shardlist entry {} is not {{\"url\": string, \"nsamples\": integer >= 0}}",
                                    spec, e.dump().substr(0, 80)));
    const std::string url = e["url"].get<std::string>();
    list.shards.push_back(fs::path(url).is_absolute() ? url : (base / url).string());
    list.counts.push_back(e["nsamples"].get<int64_t>());
  }
  if (j.contains("num_classes") && j["num_classes"].is_number_integer()) list.num_classes = j["num_classes"].get<int64_t>();
  return list;
}

}  // namespace

ShardList resolve_shards(const std::string& spec) {
  ShardList list;
  auto& shards = list.shards;
  std::string what = "the pattern";
  std::error_code ec;
  if (spec.find('{') != std::string::npos) {
    shards = expand_braces(spec);
  } else if (fs::is_directory(spec, ec)) {
    for (const auto& e : fs::directory_iterator(spec, ec))
      if (e.is_regular_file() && e.path().extension() == ".tar") shards.push_back(e.path().string());
    std::sort(shards.begin(), shards.end());
    if (shards.empty()) throw FormatError(fmt::format("data.path {}: a directory without .tar shards", spec));
  } else if (fs::is_regular_file(spec, ec) && fs::path(spec).extension() == ".tar") {
    shards = {spec};
  } else if (fs::is_regular_file(spec, ec) && fs::path(spec).extension() == ".json") {
    list = read_shard_index(spec);
    what = "the index";
  } else if (fs::is_regular_file(spec, ec)) {  // a list, one shard per line; '#' starts a comment
    std::ifstream in(spec);
    std::string line;
    const fs::path base = fs::path(spec).parent_path();
    while (std::getline(in, line)) {
      line = line.substr(0, line.find('#'));
      line.erase(0, line.find_first_not_of(" \t\r"));
      line.erase(line.find_last_not_of(" \t\r") + 1);
      if (!line.empty()) shards.push_back(fs::path(line).is_absolute() ? line : (base / line).string());
    }
    what = "the list";
    if (shards.empty()) throw FormatError(fmt::format("data.path {}: the shard list names no shard", spec));
  } else {
    throw FormatError(fmt::format("data.path {}: no such directory, shard, shard list, shard index or brace pattern", spec));
  }
  for (const auto& s : list.shards)
    if (!fs::is_regular_file(s, ec))
      throw FormatError(fmt::format("data.path {}: shard {} named by {} does not exist", spec, s, what));
  return list;
}

std::vector<int64_t> buffer_shuffle(const std::vector<int64_t>& items, int64_t buffer, uint64_t seed) {
  std::vector<int64_t> out, pool;
  out.reserve(items.size());
  uint64_t state = seed;
  auto pick = [&](size_t n) { return static_cast<size_t>(splitmix64(state++) % n); };
  for (int64_t item : items) {
    if (static_cast<int64_t>(pool.size()) < buffer) {
      pool.push_back(item);
      continue;
    }
    const size_t k = pick(pool.size());  // emit a random buffered item, keep the new one in its place
    out.push_back(pool[k]);
    pool[k] = item;
  }
  while (!pool.empty()) {
    const size_t k = pick(pool.size());
    out.push_back(pool[k]);
    pool[k] = pool.back();
    pool.pop_back();
  }
  return out;
}

WebDataset::WebDataset(const std::string& spec, std::string label_field, int64_t shuffle_buffer, BadImagePolicy policy,
                       int64_t jpeg_min_side, int64_t shard_streams)
    : spec_(spec),
      label_field_(std::move(label_field)),
      shuffle_buffer_(shuffle_buffer),
      streams_(shard_streams),
      policy_(policy),
      jpeg_min_side_(jpeg_min_side),
      instance_(next_instance++) {
  auto list = resolve_shards(spec);
  shards_ = std::move(list.shards);
  indexed_ = !list.counts.empty();
  if (streams_ < 0 || streams_ > static_cast<int64_t>(shards_.size()))
    throw FormatError(
        fmt::format("data.shard_streams = {} for data.path {}: must be 0 (split samples) or 1..{}, the number of shards",
                    streams_, spec, shards_.size()));
  int64_t without_image = 0;
  if (indexed_) {  // counts from the index; each shard's headers are read when it is first read
    for (const int64_t n : list.counts) {
      const int64_t first = size();
      samples_.resize(static_cast<size_t>(first + n));
      ranges_.emplace_back(first, first + n);
    }
    scanned_ = std::make_unique<std::once_flag[]>(shards_.size());
    if (list.num_classes < 0) {  // an index without labels (e.g. widsindex's): scan for them now
      for (size_t s = 0; s < shards_.size(); ++s) ensure_scanned(s);
    } else {
      num_classes_ = list.num_classes;
    }
  } else {
    for (size_t s = 0; s < shards_.size(); ++s) {
      const int64_t first = size();
      auto places = scan(s, without_image);
      samples_.insert(samples_.end(), std::make_move_iterator(places.begin()), std::make_move_iterator(places.end()));
      ranges_.emplace_back(first, size());
    }
    if (!left_out_.empty())
      log_warn("data.path {}: {} damaged shard(s), read up to the damage (data.on_bad_image = \"skip\"):\n  {}", spec,
               left_out_.size(), fmt::join(left_out_, "\n  "));
    if (without_image > 0) log_warn("data.path {}: {} sample(s) without a png/jpg/jpeg member left out", spec, without_image);
  }
  if (samples_.empty())
    throw FormatError(fmt::format("data.path {}: no sample with an image in {} shard(s)", spec, shards_.size()));
  if (!indexed_ || list.num_classes < 0) {
    const bool labelled = std::any_of(samples_.begin(), samples_.end(), [](const Place& p) { return p.label >= 0; });
    if (labelled) {
      for (const auto& p : samples_) num_classes_ = std::max(num_classes_, p.label + 1);
      for (const auto& p : samples_)
        if (p.label < 0 && p.size > 0)
          throw FormatError(
              fmt::format("{}: {} has no label while other samples have one", shards_[static_cast<size_t>(p.shard)], p.member));
    }
  }
  if (streams_ > 0) {  // every stream gets at least floor(K/V) shards: its length is at least their smallest sum
    std::vector<int64_t> counts;
    for (const auto& [first, last] : ranges_) counts.push_back(last - first);
    std::sort(counts.begin(), counts.end());
    const auto k = static_cast<ptrdiff_t>(counts.size()) / streams_;
    stream_length_ = std::accumulate(counts.begin(), counts.begin() + k, int64_t{0});
    if (stream_length_ == 0)
      throw FormatError(
          fmt::format("data.shard_streams = {}: the smallest shards of data.path {} hold no sample", streams_, spec));
  }
}

std::vector<WebDataset::Place> WebDataset::scan(size_t s, int64_t& without_image) const {
  std::vector<Place> places;
  std::ifstream in(shards_[s], std::ios::binary);
  if (!in) throw FormatError(fmt::format("{}: cannot open", shards_[s]));
  scanned_count_.fetch_add(1);
  formats::TarReader tar(in, shards_[s], uint64_t{1} << 28);
  std::string key;
  Place place;
  bool has_image = false;
  auto finish = [&] {
    if (key.empty()) return;
    if (!has_image) ++without_image;
    else places.push_back(place);
    key.clear();
    place = Place{};
    has_image = false;
  };
  try {
    formats::TarMember m;
    while (tar.next(m)) {
      const auto name = formats::split_wds_name(m.name);
      if (name.key != key) {
        finish();
        key = name.key;
        place.shard = static_cast<int32_t>(s);
      }
      const std::string where = shards_[s] + ": " + m.name;
      if (is_image_extension(name.extension) && !has_image) {
        place.offset = m.offset, place.size = m.size, place.member = m.name;
        has_image = true;
      } else if (label_field_.empty() && name.extension == "cls") {
        const auto data = tar.read_data();
        place.label = parse_label(std::string(data.begin(), data.end()), where);
      } else if (!label_field_.empty() && name.extension == "json") {
        const auto data = tar.read_data();
        const auto j = nlohmann::json::parse(data.begin(), data.end(), nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() || !j.is_object()) throw FormatError(fmt::format("{}: not a JSON object", where));
        const auto it = j.find(label_field_);
        if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < 0)
          throw FormatError(fmt::format("{}: no non-negative integer field \"{}\" (data.label_field)", where, label_field_));
        place.label = it->get<int64_t>();
      }
    }
    finish();
  } catch (const FormatError& e) {
    if (policy_ == BadImagePolicy::fail)
      throw FormatError(std::string(e.what()) +
                        " (set data.on_bad_image = \"skip\" to keep the shard's samples before the damage)");
    const std::lock_guard<std::mutex> lock(left_out_mutex_);
    left_out_.push_back(e.what());
  }
  return places;
}

// An indexed shard's places, read on first use by whichever thread gets there; the others wait.
// A shard that disagrees with the index is an error (with "skip", a shard cut short keeps the
// samples it has: the missing ones fail to read and are skipped).
void WebDataset::ensure_scanned(size_t s) const {
  if (!indexed_) return;
  std::call_once(scanned_[s], [&] {
    int64_t without_image = 0;
    auto places = scan(s, without_image);
    const auto [first, last] = ranges_[s];
    const auto n = static_cast<int64_t>(places.size());
    if (n != last - first && (policy_ == BadImagePolicy::fail || n > last - first))
      throw FormatError(fmt::format("{}: the shard index {} says {} samples, the shard has {}{}", shards_[s], spec_, last - first,
                                    n, without_image ? fmt::format(" (and {} without an image)", without_image) : ""));
    for (int64_t i = 0; i < n; ++i) {
      if (num_classes_ > 0 && (places[static_cast<size_t>(i)].label < 0 || places[static_cast<size_t>(i)].label >= num_classes_))
        throw FormatError(fmt::format("{}: {} has label {}, outside the index's {} classes", shards_[s],
                                      places[static_cast<size_t>(i)].member, places[static_cast<size_t>(i)].label, num_classes_));
      samples_[static_cast<size_t>(first + i)] = std::move(places[static_cast<size_t>(i)]);
    }
    if (n < last - first)
      log_warn("{}: {} of the index's {} samples are there (data.on_bad_image = \"skip\")", shards_[s], n, last - first);
  });
}

size_t WebDataset::shard_of(int64_t index) const {
  const auto it = std::upper_bound(ranges_.begin(), ranges_.end(), index,
                                   [](int64_t i, const std::pair<int64_t, int64_t>& r) { return i < r.second; });
  return static_cast<size_t>(it - ranges_.begin());
}

int64_t WebDataset::label(int64_t index) const {
  ensure_scanned(shard_of(index));
  return samples_.at(static_cast<size_t>(index)).label;
}

std::vector<std::string> WebDataset::left_out() const {
  const std::lock_guard<std::mutex> lock(left_out_mutex_);
  return left_out_;
}

Sample WebDataset::read(const Place& p) const {
  thread_local OpenShards open_shards;
  const auto& shard = shards_[static_cast<size_t>(p.shard)];
  const int fd = open_shards.get(instance_, p.shard, shard);
  if (fd < 0) throw FormatError(fmt::format("{}: cannot open ({})", shard, std::strerror(errno)));
  std::vector<uint8_t> bytes(static_cast<size_t>(p.size));
  for (size_t got = 0; got < bytes.size();) {
    const ssize_t r = ::pread(fd, bytes.data() + got, bytes.size() - got, static_cast<off_t>(p.offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      throw FormatError(fmt::format("{}: {}: cannot read {} bytes at offset {} ({})", shard, p.member, p.size, p.offset,
                                    r < 0 ? std::strerror(errno) : "the shard shrank"));
    got += static_cast<size_t>(r);
  }
  const auto img = formats::decode_image(bytes.data(), bytes.size(), shard + ": " + p.member, jpeg_min_side_);
  auto t = at::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.channels, img.height, img.width},
                         at::TensorOptions().dtype(at::kByte))
               .clone();
  return {t, p.label};
}

Sample WebDataset::get(int64_t index) const {
  return read_or_skip(index, size(), policy_, skipped_, "data.path " + spec_, [&](int64_t k) {
    const size_t s = shard_of(k);
    ensure_scanned(s);
    const auto& p = samples_.at(static_cast<size_t>(k));
    if (p.size == 0)  // an indexed shard cut short (skip): name it
      throw FormatError(fmt::format("{}: sample {} of the shard index is not there", shards_[s], k - ranges_[s].first));
    return read(p);
  });
}

std::string WebDataset::describe() const {
  const auto damaged = left_out().size();
  return fmt::format("WebDataset {}: {} samples in {} shard(s){}, {}{}{}", spec_, samples_.size(), shards_.size(),
                     indexed_ ? " (counts from the index)" : "",
                     num_classes_ ? fmt::format("{} classes", num_classes_) : std::string("unlabelled"),
                     streams_ ? fmt::format(", {} shard streams of {} samples", streams_, stream_length_) : std::string(),
                     damaged ? fmt::format(" ({} damaged shard(s) cut short)", damaged) : "");
}

int64_t WebDataset::epoch_size() const { return streams_ ? streams_ * stream_length_ : size(); }

// Epoch e: the shards in a permutation of (seed, e), each front to back, through the shuffle buffer;
// with V streams, dealt round-robin to the streams, each shuffled apart, then interleaved.
std::vector<int64_t> WebDataset::epoch_order(uint64_t seed, int64_t epoch) const {
  auto gen = at::detail::createCPUGenerator(seed + static_cast<uint64_t>(epoch));
  const auto perm = at::randperm(static_cast<int64_t>(ranges_.size()), gen, at::TensorOptions().dtype(at::kLong));
  const int64_t* shard = perm.data_ptr<int64_t>();
  const int64_t streams = std::max<int64_t>(streams_, 1);
  // Its own seed stream per epoch (3 * 2^32 + e), apart from the per-rank and global-batch streams (rng.h).
  const uint64_t epoch_seed = derive_seed(seed, (uint64_t{3} << 32) + static_cast<uint64_t>(epoch));
  std::vector<std::vector<int64_t>> shuffled;
  for (int64_t v = 0; v < streams; ++v) {
    std::vector<int64_t> stream;
    for (int64_t k = v; k < perm.numel(); k += streams) {
      const auto& [first, last] = ranges_[static_cast<size_t>(shard[k])];
      for (int64_t i = first; i < last; ++i) stream.push_back(i);
    }
    shuffled.push_back(
        buffer_shuffle(stream, shuffle_buffer_, streams_ ? derive_seed(epoch_seed, static_cast<uint64_t>(v)) : epoch_seed));
  }
  if (streams_ == 0) return std::move(shuffled[0]);
  std::vector<int64_t> order(static_cast<size_t>(streams_ * stream_length_));
  for (int64_t t = 0; t < stream_length_; ++t)
    for (int64_t v = 0; v < streams_; ++v)
      order[static_cast<size_t>(t * streams_ + v)] = shuffled[static_cast<size_t>(v)][static_cast<size_t>(t)];
  return order;
}

}  // namespace difftrain

// WebDataset tar shards as a Dataset (data.dataset = "webdataset"). data.path names the shards:
// a directory (its *.tar files, sorted), a brace pattern (`shards/train-{000000..000127}.tar`), or
// a text file listing one shard per line (relative to the file's directory). A sample is the run
// of consecutive members sharing a key (tar.h split_wds_name); its image is the `png`, `jpg` or
// `jpeg` member, its label the `cls` member or, with data.label_field, that integer field of the
// `json` member.
//
// The shards' headers are read once at open (the data is not: each header's member is skipped),
// which gives every sample's place: the shard, offset and size of its image. Reading then follows
// the shard order: epoch e visits the shards in a permutation of (seed, e), each front to back,
// through a shuffle buffer of data.shuffle_buffer samples (webdataset's `shuffle(n)`), so reads
// stay near-sequential within a shard. That order is a pure function of (seed, epoch), so the
// Loader splits it across ranks as it splits any dataset (N ranks x B see the global batches of
// 1 x N*B), resumes at a saved (epoch, batch) exactly, and does not depend on data.num_workers.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/data.h"

namespace difftrain {

// The shard files data.path names, each checked to exist (FormatError naming the missing one).
std::vector<std::string> resolve_shards(const std::string& spec);

// webdataset's shuffle(n) over [0, n_items) in order: fill a buffer of `buffer` items, then emit a
// random one of them per new item, and drain in random order; buffer 1 keeps the order.
std::vector<int64_t> buffer_shuffle(const std::vector<int64_t>& items, int64_t buffer, uint64_t seed);

class WebDataset : public Dataset {
 public:
  // `jpeg_min_side` > 0 lets JPEGs decode smaller (formats::decode_jpeg; data.jpeg_dct_scaling).
  WebDataset(const std::string& spec, std::string label_field, int64_t shuffle_buffer, BadImagePolicy on_bad_image,
             int64_t jpeg_min_side = 0);
  int64_t size() const override { return static_cast<int64_t>(samples_.size()); }
  Sample get(int64_t index) const override;  // a skipped image is replaced by the next good one
  int64_t label(int64_t index) const override { return samples_.at(static_cast<size_t>(index)).label; }
  int64_t num_classes() const override { return num_classes_; }
  std::string describe() const override;
  std::vector<int64_t> epoch_order(uint64_t seed, int64_t epoch) const override;
  const std::vector<std::string>& shards() const { return shards_; }
  const std::vector<std::string>& left_out() const { return left_out_; }  // "shard: why", found at open
  int64_t skipped() const { return skipped_.load(); }                     // failed to decode since

 private:
  struct Place {
    int32_t shard = 0;
    uint64_t offset = 0, size = 0;  // of the image member
    int64_t label = -1;
    std::string member;  // the image member's name, for errors
  };
  Sample read(const Place& p) const;
  std::vector<std::string> shards_;
  std::vector<Place> samples_;                       // in shard order
  std::vector<std::pair<int64_t, int64_t>> ranges_;  // each shard's samples: [first, last)
  std::vector<std::string> left_out_;
  std::string spec_, label_field_;
  int64_t shuffle_buffer_;
  int64_t num_classes_ = 0;
  BadImagePolicy policy_;
  int64_t jpeg_min_side_;
  uint64_t instance_;  // unique per WebDataset: the key of each thread's open shard (read)
  mutable std::atomic<int64_t> skipped_{0};
};

}  // namespace difftrain

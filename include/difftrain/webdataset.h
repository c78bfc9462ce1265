// WebDataset tar shards as a Dataset (data.dataset = "webdataset"). data.path names the shards:
// a directory (its *.tar files, sorted), a brace pattern (`shards/train-{000000..000127}.tar`), a
// text file listing one shard per line (relative to the file's directory), or a shard index
// (`*.json` in webdataset's wids format, as `difftrain data pack` writes). A sample is the run
// of consecutive members sharing a key (tar.h split_wds_name); its image is the `png`, `jpg` or
// `jpeg` member, its label the `cls` member or, with data.label_field, that integer field of the
// `json` member.
//
// A shard's headers are read once (the data is not: each header's member is skipped), which
// gives each sample's place: the shard, offset and size of its image. Without an index every
// shard is scanned at open; with one, the sample counts come from the index and a shard is
// scanned when first read, so a rank touches only the shards it reads.
//
// Epoch e visits the shards in a permutation of (seed, e), each front to back, through a shuffle
// buffer of data.shuffle_buffer samples (webdataset's `shuffle(n)`), so reads stay near-sequential.
// How ranks share the shards (data.shard_streams):
//  - 0: one stream of all shards; the Loader deals its samples to the ranks in turn, so every
//    rank reads from every shard.
//  - V > 0: the permuted shards are dealt round-robin to V streams, each through its own shuffle
//    buffer, and the epoch interleaves them (item t of stream v at position t*V + v). With a
//    world size N dividing V, the Loader's split gives rank r exactly the streams v = r mod N:
//    each shard is read by one rank per epoch. Every stream is cut to the length of the shortest
//    a stream can get (the floor(K/V) smallest shards' samples, K shards), the same every epoch:
//    with equal shards and V dividing K nothing is dropped, else up to a shard's worth per
//    stream, a different part each epoch (the remainder rule of DistributedSampler's drop_last).
// Either way the order is a pure function of (seed, epoch), so N ranks x B see the global batches
// of 1 x N*B, a Loader resumes at a saved (epoch, batch) exactly, and data.num_workers (decode
// threads, which read whichever shards their batches need) changes nothing.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "difftrain/data.h"

namespace difftrain {

// The shard files data.path names, each checked to exist (FormatError naming the missing one);
// `counts` the samples of each as a shard index gives them, else empty; num_classes from the
// index, -1 when it does not say.
struct ShardList {
  std::vector<std::string> shards;
  std::vector<int64_t> counts;
  int64_t num_classes = -1;
};
ShardList resolve_shards(const std::string& spec);

// webdataset's shuffle(n) over [0, n_items) in order: fill a buffer of `buffer` items, then emit a
// random one of them per new item, and drain in random order; buffer 1 keeps the order.
std::vector<int64_t> buffer_shuffle(const std::vector<int64_t>& items, int64_t buffer, uint64_t seed);

class WebDataset : public Dataset {
 public:
  // `jpeg_min_side` > 0 lets JPEGs decode smaller (formats::decode_jpeg; data.jpeg_dct_scaling).
  WebDataset(const std::string& spec, std::string label_field, int64_t shuffle_buffer, BadImagePolicy on_bad_image,
             int64_t jpeg_min_side = 0, int64_t shard_streams = 0);
  int64_t size() const override { return static_cast<int64_t>(samples_.size()); }
  Sample get(int64_t index) const override;  // a skipped image is replaced by the next good one
  int64_t label(int64_t index) const override;
  int64_t num_classes() const override { return num_classes_; }
  std::string describe() const override;
  std::vector<int64_t> epoch_order(uint64_t seed, int64_t epoch) const override;
  int64_t epoch_size() const override;
  int64_t world_size_divides() const override { return streams_; }
  const std::vector<std::string>& shards() const { return shards_; }
  std::vector<std::string> left_out() const;                        // "shard: why", damaged shards found so far
  int64_t skipped() const { return skipped_.load(); }               // failed to decode since
  int64_t shards_scanned() const { return scanned_count_.load(); }  // headers read (all at open without an index)

 private:
  struct Place {
    int32_t shard = 0;
    uint64_t offset = 0, size = 0;  // of the image member; size 0: not there (a damaged shard cut short)
    int64_t label = -1;
    std::string member;  // the image member's name, for errors
  };
  std::vector<Place> scan(size_t shard, int64_t& without_image) const;  // its headers, in order
  void ensure_scanned(size_t shard) const;                              // an indexed shard, once
  size_t shard_of(int64_t index) const;
  Sample read(const Place& p) const;
  std::vector<std::string> shards_;
  mutable std::vector<Place> samples_;               // in shard order; an indexed shard's filled when scanned
  std::vector<std::pair<int64_t, int64_t>> ranges_;  // each shard's samples: [first, last)
  std::unique_ptr<std::once_flag[]> scanned_;        // indexed: per shard
  bool indexed_ = false;
  mutable std::mutex left_out_mutex_;
  mutable std::vector<std::string> left_out_;
  std::string spec_, label_field_;
  int64_t shuffle_buffer_;
  int64_t streams_, stream_length_ = 0;
  int64_t num_classes_ = 0;
  BadImagePolicy policy_;
  int64_t jpeg_min_side_;
  uint64_t instance_;  // unique per WebDataset: the key of each thread's open shards (read)
  mutable std::atomic<int64_t> skipped_{0}, scanned_count_{0};
};

}  // namespace difftrain

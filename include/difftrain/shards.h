// WebDataset shards written from any Dataset (`difftrain data pack`): tar files of `KEY.png`
// (the image, lossless) and `KEY.cls` (the label in decimal, when there is one), KEY the item's
// index in the dataset, zero-padded; `shard_size` samples per shard, in the dataset's order
// (shuffling is the loader's job). Python's webdataset reads them as it reads its own.
// Beside them, `<prefix>-index.json`, a shard index in webdataset's wids format
// ({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": [{"url", "nsamples"}]},
// urls relative to the index) plus "num_classes": data.path may name it, so that a run knows
// every shard's sample count without reading the shards (webdataset.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace difftrain {

class Dataset;  // data.h

struct PackOptions {
  std::string out_dir;
  std::string prefix = "shard";  // shard files are <prefix>-000000.tar, -000001.tar, ...
  int64_t shard_size = 1000;     // samples per shard (the last holds the rest)
  int64_t limit = 0;             // only the first `limit` items; 0 = all
};

struct PackReport {
  std::vector<std::string> shards;  // the files written, in order
  std::string index;                // the shard index written after them
  int64_t samples = 0;
  uint64_t bytes = 0;
};

// Each shard is written to a temporary name and renamed when complete, so a shard that exists is whole.
PackReport pack_shards(const Dataset& dataset, const PackOptions& opts);

}  // namespace difftrain

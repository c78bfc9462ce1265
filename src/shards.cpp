#include "difftrain/shards.h"

#include <filesystem>
#include <fstream>

#include <ATen/core/Tensor.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "difftrain/data.h"
#include "difftrain/errors.h"
#include "difftrain/io.h"
#include "difftrain/tar.h"

namespace difftrain {

namespace fs = std::filesystem;

PackReport pack_shards(const Dataset& dataset, const PackOptions& opts) {
  if (opts.shard_size < 1) throw UsageError(fmt::format("--shard-size {}: must be at least 1", opts.shard_size));
  if (opts.limit < 0) throw UsageError(fmt::format("--limit {}: must be 0 (all) or more", opts.limit));
  if (opts.prefix.empty() || opts.prefix.find('/') != std::string::npos)
    throw UsageError(fmt::format("--prefix '{}': a non-empty file name prefix without '/'", opts.prefix));
  std::error_code ec;
  fs::create_directories(opts.out_dir, ec);
  if (ec) throw RuntimeError(fmt::format("--out {}: cannot create the directory ({})", opts.out_dir, ec.message()));
  const int64_t total = opts.limit > 0 ? std::min(opts.limit, dataset.size()) : dataset.size();
  const int digits = std::max<int>(6, static_cast<int>(std::to_string(std::max<int64_t>(total - 1, 0)).size()));
  PackReport report;
  nlohmann::ordered_json shardlist = nlohmann::ordered_json::array();
  for (int64_t first = 0, shard = 0; first < total; first += opts.shard_size, ++shard) {
    const fs::path path = fs::path(opts.out_dir) / fmt::format("{}-{:06d}.tar", opts.prefix, shard);
    const fs::path tmp = fs::path(path.string() + ".tmp");
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) throw RuntimeError(fmt::format("{}: cannot write", tmp.string()));
      formats::TarWriter tar(out, path.string());
      for (int64_t i = first; i < std::min(total, first + opts.shard_size); ++i) {
        const Sample s = dataset.get(i);
        const at::Tensor image = s.image.contiguous();  // (C, H, W) uint8
        const auto png = formats::encode_png(image.data_ptr<uint8_t>(), image.size(0), image.size(1), image.size(2));
        const std::string key = fmt::format("{:0{}d}", i, digits);
        tar.add(key + ".png", png.data(), png.size());
        if (s.label >= 0) {
          const std::string cls = std::to_string(s.label);
          tar.add(key + ".cls", reinterpret_cast<const uint8_t*>(cls.data()), cls.size());
        }
        ++report.samples;
      }
      tar.finish();
    }
    fsync_path(tmp, /*directory=*/false);
    fs::rename(tmp, path, ec);
    if (ec) throw RuntimeError(fmt::format("{}: cannot rename into place ({})", path.string(), ec.message()));
    fsync_path(opts.out_dir, /*directory=*/true);
    report.bytes += fs::file_size(path);
    report.shards.push_back(path.string());
    shardlist.push_back({{"url", path.filename().string()}, {"nsamples", std::min(total, first + opts.shard_size) - first}});
  }
  // Last, so that an index names only whole shards.
  const nlohmann::ordered_json index = {{"__kind__", "wids-shard-index-v1"},
                                        {"wids_version", 1},
                                        {"name", opts.prefix},
                                        {"num_classes", dataset.num_classes()},
                                        {"shardlist", shardlist}};
  report.index = (fs::path(opts.out_dir) / (opts.prefix + "-index.json")).string();
  write_file_atomic(report.index, index.dump(1) + "\n");
  return report;
}

}  // namespace difftrain

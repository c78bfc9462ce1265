// Loader throughput, batches/s and images/s after warm-up, for each mode on one config's data.
//   bench_loader [CONFIG] [BATCHES] [KEY=VALUE ...]   (defaults: configs/quickstart.json, 200;
//   overrides as difftrain's --set, e.g. data.dataset=webdataset data.path=shards)
// Prints one JSON object per mode (preload only for in-memory datasets); scripts/bench/loader.sh
// adds the PyTorch DataLoader baselines.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include <fmt/format.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/enums.h"

int main(int argc, char** argv) try {
  using namespace difftrain;
  const Config cfg = load_config(argc > 1 ? argv[1] : "configs/quickstart.json",
                                 std::vector<std::string>(argv + std::min(argc, 3), argv + argc));
  const int64_t batches = argc > 2 ? std::stoll(argv[2]) : 200;
  const auto open = std::chrono::steady_clock::now();
  const auto dataset = open_dataset(cfg.data);
  const double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - open).count();
  const bool streamed = cfg.data.dataset == DatasetKind::webdataset || cfg.data.dataset == DatasetKind::image_folder;
  const std::string source = to_string(cfg.data.dataset);
  struct Mode {
    const char* name;
    int64_t workers;
    bool preload;
  };
  for (const Mode& m : {Mode{"workers=0", 0, false}, Mode{"workers=1", 1, false}, Mode{"workers=2", 2, false},
                        Mode{"preload", 0, true}}) {
    if (m.preload && streamed) continue;  // preloading defeats the point of streaming from files
    LoaderOptions o;
    o.batch_size = cfg.train.batch_size;
    o.seed = 0;
    o.num_workers = m.workers;
    o.prefetch = cfg.data.prefetch;
    o.preload = m.preload;
    o.augment = AugmentOptions::from(cfg.data);
    o.augment.random_flip = true;  // measure the full per-sample path
    const auto setup = std::chrono::steady_clock::now();
    Loader loader(dataset, o);
    for (int i = 0; i < 20; ++i) loader.next();  // warm-up
    const auto start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < batches; ++i) loader.next();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double setup_s = std::chrono::duration<double>(start - setup).count();
    std::printf(
        "%s\n",
        fmt::format(
            R"({{"impl": "difftrain", "data": "{}", "mode": "{}", "batch": {}, "batches_per_s": {:.1f}, "images_per_s": {:.0f}, "open_s": {:.2f}, "setup_s": {:.2f}}})",
            source, m.name, o.batch_size, static_cast<double>(batches) / s, static_cast<double>(batches * o.batch_size) / s,
            open_s, setup_s)
            .c_str());
    std::fflush(stdout);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_loader: %s\n", e.what());
  return 2;
}

// JPEG decode throughput, one thread, images/s over a folder of JPEGs held in memory:
// stb_image, libjpeg-turbo at full size, libjpeg-turbo at the DCT-domain scale of resolution R,
// and each followed by difftrain's augment to R x R (resize of the shorter side, center crop).
//   bench_decode DIR R        (scripts/bench/decode.sh makes DIR and runs the Python baselines)
// Prints one JSON object per method.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <fmt/format.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/data_formats.h"

int main(int argc, char** argv) try {
  using namespace difftrain;
  if (argc != 3) throw std::runtime_error("usage: bench_decode DIR R");
  const std::string dir = argv[1];
  const int64_t R = std::stoll(argv[2]);
  at::set_num_threads(1);
  std::vector<std::vector<uint8_t>> files;
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".jpg") names.push_back(e.path().string());
  std::sort(names.begin(), names.end());
  size_t bytes = 0;
  for (const auto& n : names) {
    files.push_back(formats::read_file(n));
    bytes += files.back().size();
  }
  if (files.empty()) throw std::runtime_error(dir + ": no .jpg files");
  DataConfig d;
  d.resolution = static_cast<int>(R);
  d.channels = 3;
  const auto aug = AugmentOptions::from(d);
  auto tensor = [](const formats::Image& img) {
    return at::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.channels, img.height, img.width}, at::kByte);
  };
  using Decode = std::function<formats::Image(const std::vector<uint8_t>&)>;
  const Decode stb = [](const auto& f) { return formats::decode_stb(f.data(), f.size(), "x"); };
  const Decode full = [](const auto& f) { return formats::decode_jpeg(f.data(), f.size(), "x", 0); };
  const Decode scaled = [R](const auto& f) { return formats::decode_jpeg(f.data(), f.size(), "x", R); };
  struct Method {
    std::string name;
    Decode decode;
    bool resize;
  };
  const std::vector<Method> methods = {{"stb_image", stb, false},
                                       {"libjpeg-turbo full size", full, false},
                                       {"libjpeg-turbo DCT-scaled", scaled, false},
                                       {"stb_image + augment", stb, true},
                                       {"libjpeg-turbo full size + augment", full, true},
                                       {"libjpeg-turbo DCT-scaled + augment", scaled, true}};
  for (const auto& m : methods) {
    int64_t done = 0;
    const auto start = std::chrono::steady_clock::now();
    double s = 0;
    while (s < 2.0 || done < static_cast<int64_t>(files.size())) {  // at least 2 s and one pass
      const auto img = m.decode(files[static_cast<size_t>(done) % files.size()]);
      if (m.resize) augment(tensor(img), aug, static_cast<uint64_t>(done));
      ++done;
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    std::printf("%s\n",
                fmt::format(R"({{"impl": "difftrain", "method": "{}", "files": {}, "mean_bytes": {}, "images_per_s": {:.1f}}})",
                            m.name, files.size(), bytes / files.size(), static_cast<double>(done) / s)
                    .c_str());
    std::fflush(stdout);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_decode: %s\n", e.what());
  return 2;
}

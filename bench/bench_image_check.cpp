// The cost of checking an image folder at open (formats::check_image_file on every file), against
// listing the folder and against decoding every file, in one run on the same files.
//   bench_image_check DIR
// Prints one JSON object per phase; scripts/bench/image_check.sh makes the folder.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "difftrain/data_formats.h"

namespace fs = std::filesystem;
using namespace difftrain::formats;

int main(int argc, char** argv) try {
  if (argc != 2) {
    std::fprintf(stderr, "usage: bench_image_check DIR\n");
    return 1;
  }
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto secs = [](auto d) { return std::chrono::duration<double>(d).count(); };
  auto report = [](const char* phase, size_t files, size_t bad, double s, double list_s) {
    std::printf(
        "{\"phase\": \"%s\", \"files\": %zu, \"bad\": %zu, \"seconds\": %.3f, \"us_per_file\": %.1f, \"vs_list\": %.2f}\n", phase,
        files, bad, s, 1e6 * s / static_cast<double>(std::max<size_t>(files, 1)), s / list_s);
    std::fflush(stdout);
  };
  // 1. List: what ImageFolderDataset did before the check (directory walk, extension filter, sort).
  auto t = now();
  std::vector<std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(argv[1]))
    if (e.is_regular_file() && e.path().extension() == ".png") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  const double list_s = secs(now() - t);
  report("list", files.size(), 0, list_s, list_s);
  // 2. Check every header (what ImageFolderDataset now adds), twice: the second pass shows the spread.
  for (const char* phase : {"check", "check_again"}) {
    t = now();
    size_t bad = 0;
    for (const auto& f : files) {
      try {
        check_image_file(f);
      } catch (const FormatError&) {
        ++bad;
      }
    }
    report(phase, files.size(), bad, secs(now() - t), list_s);
  }
  // 3. Read and decode every file (one epoch of decoding, without augmentation).
  t = now();
  size_t bad = 0;
  for (const auto& f : files) {
    try {
      const auto bytes = read_file(f, size_t{1} << 28);
      decode_image(bytes.data(), bytes.size(), f);
    } catch (const FormatError&) {
      ++bad;
    }
  }
  report("decode", files.size(), bad, secs(now() - t), list_s);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_image_check: %s\n", e.what());
  return 2;
}

// libFuzzer targets for every parser that reads untrusted bytes (scripts/fuzz.sh builds them with
// clang, ASan and UBSan, and runs each with its seed corpus fuzz/corpus/<target> and dictionary
// fuzz/dict/<target>.dict). DIFFTRAIN_FUZZ_TARGET picks the target. The parser's own error type
// is an expected outcome; a crash, a sanitizer report, a hang or any other exception is a finding.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "difftrain/checkpoint_manifest.h"
#include "difftrain/config.h"
#include "difftrain/data_formats.h"
#include "difftrain/safetensors_header.h"
#include "difftrain/tar.h"

namespace {

namespace formats = difftrain::formats;
using Bytes = std::vector<uint8_t>;

void read_tar(const Bytes& bytes) {  // every member, as the WebDataset reader does
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  formats::TarReader reader(in, "fuzz", size_t{1} << 24);
  formats::TarMember m;
  for (int i = 0; reader.next(m); ++i) {
    formats::split_wds_name(m.name);
    if (i % 2 == 0) reader.read_data();  // every other member skipped unread
  }
}

// load_config reads a file (and names it in its errors), so the bytes go through one in /dev/shm.
void load_config(const Bytes& bytes) {
  static const std::string path = [] {
    const char* dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    return std::string(dir) + "/difftrain-fuzz-config-" + std::to_string(getpid()) + ".json";
  }();
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  try {
    difftrain::load_config(path);
  } catch (const difftrain::ConfigError&) {}
}

struct Target {
  const char* name;
  void (*run)(const Bytes&);
};

const Target kTargets[] = {
    {"idx_images", [](const Bytes& b) { formats::parse_idx_images(b, "fuzz"); }},
    {"idx_labels", [](const Bytes& b) { formats::parse_idx_labels(b, "fuzz"); }},
    {"cifar10", [](const Bytes& b) { formats::parse_cifar10(b, "fuzz"); }},
    {"gzip_idx", [](const Bytes& b) { formats::parse_idx_images(formats::gunzip(b, "fuzz", size_t{1} << 24), "fuzz"); }},
    {"image", [](const Bytes& b) { formats::decode_image(b.data(), b.size(), "fuzz"); }},            // PNG or JPEG
    {"jpeg_scaled", [](const Bytes& b) { formats::decode_image(b.data(), b.size(), "fuzz", 16); }},  // at a DCT scale
    {"tar", read_tar},
    {"safetensors",
     [](const Bytes& b) {
       try {
         difftrain::parse_safetensors_header({reinterpret_cast<const char*>(b.data()), b.size()}, "fuzz");
       } catch (const difftrain::RuntimeError&) {}
     }},
    {"manifest",
     [](const Bytes& b) {
       try {
         difftrain::parse_checkpoint_manifest({reinterpret_cast<const char*>(b.data()), b.size()});
       } catch (const difftrain::RuntimeError&) {}
     }},
    {"config", load_config},
};

const Target* target = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* name = std::getenv("DIFFTRAIN_FUZZ_TARGET");
  for (const auto& t : kTargets)
    if (name && std::strcmp(name, t.name) == 0) target = &t;
  if (!target) {
    std::fprintf(stderr, "DIFFTRAIN_FUZZ_TARGET must name a target:");
    for (const auto& t : kTargets) std::fprintf(stderr, " %s", t.name);
    std::fprintf(stderr, "\n");
    std::exit(2);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Bytes bytes(data, data + size);
  try {
    target->run(bytes);
  } catch (const formats::FormatError&) {}
  return 0;
}

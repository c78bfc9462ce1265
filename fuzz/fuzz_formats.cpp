// libFuzzer target for the dataset formats and the tar reader (scripts/fuzz.sh builds and runs it with clang).
// The first input byte picks the parser; the rest is the file. Any FormatError is an expected
// outcome; a crash, a sanitizer report, a hang or another exception is a finding.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "difftrain/data_formats.h"
#include "difftrain/tar.h"

namespace {

void read_tar(const std::vector<uint8_t>& bytes) {  // every member, as a WebDataset reader does
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  difftrain::formats::TarReader reader(in, "fuzz", size_t{1} << 24);
  difftrain::formats::TarMember m;
  for (int i = 0; reader.next(m); ++i) {
    difftrain::formats::split_wds_name(m.name);
    if (i % 2 == 0) reader.read_data();  // every other member skipped unread
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::vector<uint8_t> bytes(data + 1, data + size);
  try {
    switch (data[0] % 7) {
      case 0: difftrain::formats::parse_idx_images(bytes, "fuzz"); break;
      case 1: difftrain::formats::parse_idx_labels(bytes, "fuzz"); break;
      case 2: difftrain::formats::parse_cifar10(bytes, "fuzz"); break;
      case 3: difftrain::formats::decode_image(bytes.data(), bytes.size(), "fuzz"); break;
      case 4: difftrain::formats::parse_idx_images(difftrain::formats::gunzip(bytes, "fuzz", size_t{1} << 24), "fuzz"); break;
      case 5: read_tar(bytes); break;
      case 6: difftrain::formats::decode_image(bytes.data(), bytes.size(), "fuzz", 16); break;  // JPEG at a DCT scale
    }
  } catch (const difftrain::formats::FormatError&) {
  }
  return 0;
}

// Tar archives as WebDataset shards use them, read as a stream and written, with no LibTorch.
// Reads POSIX ustar and pax (Python's tarfile default: `x` records give long names and sizes;
// `g` records are ignored) and GNU long names (`L`); writes ustar, with a pax record for a name
// that does not fit. Every malformed input is a FormatError naming the archive and the byte
// offset; the fuzz target (fuzz/fuzz_formats.cpp) checks that nothing crashes on bad bytes.
#pragma once

#include <cstdint>
#include <istream>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "difftrain/data_formats.h"

namespace difftrain::formats {

struct TarMember {
  std::string name;     // the path inside the archive
  uint64_t size = 0;    // bytes of data
  uint64_t offset = 0;  // where the data starts in the archive
};

// Regular files one after another; directories, links and other entries are passed over.
class TarReader {
 public:
  // `name` is the archive's name for errors. A member larger than `max_member` is an error.
  TarReader(std::istream& in, std::string name, uint64_t max_member = uint64_t{1} << 32);
  // The next regular file's header, or false at the end of the archive (two zero blocks, or the
  // end of the stream on a block boundary). The previous member's data is skipped if unread.
  bool next(TarMember& member);
  // The current member's data; once per member.
  std::vector<uint8_t> read_data();
  uint64_t position() const { return pos_; }

 private:
  void read_exact(uint8_t* out, uint64_t n, const char* what);
  void skip(uint64_t n);
  std::vector<uint8_t> read_payload(uint64_t size, const char* what);  // a pax or GNU record, padded
  [[noreturn]] void fail(const std::string& what, uint64_t at) const;

  std::istream& in_;
  std::string name_;
  uint64_t max_member_;
  uint64_t pos_ = 0;
  uint64_t data_left_ = 0, padding_ = 0;  // of the current member
  bool data_read_ = true;
};

// The whole of a tar file, member by member (tests and small archives).
std::vector<std::pair<TarMember, std::vector<uint8_t>>> read_tar_file(const std::string& path);

// Writes members in order; finish() ends the archive with its two zero blocks.
class TarWriter {
 public:
  TarWriter(std::ostream& out, std::string name);
  void add(const std::string& member_name, const uint8_t* data, size_t size);
  void finish();

 private:
  void write_header(const std::string& name, uint64_t size, char type);
  void write_padded(const uint8_t* data, size_t size);
  std::ostream& out_;
  std::string name_;
};

// WebDataset's grouping: a member `dir/abc.def.png` has key `dir/abc` and extension `def.png`
// (up to the first dot of the last path component); consecutive members with one key are one sample.
struct WdsName {
  std::string key, extension;
};
WdsName split_wds_name(const std::string& member_name);

}  // namespace difftrain::formats

// The header of a safetensors file (the format: safetensors.h), parsed and checked without
// LibTorch, so that scripts/fuzz.sh fuzzes exactly what load_safetensors runs on untrusted bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace difftrain {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the start of the data
};

struct SafetensorsHeader {
  std::map<std::string, std::string> metadata;  // __metadata__
  std::vector<SafetensorsEntry> entries;        // in data order
  uint64_t data_start = 0;                      // 8 + header length: where the data begins in the file
};

// Bytes per element of a dtype name; 0 for a name the reader does not support.
size_t safetensors_dtype_size(std::string_view dtype);

// Parses and checks a whole file's bytes: the header length against the file (and at most 100 MiB),
// the JSON, each entry's dtype, shape (sides >= 0, at most 2^48 elements) and data_offsets (inside
// the data, and dtype size x elements long), and that the entries cover the data without overlaps
// or gaps. A RuntimeError "<file>: not a valid safetensors file: <what>" names the tensor.
SafetensorsHeader parse_safetensors_header(std::string_view bytes, const std::string& file);

}  // namespace difftrain

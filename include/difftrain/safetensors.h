// The safetensors format (huggingface/safetensors, docs "Format"): an 8-byte little-endian
// header length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]},
// "__metadata__": {str: str}}, then the raw little-endian tensor bytes. Offsets are relative to
// the end of the header; the header is padded with spaces so the data starts 8-byte aligned.
// Used for checkpoints and for export to diffusers.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "difftrain/named_tensors.h"

namespace difftrain {

// The file's bytes: tensors in the given order, so the same input gives the same bytes.
// Supported dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata = {});
// Writes the file (not atomically: checkpoints write into a directory that is renamed whole).
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  NamedTensors tensors;  // CPU tensors, in file order
  std::map<std::string, std::string> metadata;
  std::map<std::string, at::Tensor> by_name() const;
};
// Reads and checks a file: header bounds, JSON, dtypes, shapes against offsets, overlaps and
// gaps. Every problem is a RuntimeError naming the file and the tensor.
SafetensorsFile load_safetensors(const std::filesystem::path& path);

}  // namespace difftrain

#include "difftrain/safetensors_header.h"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "difftrain/errors.h"

namespace difftrain {

size_t safetensors_dtype_size(std::string_view dtype) {
  static constexpr std::pair<std::string_view, size_t> kSizes[] = {{"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
                                                                   {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  for (const auto& [name, size] : kSizes)
    if (name == dtype) return size;
  return 0;
}

SafetensorsHeader parse_safetensors_header(std::string_view bytes, const std::string& file) {
  auto bad = [&](const std::string& what) { return RuntimeError(file + ": not a valid safetensors file: " + what); };
  if (bytes.size() < 8) throw bad("shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);  // little-endian, as the host (safetensors.cpp asserts it)
  if (n > bytes.size() - 8 || n > (uint64_t{100} << 20)) throw bad("header length " + std::to_string(n) + " exceeds the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, n));
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  SafetensorsHeader out;
  out.data_start = 8 + n;
  const uint64_t data_size = bytes.size() - out.data_start;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw bad("__metadata__." + k + " is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    SafetensorsEntry e;
    e.name = name;
    try {
      e.dtype = entry.at("dtype").get<std::string>();
      // Integers only: converting a JSON float such as 3e20 to an integer is undefined behaviour
      // (UBSan found it by fuzzing this parser).
      auto integers = [](const nlohmann::json& j) {
        return j.is_array() && std::all_of(j.begin(), j.end(), [](const auto& v) { return v.is_number_integer(); });
      };
      if (!integers(entry.at("shape"))) throw bad("tensor " + name + ": shape is not a list of integers");
      if (!integers(entry.at("data_offsets"))) throw bad("tensor " + name + ": data_offsets is not a list of integers");
      e.shape = entry.at("shape").get<std::vector<int64_t>>();
      for (const auto& v : entry.at("data_offsets"))
        if (!v.is_number_unsigned()) throw bad("tensor " + name + " has a negative data offset");
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size)
        throw bad("tensor " + name + " has data_offsets outside the " + std::to_string(data_size) + " data bytes");
      e.begin = offsets[0];
      e.end = offsets[1];
    } catch (const nlohmann::json::exception& ex) {
      throw bad("tensor " + name + ": " + ex.what());
    }
    const size_t element = safetensors_dtype_size(e.dtype);
    if (element == 0) throw bad("tensor " + name + " has unsupported dtype " + e.dtype);
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      if (d < 0 || (d > 0 && numel > (uint64_t{1} << 48) / static_cast<uint64_t>(d)))
        throw bad("tensor " + name + " has a bad shape");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * element != e.end - e.begin)  // numel <= 2^48, element <= 8: no overflow
      throw bad("tensor " + name + ": shape and dtype need " + std::to_string(numel * element) + " bytes, data_offsets give " +
                std::to_string(e.end - e.begin));
    out.entries.push_back(std::move(e));
  }
  // Into data order (the JSON object was read sorted by name); the data must be covered exactly.
  std::stable_sort(out.entries.begin(), out.entries.end(),
                   [](const auto& a, const auto& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t end = 0;
  for (const auto& e : out.entries) {
    if (e.begin != end) throw bad(e.begin < end ? "tensor data overlap" : "gap between tensor data");
    end = e.end;
  }
  if (end != data_size) throw bad("bytes after the last tensor");
  return out;
}

}  // namespace difftrain

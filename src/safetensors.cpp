#include "difftrain/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <ATen/ops/empty.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "difftrain/errors.h"
#include "difftrain/io.h"

namespace difftrain {

namespace {

const std::vector<std::pair<at::ScalarType, std::string>>& dtype_names() {
  static const std::vector<std::pair<at::ScalarType, std::string>> names = {
      {at::kDouble, "F64"}, {at::kFloat, "F32"}, {at::kHalf, "F16"}, {at::kBFloat16, "BF16"}, {at::kLong, "I64"},
      {at::kInt, "I32"},    {at::kShort, "I16"}, {at::kChar, "I8"},  {at::kByte, "U8"},       {at::kBool, "BOOL"}};
  return names;
}

std::string dtype_name(at::ScalarType t, const std::string& tensor) {
  for (const auto& [type, name] : dtype_names())
    if (type == t) return name;
  throw RuntimeError(fmt::format("safetensors: tensor {} has dtype {}, which the format cannot hold", tensor,
                                 c10::toString(t)));
}

}  // namespace

std::map<std::string, at::Tensor> SafetensorsFile::by_name() const { return {tensors.begin(), tensors.end()}; }

std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  static_assert(std::endian::native == std::endian::little, "safetensors is little-endian; this writer assumes the host is");
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(name != "__metadata__" && !header.contains(name), "safetensors: duplicate or reserved tensor name ", name);
    auto c = t.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(c.nbytes());
    header[name] = {{"dtype", dtype_name(c.scalar_type(), name)}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(c));
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& c : data) out.append(static_cast<const char*>(c.const_data_ptr()), c.nbytes());
  return out;
}

void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const std::string bytes = safetensors_bytes(tensors, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.flush();
  if (!out) throw RuntimeError(fmt::format("cannot write {}: {}", path.string(), std::strerror(errno)));
}

SafetensorsFile load_safetensors(const std::filesystem::path& path) {
  const std::string file = path.string();
  const std::string bytes = read_text(path);
  auto bad = [&](const std::string& what) { return RuntimeError(fmt::format("{}: not a valid safetensors file: {}", file, what)); };
  if (bytes.size() < 8) throw bad("shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  if (n > bytes.size() - 8 || n > (uint64_t{100} << 20)) throw bad(fmt::format("header length {} exceeds the file", n));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  } catch (const nlohmann::json::exception& e) {
    throw bad(std::string("header is not JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  const uint64_t data_size = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;

  SafetensorsFile out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw bad("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) throw bad(fmt::format("__metadata__.{} is not a string", k));
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    try {
      const auto dtype_str = entry.at("dtype").get<std::string>();
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      auto it = std::find_if(dtype_names().begin(), dtype_names().end(), [&](const auto& d) { return d.second == dtype_str; });
      if (it == dtype_names().end()) throw bad(fmt::format("tensor {} has unsupported dtype {}", name, dtype_str));
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size)
        throw bad(fmt::format("tensor {} has data_offsets outside the {} data bytes", name, data_size));
      uint64_t numel = 1;
      for (int64_t d : shape) {
        if (d < 0 || (d > 0 && numel > (uint64_t{1} << 48) / static_cast<uint64_t>(d))) throw bad(fmt::format("tensor {} has a bad shape", name));
        numel *= static_cast<uint64_t>(d);
      }
      auto t = at::empty(shape, at::TensorOptions().dtype(it->first));
      if (static_cast<uint64_t>(t.nbytes()) != offsets[1] - offsets[0])
        throw bad(fmt::format("tensor {}: shape and dtype need {} bytes, data_offsets give {}", name, t.nbytes(),
                              offsets[1] - offsets[0]));
      std::memcpy(t.mutable_data_ptr(), data + offsets[0], t.nbytes());
      ranges.emplace_back(offsets[0], offsets[1]);
      out.tensors.emplace_back(name, std::move(t));
    } catch (const nlohmann::json::exception& e) {
      throw bad(fmt::format("tensor {}: {}", name, e.what()));
    }
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t end = 0;
  for (const auto& [b, e] : ranges) {
    if (b != end) throw bad(b < end ? "tensor data overlap" : "gap between tensor data");
    end = e;
  }
  if (end != data_size) throw bad("bytes after the last tensor");
  // Back into the writer's order (the JSON object was read sorted by name).
  std::sort(out.tensors.begin(), out.tensors.end(), [&](const auto& a, const auto& b) {
    return header[a.first]["data_offsets"][0].template get<uint64_t>() < header[b.first]["data_offsets"][0].template get<uint64_t>();
  });
  return out;
}

}  // namespace difftrain

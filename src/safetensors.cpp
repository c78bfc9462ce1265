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
#include "difftrain/safetensors_header.h"

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
  const std::string bytes = read_text(path);
  const SafetensorsHeader header = parse_safetensors_header(bytes, path.string());
  SafetensorsFile out;
  out.metadata = header.metadata;
  for (const auto& e : header.entries) {
    const auto type =
        std::find_if(dtype_names().begin(), dtype_names().end(), [&](const auto& d) { return d.second == e.dtype; });
    auto t = at::empty(e.shape, at::TensorOptions().dtype(type->first));  // parse_safetensors_header checked dtype and size
    if (e.end > e.begin) std::memcpy(t.mutable_data_ptr(), bytes.data() + header.data_start + e.begin, e.end - e.begin);
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

}  // namespace difftrain

#include "difftrain/data_formats.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>  // declarations only: Debian's libstb holds the implementation

namespace difftrain::formats {

namespace {

std::string at_offset(const std::string& name, size_t offset) { return name + " (offset " + std::to_string(offset) + ")"; }

uint32_t be32(const std::vector<uint8_t>& b, size_t off) {
  return (uint32_t{b[off]} << 24) | (uint32_t{b[off + 1]} << 16) | (uint32_t{b[off + 2]} << 8) | uint32_t{b[off + 3]};
}

// Parses the IDX header; returns the dimension sizes and checks the data length.
std::vector<int64_t> idx_header(const std::vector<uint8_t>& b, const std::string& name, uint32_t want_dims) {
  if (b.size() < 4) throw FormatError(name + ": not an IDX file (" + std::to_string(b.size()) + " bytes, shorter than the header)");
  if (b[0] != 0 || b[1] != 0)
    throw FormatError(at_offset(name, 0) + ": not an IDX file (magic must start with two zero bytes)");
  if (b[2] != 0x08)
    throw FormatError(at_offset(name, 2) + ": IDX data type byte " + std::to_string(b[2]) + " is not supported (only 8, uint8)");
  if (b[3] != want_dims)
    throw FormatError(at_offset(name, 3) + ": IDX file has " + std::to_string(b[3]) + " dimensions, expected " +
                      std::to_string(want_dims) + (want_dims == 3 ? " (images)" : " (labels)"));
  const size_t header = 4 + 4 * size_t{want_dims};
  if (b.size() < header) throw FormatError(at_offset(name, b.size()) + ": truncated IDX header");
  std::vector<int64_t> dims;
  uint64_t total = 1;
  for (uint32_t d = 0; d < want_dims; ++d) {
    const uint32_t n = be32(b, 4 + 4 * size_t{d});
    dims.push_back(n);
    if (n != 0 && total > (uint64_t{1} << 40) / n)  // checked before multiplying, so it cannot wrap
      throw FormatError(at_offset(name, 4 + 4 * size_t{d}) + ": IDX sizes are implausibly large");
    total *= n;
  }
  if (b.size() - header != total)
    throw FormatError(name + ": IDX header promises " + std::to_string(total) + " data bytes but the file has " +
                      std::to_string(b.size() - header) + (b.size() - header < total ? " (truncated)" : " (trailing bytes)"));
  return dims;
}

}  // namespace

std::vector<uint8_t> gunzip(const std::vector<uint8_t>& bytes, const std::string& name, size_t max_bytes) {
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) throw FormatError(name + ": zlib failed to initialise");
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&zs, inflateEnd);
  zs.next_in = const_cast<Bytef*>(bytes.data());
  zs.avail_in = static_cast<uInt>(bytes.size());
  std::vector<uint8_t> out;
  uint8_t chunk[1 << 16];
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    zs.next_out = chunk;
    zs.avail_out = sizeof chunk;
    rc = inflate(&zs, Z_NO_FLUSH);
    if (rc != Z_OK && rc != Z_STREAM_END) {
      const std::string why = rc == Z_BUF_ERROR ? "truncated gzip data" : (zs.msg ? zs.msg : "corrupt gzip data");
      throw FormatError(at_offset(name, zs.total_in) + ": " + why);
    }
    out.insert(out.end(), chunk, chunk + (sizeof chunk - zs.avail_out));
    if (out.size() > max_bytes) throw FormatError(name + ": decompresses to more than " + std::to_string(max_bytes) + " bytes");
  }
  return out;
}

std::vector<uint8_t> read_file(const std::string& path, size_t max_bytes) {
  std::error_code ec;
  const auto on_disk = std::filesystem::file_size(path, ec);
  if (!ec && on_disk > max_bytes)
    throw FormatError(path + ": " + std::to_string(on_disk) + " bytes, more than the " + std::to_string(max_bytes) + " allowed");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
  if (in.bad()) throw FormatError(path + ": read error");
  if (bytes.size() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b) return gunzip(bytes, path, max_bytes);
  return bytes;
}

ImageArray parse_idx_images(const std::vector<uint8_t>& bytes, const std::string& name) {
  const auto dims = idx_header(bytes, name, 3);
  ImageArray a;
  a.count = dims[0];
  a.channels = 1;
  a.height = dims[1];
  a.width = dims[2];
  if (a.count > 0 && (a.height == 0 || a.width == 0)) throw FormatError(name + ": IDX images of size 0");
  a.pixels.assign(bytes.begin() + 16, bytes.end());
  return a;
}

std::vector<int64_t> parse_idx_labels(const std::vector<uint8_t>& bytes, const std::string& name) {
  idx_header(bytes, name, 1);
  return std::vector<int64_t>(bytes.begin() + 8, bytes.end());
}

ImageArray parse_cifar10(const std::vector<uint8_t>& bytes, const std::string& name) {
  constexpr size_t kRecord = 1 + 3 * 32 * 32;
  if (bytes.empty()) throw FormatError(name + ": empty CIFAR-10 batch");
  if (bytes.size() % kRecord != 0)
    throw FormatError(name + ": " + std::to_string(bytes.size()) + " bytes is not a whole number of 3073-byte CIFAR-10 records (" +
                      std::to_string(bytes.size() / kRecord) + " records and " + std::to_string(bytes.size() % kRecord) +
                      " bytes: truncated or not CIFAR-10)");
  ImageArray a;
  a.count = static_cast<int64_t>(bytes.size() / kRecord);
  a.channels = 3;
  a.height = a.width = 32;
  a.pixels.reserve(static_cast<size_t>(a.count) * (kRecord - 1));
  for (int64_t i = 0; i < a.count; ++i) {
    const size_t off = static_cast<size_t>(i) * kRecord;
    if (bytes[off] > 9)
      throw FormatError(at_offset(name, off) + ": record " + std::to_string(i) + " has label " + std::to_string(bytes[off]) +
                        ", CIFAR-10 labels are 0..9");
    a.labels.push_back(bytes[off]);
    a.pixels.insert(a.pixels.end(), bytes.begin() + static_cast<std::ptrdiff_t>(off + 1),
                    bytes.begin() + static_cast<std::ptrdiff_t>(off + kRecord));
  }
  return a;
}

Image decode_image(const uint8_t* data, size_t size, const std::string& name) {
  if (size == 0 || size >= (size_t{1} << 31)) throw FormatError(name + ": empty or oversized image file");
  // PNG and JPEG only: stb_image also reads formats (TGA, PSD, HDR, ...) whose headers can claim
  // huge images that a few bytes then "fill" (found by fuzzing).
  static const uint8_t kPng[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  const bool png = size >= 8 && std::memcmp(data, kPng, 8) == 0;
  const bool jpeg = size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF;
  if (!png && !jpeg) throw FormatError(name + ": not a PNG or JPEG file");
  int w = 0, h = 0, c = 0;
  if (!stbi_info_from_memory(data, static_cast<int>(size), &w, &h, &c))
    throw FormatError(name + ": cannot decode image (" + stbi_failure_reason() + ")");
  // Real files carry at least a byte per few thousand pixels (deflate peaks near 1032:1).
  const int64_t pixels = static_cast<int64_t>(w) * h;
  if (pixels > (int64_t{1} << 28) || pixels > std::max<int64_t>(int64_t{1} << 22, 4096 * static_cast<int64_t>(size)))
    throw FormatError(name + ": header claims " + std::to_string(w) + "x" + std::to_string(h) + " pixels, too many for a " +
                      std::to_string(size) + "-byte file");
  std::unique_ptr<stbi_uc, void (*)(void*)> px(stbi_load_from_memory(data, static_cast<int>(size), &w, &h, &c, 0), stbi_image_free);
  if (!px) throw FormatError(name + ": cannot decode image (" + stbi_failure_reason() + ")");
  if (std::max(w, h) > 16 * std::min(w, h))  // training images are near square; this bounds the resize
    throw FormatError(name + ": " + std::to_string(w) + "x" + std::to_string(h) + " has an aspect ratio beyond 16:1");
  Image img;
  img.channels = c;
  img.height = h;
  img.width = w;
  img.pixels.resize(static_cast<size_t>(c) * static_cast<size_t>(h) * static_cast<size_t>(w));
  for (int64_t y = 0; y < h; ++y)  // HWC -> CHW
    for (int64_t x = 0; x < w; ++x)
      for (int64_t k = 0; k < c; ++k)
        img.pixels[static_cast<size_t>((k * h + y) * w + x)] = px.get()[(y * w + x) * c + k];
  return img;
}

std::vector<uint8_t> encode_png(const uint8_t* pixels, int64_t channels, int64_t height, int64_t width, PixelLayout layout) {
  constexpr int64_t kMaxPixels = int64_t{1} << 28;  // checked one side at a time, so the product cannot wrap
  if (channels < 1 || channels > 4 || height < 1 || width < 1 || height > kMaxPixels || width > kMaxPixels ||
      height * width > kMaxPixels)
    throw FormatError("encode_png: cannot encode " + std::to_string(channels) + "x" + std::to_string(height) + "x" +
                      std::to_string(width) + " pixels (channels must be 1..4, at least 1x1 and at most 2^28 pixels)");
  const size_t c = static_cast<size_t>(channels), h = static_cast<size_t>(height), w = static_cast<size_t>(width);
  std::vector<uint8_t> hwc;
  if (layout == PixelLayout::kCHW && c > 1) {  // CHW -> HWC, the order PNG rows hold
    hwc.resize(c * h * w);
    for (size_t k = 0; k < c; ++k)
      for (size_t i = 0; i < h * w; ++i) hwc[i * c + k] = pixels[k * h * w + i];
    pixels = hwc.data();
  }
  std::vector<uint8_t> png;
  auto append = [](void* ctx, void* data, int size) {
    auto* out = static_cast<std::vector<uint8_t>*>(ctx);
    out->insert(out->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
  };
  if (!stbi_write_png_to_func(append, &png, static_cast<int>(width), static_cast<int>(height), static_cast<int>(channels), pixels,
                              static_cast<int>(w * c)))
    throw FormatError("encode_png: stb_image_write failed on " + std::to_string(width) + "x" + std::to_string(height) + " pixels");
  return png;
}

}  // namespace difftrain::formats

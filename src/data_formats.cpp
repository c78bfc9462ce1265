#include "difftrain/data_formats.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>

#include <stb/stb_image.h>
#include <stb/stb_image_write.h>  // declarations only: Debian's libstb holds the implementation

namespace difftrain::formats {

bool is_image_file(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

namespace {

std::string at_offset(const std::string& name, size_t offset) { return name + " (offset " + std::to_string(offset) + ")"; }

uint32_t be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint32_t be32(const std::vector<uint8_t>& b, size_t off) { return be32(b.data() + off); }

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

constexpr uint8_t kPngSignature[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
constexpr uint8_t kPngEnd[] = {0, 0, 0, 0, 'I', 'E', 'N', 'D', 0xAE, 0x42, 0x60, 0x82};  // IEND: length 0, type, CRC
constexpr size_t kHeadBytes = size_t{1} << 16;  // check_image_file reads this much from the start ...
constexpr size_t kTailBytes = 1024;             // ... and this much from the end (IEND, perhaps followed by padding)

bool is_png(const uint8_t* d, size_t n) { return n >= 8 && std::memcmp(d, kPngSignature, 8) == 0; }
bool is_jpeg(const uint8_t* d, size_t n) { return n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF; }

// The first bytes of a file that is not an image, as text when they are text, else in hex.
std::string first_bytes(const uint8_t* d, size_t n) {
  n = std::min<size_t>(n, 8);
  if (std::all_of(d, d + n, [](uint8_t b) { return b >= 0x20 && b < 0x7F; })) return "\"" + std::string(d, d + n) + "\"";
  std::string hex;
  for (size_t i = 0; i < n; ++i)
    hex += (i ? " " : "") + std::string{"0123456789abcdef"[d[i] >> 4], "0123456789abcdef"[d[i] & 15]};
  return hex;
}

// stb_image's reason for its last failure, never empty. A PNG chunk of unknown type fails with
// "XXXX PNG chunk not known", built in place from the type's bytes; past the end of a truncated
// file stb reads zeros, so the message is "" or a fragment such as "IDA".
std::string stb_reason() {
  const char* r = stbi_failure_reason();
  const std::string s = r ? r : "";
  if (s.size() >= 4) return s;
  return "corrupt or cut-short data" + (s.empty() ? std::string(", stb_image gave no reason") : ", stb_image says \"" + s + "\"");
}

// check_image on the parts of a file: `head` its first bytes (all of them, or kHeadBytes), `tail`
// its last ones (at most kTailBytes), `size` its length.
ImageInfo check_parts(const uint8_t* head, size_t head_size, const uint8_t* tail, size_t tail_size, size_t size,
                      const std::string& name) {
  if (size == 0) throw FormatError(name + ": empty file (0 bytes)");
  if (size >= (size_t{1} << 31))
    throw FormatError(name + ": " + std::to_string(size) + " bytes, more than the 2 GiB an image may have");
  // PNG and JPEG only: stb_image also reads formats (TGA, PSD, HDR, ...) whose headers can claim
  // huge images that a few bytes then "fill" (found by fuzzing).
  const bool png = is_png(head, head_size);
  if (!png && !is_jpeg(head, head_size))
    throw FormatError(name + ": not a PNG or JPEG file (it starts with " + first_bytes(head, head_size) + ")");
  int64_t w = 0, h = 0, c = 0;
  if (png) {  // signature, then the IHDR chunk: length 13, "IHDR", width, height, bit depth, colour type, ...
    if (size < 33)
      throw FormatError(name + ": truncated PNG (" + std::to_string(size) + " bytes, shorter than its 33-byte header)");
    if (be32(head + 8) != 13 || std::memcmp(head + 12, "IHDR", 4) != 0)
      throw FormatError(at_offset(name, 8) + ": corrupt PNG (its first chunk is not the 13-byte IHDR header)");
    w = be32(head + 16);
    h = be32(head + 20);
    const int colour = head[25];
    c = colour == 0 ? 1 : colour == 4 ? 2 : colour == 2 || colour == 3 ? 3 : colour == 6 ? 4 : 0;
    if (c == 0)
      throw FormatError(at_offset(name, 25) + ": corrupt PNG (colour type " + std::to_string(colour) + " does not exist)");
  } else {  // markers up to the frame header (SOF)
    int iw = 0, ih = 0, ic = 0;
    if (!stbi_info_from_memory(head, static_cast<int>(head_size), &iw, &ih, &ic))
      throw FormatError(name +
                        ": unreadable JPEG header (no frame header stb_image reads: cut short, corrupt, or an "
                        "unsupported kind such as arithmetic-coded or lossless JPEG)");
    w = iw, h = ih, c = ic;
  }
  if (w == 0 || h == 0) throw FormatError(name + ": header claims " + std::to_string(w) + "x" + std::to_string(h) + " pixels");
  // Real files carry at least a byte per few thousand pixels (deflate peaks near 1032:1).
  // Each side below 2^28 first: two 32-bit sides overflow their int64 product (found by fuzzing).
  const int64_t pixels = w > (int64_t{1} << 28) || h > (int64_t{1} << 28) ? int64_t{1} << 62 : w * h;
  if (pixels > (int64_t{1} << 28) || pixels > std::max<int64_t>(int64_t{1} << 22, 4096 * static_cast<int64_t>(size)))
    throw FormatError(name + ": header claims " + std::to_string(w) + "x" + std::to_string(h) + " pixels, too many for a " +
                      std::to_string(size) + "-byte file");
  if (std::max(w, h) > 16 * std::min(w, h))  // training images are near square; this bounds the resize
    throw FormatError(name + ": " + std::to_string(w) + "x" + std::to_string(h) + " has an aspect ratio beyond 16:1");
  if (png && std::search(tail, tail + tail_size, std::begin(kPngEnd), std::end(kPngEnd)) == tail + tail_size)
    throw FormatError(name + ": truncated PNG (" + std::to_string(size) +
                      " bytes, no IEND chunk at the end: the file was cut short)");
  return {c, h, w};
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

ImageInfo check_image(const uint8_t* data, size_t size, const std::string& name) {
  const size_t tail = std::min(size, kTailBytes);
  return check_parts(data, size, data + size - tail, tail, size, name);
}

ImageInfo check_image_file(const std::string& path) {
  struct File {
    int fd;
    ~File() {
      if (fd >= 0) ::close(fd);
    }
  } file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  const int fd = file.fd;
  if (fd < 0) throw FormatError(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw FormatError(path + ": cannot stat (" + std::strerror(errno) + ")");
  const auto size = static_cast<size_t>(st.st_size);
  auto read_at = [&](size_t offset, size_t n) {
    std::vector<uint8_t> b(n);
    for (size_t got = 0; got < n;) {
      const ssize_t r = ::pread(fd, b.data() + got, n - got, static_cast<off_t>(offset + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw FormatError(path + ": read error" +
                          (r < 0 ? std::string(" (") + std::strerror(errno) + ")" : " (the file shrank)"));
      got += static_cast<size_t>(r);
    }
    return b;
  };
  const auto head = read_at(0, std::min(size, kHeadBytes));
  if (head.size() == size) return check_image(head.data(), head.size(), path);
  const auto tail = read_at(size - kTailBytes, kTailBytes);
  try {
    return check_parts(head.data(), head.size(), tail.data(), tail.size(), size, path);
  } catch (const FormatError&) {
    // A JPEG's frame header may lie beyond the first 64 KiB (large EXIF or ICC segments).
    if (!is_jpeg(head.data(), head.size()) || size >= (size_t{1} << 28)) throw;
    const auto all = read_at(0, size);
    return check_image(all.data(), all.size(), path);
  }
}

Image decode_image(const uint8_t* data, size_t size, const std::string& name, int64_t jpeg_min_side) {
  check_image(data, size, name);
  return is_jpeg(data, size) ? decode_jpeg(data, size, name, jpeg_min_side) : decode_stb(data, size, name);
}

// Every PNG chunk up to IEND must fit in the file: stb_image grows its IDAT buffer to a chunk's
// claimed length before reading it, so a 171-byte file claiming a 1 GiB chunk made it allocate
// 2 GiB (found by fuzzing).
static void check_png_chunks(const uint8_t* data, size_t size, const std::string& name) {
  size_t at = 8;  // after the signature
  while (size - at >= 8) {
    const uint32_t len = be32(data + at);
    const std::string type(reinterpret_cast<const char*>(data + at + 4), 4);
    if (len > size - at - 8 || size - at - 8 - len < 4)  // data, then a 4-byte CRC
      throw FormatError(at_offset(name, at) + ": corrupt PNG (a chunk claims " + std::to_string(len) + " bytes; " +
                        std::to_string(size - at - 8) + " remain in the file)");
    if (type == "IEND") return;
    at += 12 + static_cast<size_t>(len);
  }
}

Image decode_stb(const uint8_t* data, size_t size, const std::string& name) {
  if (size >= (size_t{1} << 31)) throw FormatError(name + ": more than the 2 GiB an image may have");
  if (is_png(data, size)) check_png_chunks(data, size, name);
  int w = 0, h = 0, c = 0;
  std::unique_ptr<stbi_uc, void (*)(void*)> px(stbi_load_from_memory(data, static_cast<int>(size), &w, &h, &c, 0), stbi_image_free);
  if (!px) throw FormatError(name + ": cannot decode image (" + stb_reason() + ")");
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

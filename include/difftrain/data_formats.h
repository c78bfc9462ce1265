// Dataset file formats, parsed from bytes with no LibTorch: IDX (MNIST, Fashion-MNIST; gzip or
// raw), CIFAR-10 binary batches, JPEG through libjpeg-turbo and PNG through stb_image (PNG out
// through stb_image_write). Every malformed input is a
// FormatError naming the file and, where it helps, the byte offset; nothing here may crash on
// bad bytes (fuzz/fuzz_formats.cpp checks that).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "difftrain/errors.h"

namespace difftrain::formats {

class FormatError : public RuntimeError {
 public:
  using RuntimeError::RuntimeError;
};

// N images of C x H x W uint8 in CHW order, one after another, and their labels (empty if none).
struct ImageArray {
  int64_t count = 0, channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
};

// One decoded image, C x H x W uint8 in CHW order (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA).
struct Image {
  int64_t channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;
};

// The bytes of a file, gunzipped when they start with the gzip magic (1f 8b). `max_bytes`
// bounds the decompressed size.
std::vector<uint8_t> read_file(const std::string& path, size_t max_bytes = size_t{1} << 32);
std::vector<uint8_t> gunzip(const std::vector<uint8_t>& bytes, const std::string& name, size_t max_bytes = size_t{1} << 32);

// IDX (LeCun et al., the MNIST format): big-endian magic 0x0000080D (D = dimensions, type 08 =
// uint8), then D big-endian uint32 sizes, then the data.
ImageArray parse_idx_images(const std::vector<uint8_t>& bytes, const std::string& name);  // D = 3
std::vector<int64_t> parse_idx_labels(const std::vector<uint8_t>& bytes, const std::string& name);  // D = 1

// CIFAR-10 binary batch: records of 1 label byte (0..9) and 3072 pixel bytes (R, G, B planes of 32x32).
ImageArray parse_cifar10(const std::vector<uint8_t>& bytes, const std::string& name);

// A file name ending in .png, .jpg or .jpeg, in any case: what image folders hold.
bool is_image_file(const std::string& path);

// What a PNG or JPEG header says, C x H x W as in Image.
struct ImageInfo {
  int64_t channels = 0, height = 0, width = 0;
};

// Checks an image without decoding its pixels: not empty, a PNG or JPEG signature, a header
// stb_image reads, dimensions plausible for the file size and within 16:1, and for PNG the IEND
// chunk that ends the file (a truncated PNG lacks it). Damage inside the compressed data shows
// only when decoding (a truncated JPEG too: decode_jpeg refuses it).
ImageInfo check_image(const uint8_t* data, size_t size, const std::string& name);
// The same check on a file, reading only its first 64 KiB and last 12 bytes.
ImageInfo check_image_file(const std::string& path);

// PNG (stb_image) or JPEG (decode_jpeg), with its own channel count; check_image first, so its
// errors come first. `jpeg_min_side` > 0 lets a JPEG decode smaller, as in decode_jpeg.
Image decode_image(const uint8_t* data, size_t size, const std::string& name, int64_t jpeg_min_side = 0);

// A JPEG through libjpeg-turbo (src/jpeg.cpp): gray as 1 channel, else RGB (CMYK converted as
// PIL's convert("RGB")). With min_side > 0 it decodes at the smallest DCT-domain scale n/8 (n = 1..8) whose
// shorter side is still >= min_side, which for large images is several times faster than a
// full decode (PIL's Image.draft does the same in steps of 1/2). The same pixels as PIL for the
// same scale: the accurate integer IDCT and smooth chroma upsampling. A cut-short file is an error.
Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name, int64_t min_side = 0);

// A PNG or JPEG through stb_image, without check_image (the fallback, and the benchmark's baseline).
Image decode_stb(const uint8_t* data, size_t size, const std::string& name);

// The order of `pixels` given to encode_png: planes (CHW, as Image) or interleaved (HWC).
enum class PixelLayout { kCHW, kHWC };

// A PNG file (stb_image_write, 8 bits per sample) of `channels` x `height` x `width` uint8 pixels;
// channels 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA (the PNG colour types 0, 4, 2, 6).
std::vector<uint8_t> encode_png(const uint8_t* pixels, int64_t channels, int64_t height, int64_t width,
                                PixelLayout layout = PixelLayout::kCHW);

}  // namespace difftrain::formats

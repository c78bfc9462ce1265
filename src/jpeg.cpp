// JPEG decoding through libjpeg-turbo's TurboJPEG API, with DCT-domain scaling (the IDCT of each
// 8x8 block computed at n x n for a scale of n/8; libjpeg's scale_num/scale_denom, PIL's draft()).
#include <turbojpeg.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "difftrain/data_formats.h"

namespace difftrain::formats {

namespace {

// One decompressor per thread (the loader's workers decode concurrently; a handle is not shared).
tjhandle decompressor() {
  thread_local std::unique_ptr<void, int (*)(tjhandle)> handle(tjInitDecompress(), tjDestroy);
  if (!handle) throw FormatError(std::string("libjpeg-turbo: cannot create a decompressor: ") + tjGetErrorStr2(nullptr));
  return handle.get();
}

// The smallest n/8 (n = 1..8) at which the shorter side keeps at least min_side pixels.
tjscalingfactor dct_scale(int width, int height, int64_t min_side) {
  const tjscalingfactor full{1, 1};
  if (min_side <= 0) return full;
  int count = 0;
  const tjscalingfactor* factors = tjGetScalingFactors(&count);
  tjscalingfactor best = full;
  const int short_side = std::min(width, height);
  for (int i = 0; factors && i < count; ++i) {
    const auto& f = factors[i];
    if (f.num > f.denom) continue;  // upscaling factors (up to 2/1) are never used
    if (TJSCALED(short_side, f) >= min_side && f.num * best.denom < best.num * f.denom) best = f;
  }
  return best;
}

// CMYK as Adobe's JPEGs store it (inverted: 255 - C, ..., 255 - K; PIL and Photoshop write it so)
// to RGB as PIL's convert("RGB"): R = (255 - K) - C * (255 - K) / 255, rounded as PIL's MULDIV255.
std::vector<uint8_t> cmyk_to_rgb(const std::vector<uint8_t>& inverted) {
  std::vector<uint8_t> rgb(inverted.size() / 4 * 3);
  auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (size_t i = 0, n = inverted.size() / 4; i < n; ++i) {
    const int not_k = inverted[4 * i + 3];
    for (size_t j = 0; j < 3; ++j) rgb[3 * i + j] = static_cast<uint8_t>(not_k - muldiv255(255 - inverted[4 * i + j], not_k));
  }
  return rgb;
}

}  // namespace

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name, int64_t min_side) {
  tjhandle tj = decompressor();
  int width = 0, height = 0, subsamp = 0, colorspace = 0;
  const auto* jpeg = const_cast<unsigned char*>(data);  // TurboJPEG 2.x takes non-const input it does not modify
  if (tjDecompressHeader3(tj, jpeg, static_cast<unsigned long>(size), &width, &height, &subsamp, &colorspace) != 0)
    throw FormatError(name + ": unreadable JPEG header (libjpeg-turbo: " + tjGetErrorStr2(tj) + ")");
  const tjscalingfactor f = dct_scale(width, height, min_side);
  const int w = TJSCALED(width, f), h = TJSCALED(height, f);
  const bool gray = colorspace == TJCS_GRAY, cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  const int pf = gray ? TJPF_GRAY : cmyk ? TJPF_CMYK : TJPF_RGB;
  std::vector<uint8_t> hwc(static_cast<size_t>(w) * static_cast<size_t>(h) * static_cast<size_t>(tjPixelSize[pf]));
  // Flags 0: the accurate integer IDCT and smooth ("fancy") chroma upsampling, libjpeg's and PIL's defaults.
  if (tjDecompress2(tj, jpeg, static_cast<unsigned long>(size), hwc.data(), w, 0, h, pf, 0) != 0) {
    const std::string why = tjGetErrorStr2(tj);
    // A warning still yields an image: libjpeg-turbo recovers from extraneous bytes or a bad
    // restart marker, as PIL does. Premature end of data is a cut-short file, which PIL refuses too.
    if (tjGetErrorCode(tj) != TJERR_WARNING || why.find("Premature end") != std::string::npos)
      throw FormatError(name + ": cannot decode JPEG (libjpeg-turbo: " + why + ")");
  }
  const int c = gray ? 1 : 3;
  if (cmyk) hwc = cmyk_to_rgb(hwc);
  Image img;
  img.channels = c;
  img.height = h;
  img.width = w;
  if (gray) {
    img.pixels = std::move(hwc);
    return img;
  }
  img.pixels.resize(hwc.size());
  const size_t plane = static_cast<size_t>(w) * static_cast<size_t>(h);
  for (size_t i = 0; i < plane; ++i)  // HWC -> CHW
    for (size_t k = 0; k < 3; ++k) img.pixels[k * plane + i] = hwc[i * 3 + k];
  return img;
}

}  // namespace difftrain::formats

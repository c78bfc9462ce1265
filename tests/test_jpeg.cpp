// JPEG decoding through libjpeg-turbo (formats::decode_jpeg): the pixels PIL decodes from the
// same files, at full size and at each DCT-domain scale PIL's draft() offers, for 4:2:0, 4:2:2,
// 4:4:4, gray, progressive, restart-marker and CMYK files (tests/jpeg/make_jpegs.py makes them
// and PIL's decodes at test time); the scale chosen for a min_side against its closed form; a
// cut-short or damaged file; and the datasets decoding at data.resolution's scale.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/data_formats.h"
#include "temp_dir.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;
using formats::FormatError;

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// A w x h RGB JPEG from stb_image_write (an encoder independent of libjpeg-turbo): a pattern, or
// one flat colour.
std::vector<uint8_t> make_jpeg(int w, int h, bool flat = false) {
  std::vector<uint8_t> px(static_cast<size_t>(w * h * 3));
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int k = 0; k < 3; ++k)
        px[static_cast<size_t>((y * w + x) * 3 + k)] = static_cast<uint8_t>(flat ? 60 * k + 40 : (x * (k + 1) + y * 2) % 256);
  std::vector<uint8_t> out;
  auto append = [](void* ctx, void* data, int size) {
    auto* o = static_cast<std::vector<uint8_t>*>(ctx);
    o->insert(o->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
  };
  EXPECT_TRUE(stbi_write_jpg_to_func(append, &out, w, h, 3, px.data(), 90));
  return out;
}

class Jpeg : public test::TempDirTest {
 protected:
  Jpeg() : TempDirTest("jpeg") {}
};

// Zero tolerance: both sides run libjpeg-turbo's accurate integer IDCT (scaled n x n for 1/2..1/8)
// and its integer chroma upsampling, deterministic integer arithmetic with no platform-dependent
// rounding; PIL's copy is an independent build of another version (3.x; ours is Debian's 2.1).
TEST_F(Jpeg, DecodesThePixelsPilDecodesAtEveryDctScale) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python (PIL makes the reference)";
  const std::string cmd = python + " " + test::source_dir() + "/tests/jpeg/make_jpegs.py " + dir_.string() + " > " +
                          (dir_ / "py.log").string() + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(dir_ / "manifest.json");
  const auto manifest = nlohmann::json::parse(in);
  ASSERT_EQ(manifest["files"].size(), 7u);
  for (const auto& [name, entry] : manifest["files"].items()) {
    const auto jpeg = read_bytes(dir_ / (name + ".jpg"));
    const int64_t short_side = std::min(entry["width"].get<int64_t>(), entry["height"].get<int64_t>());
    for (const auto& [s, want] : entry["scales"].items()) {
      const int64_t scale = std::stoll(s);
      const int64_t min_side = scale == 1 ? 0 : (short_side + scale - 1) / scale;  // PIL's draft size, ceil(side / s)
      const auto img = formats::decode_image(jpeg.data(), jpeg.size(), name, min_side);
      SCOPED_TRACE(name + " at 1/" + s);
      ASSERT_EQ(img.width, want["width"].get<int64_t>());
      ASSERT_EQ(img.height, want["height"].get<int64_t>());
      ASSERT_EQ(img.channels, want["channels"].get<int64_t>());
      // PIL's raw bytes are HWC; ours are CHW.
      const auto ref = torch::from_blob(read_bytes(dir_ / (name + "." + s + ".raw")).data(),
                                        {img.height, img.width, img.channels}, torch::kByte)
                           .permute({2, 0, 1})
                           .clone();  // a copy: the bytes are a temporary
      const auto ours =
          torch::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.channels, img.height, img.width}, torch::kByte);
      EXPECT_TRUE(torch::equal(ours, ref)) << "max |difference| "
                                           << (ours.to(torch::kInt) - ref.to(torch::kInt)).abs().max().item<int>();
    }
  }
}

// The smallest n/8 whose shorter side ceil(side * n / 8) is still >= min_side; full size when none.
TEST_F(Jpeg, ScaleIsTheSmallestThatKeepsTheShorterSide) {
  const int w = 333, h = 250;
  const auto jpeg = make_jpeg(w, h);
  const auto full = formats::decode_image(jpeg.data(), jpeg.size(), "x.jpg");
  ASSERT_EQ(full.width, w);
  ASSERT_EQ(full.height, h);
  for (int64_t min_side : {1, 31, 32, 33, 63, 64, 94, 95, 125, 126, 157, 188, 219, 220, 249, 250, 251, 1000}) {
    int n = 8;
    for (int k = 1; k <= 8; ++k)
      if ((h * k + 7) / 8 >= min_side) {
        n = k;
        break;
      }
    const auto img = formats::decode_image(jpeg.data(), jpeg.size(), "x.jpg", min_side);
    SCOPED_TRACE("min_side " + std::to_string(min_side));
    EXPECT_EQ(img.height, (h * n + 7) / 8);
    EXPECT_EQ(img.width, (w * n + 7) / 8);
    if (min_side <= h) {
      EXPECT_GE(img.height, min_side);
    }
  }
  // min_side 0 (data.jpeg_dct_scaling = false) is the full decode, pixel for pixel.
  EXPECT_EQ(formats::decode_image(jpeg.data(), jpeg.size(), "x.jpg", 0).pixels, full.pixels);
}

TEST_F(Jpeg, CutShortOrDamagedFilesAreErrorsNotCrashes) {
  const auto jpeg = make_jpeg(96, 80);
  const std::vector<uint8_t> cut(jpeg.begin(), jpeg.begin() + static_cast<std::ptrdiff_t>(jpeg.size() / 2));
  try {
    formats::decode_image(cut.data(), cut.size(), "cut.jpg");
    ADD_FAILURE() << "a cut-short JPEG decoded";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("cut.jpg: cannot decode JPEG (libjpeg-turbo: Premature end of JPEG file)"),
              std::string::npos)
        << e.what();
  }
  // Every byte after the header overwritten in turn: an image or a FormatError, nothing else.
  int decoded = 0, refused = 0;
  for (size_t i = jpeg.size() / 3; i < jpeg.size(); i += 7) {
    auto bad = jpeg;
    bad[i] ^= 0x5A;
    try {
      formats::decode_image(bad.data(), bad.size(), "bad.jpg", 40);
      ++decoded;
    } catch (const FormatError&) {
      ++refused;
    }
  }
  EXPECT_GT(decoded + refused, 0);
}

TEST_F(Jpeg, DatasetsDecodeAtTheScaleOfTheResolution) {
  const auto jpeg = make_jpeg(320, 240);
  fs::create_directories(dir_ / "f/a");
  std::ofstream(dir_ / "f/a/x.jpg", std::ios::binary)
      .write(reinterpret_cast<const char*>(jpeg.data()), static_cast<std::streamsize>(jpeg.size()));
  DataConfig cfg;
  cfg.dataset = DatasetKind::image_folder;
  cfg.path = (dir_ / "f").string();
  cfg.channels = 3;
  cfg.resolution = 64;  // 240 * 2/8 = 60 < 64 <= 240 * 3/8 = 90
  EXPECT_EQ(open_dataset(cfg)->get(0).image.sizes(), torch::IntArrayRef({3, 90, 120}));
  cfg.jpeg_dct_scaling = false;
  EXPECT_EQ(open_dataset(cfg)->get(0).image.sizes(), torch::IntArrayRef({3, 240, 320}));
  // A flat colour is the same after augment either way: each 8x8 block holds only its DC term, which
  // the full IDCT and the scaled one both output as round(DC / 8), and resampling keeps constants.
  // (Other content differs a little: the DCT-domain scaling low-passes otherwise than the resize.)
  const auto flat = make_jpeg(320, 240, /*flat=*/true);
  std::ofstream(dir_ / "f/a/x.jpg", std::ios::binary)
      .write(reinterpret_cast<const char*>(flat.data()), static_cast<std::streamsize>(flat.size()));
  const auto opts = AugmentOptions::from(cfg);
  const auto full = augment(open_dataset(cfg)->get(0).image, opts, 0);
  cfg.jpeg_dct_scaling = true;
  const auto scaled = augment(open_dataset(cfg)->get(0).image, opts, 0);
  EXPECT_EQ(scaled.sizes(), torch::IntArrayRef({3, 64, 64}));
  EXPECT_TRUE(torch::equal(scaled, full));
}

}  // namespace
}  // namespace difftrain

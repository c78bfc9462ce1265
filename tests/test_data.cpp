// Dataset readers on fixtures written here (and their corrupted variants), the real Fashion-MNIST,
// augmentation on synthetic patterns, and the loader: sharding (against PyTorch's
// DistributedSampler), determinism, resume, workers and preload.
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <stb/stb_image_write.h>
#include <torch/torch.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

class Data : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("difftrain_data_" + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static void write(const fs::path& p, const std::vector<uint8_t>& bytes) {
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  static std::vector<uint8_t> gzip(const std::vector<uint8_t>& raw) {
    z_stream zs{};
    deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
    std::vector<uint8_t> out(deflateBound(&zs, raw.size()) + 64);
    zs.next_in = const_cast<Bytef*>(raw.data());
    zs.avail_in = static_cast<uInt>(raw.size());
    zs.next_out = out.data();
    zs.avail_out = static_cast<uInt>(out.size());
    deflate(&zs, Z_FINISH);
    out.resize(zs.total_out);
    deflateEnd(&zs);
    return out;
  }
  // IDX images: n images of h x w with pixel (i, y, x) = (i * 16 + y * w + x) % 256; labels i % 3.
  static std::vector<uint8_t> idx_images(uint32_t n, uint32_t h, uint32_t w) {
    std::vector<uint8_t> b = {0, 0, 8, 3};
    for (uint32_t v : {n, h, w})
      for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
    for (uint32_t i = 0; i < n; ++i)
      for (uint32_t p = 0; p < h * w; ++p) b.push_back(static_cast<uint8_t>((i * 16 + p) % 256));
    return b;
  }
  static std::vector<uint8_t> idx_labels(uint32_t n) {
    std::vector<uint8_t> b = {0, 0, 8, 1};
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(n >> s));
    for (uint32_t i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(i % 3));
    return b;
  }
  static std::vector<uint8_t> cifar(int n) {
    std::vector<uint8_t> b;
    for (int i = 0; i < n; ++i) {
      b.push_back(static_cast<uint8_t>(i % 10));
      for (int p = 0; p < 3072; ++p) b.push_back(static_cast<uint8_t>((i + p) % 251));
    }
    return b;
  }
  std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "(no error)";
  }
  DataConfig idx_config(const fs::path& path) {
    DataConfig c;
    c.dataset = DatasetKind::idx;
    c.path = path.string();
    return c;
  }

  fs::path dir_;
};

// ---------------------------------------------------------------------------------------------
// IDX.

TEST_F(Data, IdxRawAndGzipReadTheSame) {
  write(dir_ / "raw/train-images-idx3-ubyte", idx_images(5, 4, 3));
  write(dir_ / "raw/train-labels-idx1-ubyte", idx_labels(5));
  write(dir_ / "gz/train-images-idx3-ubyte.gz", gzip(idx_images(5, 4, 3)));
  write(dir_ / "gz/train-labels-idx1-ubyte.gz", gzip(idx_labels(5)));
  DataConfig strict = idx_config(dir_ / "raw");
  strict.allow_upscale = false;  // 4x3 images, resolution 32
  strict.resolution = 32;
  const std::string err = error_of([&] { open_dataset(strict); });
  EXPECT_NE(err.find("data.resolution = 32 is larger than the 4x3 images of IDX train split of " + (dir_ / "raw").string()),
            std::string::npos) << err;
  for (const char* sub : {"raw", "gz"}) {
    const auto ds = open_dataset(idx_config(dir_ / sub));
    ASSERT_EQ(ds->size(), 5);
    EXPECT_EQ(ds->num_classes(), 3);
    const Sample s = ds->get(2);
    EXPECT_EQ(s.label, 2);
    EXPECT_EQ(s.image.sizes(), (std::vector<int64_t>{1, 4, 3}));
    EXPECT_EQ(s.image[0][1][2].item<int>(), (2 * 16 + 1 * 3 + 2) % 256);
  }
}

TEST_F(Data, IdxCorruptionsAreNamedErrors) {
  auto images = idx_images(5, 4, 3);
  struct Case {
    const char* name;
    std::vector<uint8_t> bytes;
    const char* fragment;
  };
  auto bad_magic = images;
  bad_magic[0] = 1;
  auto bad_type = images;
  bad_type[2] = 0x0D;
  auto bad_dims = images;
  bad_dims[3] = 2;
  auto truncated = images;
  truncated.resize(images.size() - 7);
  auto trailing = images;
  trailing.push_back(0);
  auto gz = gzip(images);
  auto gz_truncated = std::vector<uint8_t>(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2));
  auto gz_corrupt = gz;
  for (size_t i = 20; i < 40 && i < gz_corrupt.size(); ++i) gz_corrupt[i] ^= 0x5a;
  for (const Case& c : {Case{"bad_magic", bad_magic, "not an IDX file"}, Case{"bad_type", bad_type, "data type byte 13"},
                        Case{"bad_dims", bad_dims, "has 2 dimensions, expected 3"}, Case{"truncated", truncated, "(truncated)"},
                        Case{"trailing", trailing, "(trailing bytes)"}, Case{"header_only", {0, 0, 8, 3, 0, 0}, "truncated IDX header"},
                        Case{"gz_truncated", gz_truncated, "truncated gzip"}, Case{"gz_corrupt", gz_corrupt, "offset"}}) {
    const fs::path d = dir_ / c.name;
    write(d / "train-images-idx3-ubyte.gz", c.bytes);  // read_file gunzips by content, not by name
    write(d / "train-labels-idx1-ubyte", idx_labels(5));
    const std::string err = error_of([&] { open_dataset(idx_config(d)); });
    EXPECT_NE(err.find((d / "train-images-idx3-ubyte.gz").string()), std::string::npos) << c.name << ": " << err;
    EXPECT_NE(err.find(c.fragment), std::string::npos) << c.name << ": " << err;
  }
  // Sizes whose product wraps around 2^64 (65536 x 2^24 x 2^24) must not pass the length check.
  write(dir_ / "wrap/train-images-idx3-ubyte", {0, 0, 8, 3, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0});
  write(dir_ / "wrap/train-labels-idx1-ubyte", idx_labels(5));
  EXPECT_NE(error_of([&] { open_dataset(idx_config(dir_ / "wrap")); }).find("implausibly large"), std::string::npos);
  write(dir_ / "mismatch/train-images-idx3-ubyte", images);
  write(dir_ / "mismatch/train-labels-idx1-ubyte", idx_labels(4));
  EXPECT_NE(error_of([&] { open_dataset(idx_config(dir_ / "mismatch")); }).find("has 5 images but"), std::string::npos);
  EXPECT_NE(error_of([&] { open_dataset(idx_config(dir_ / "nothing")); }).find("no IDX train split"), std::string::npos);
}

TEST_F(Data, RealFashionMnist) {
  const fs::path root = test::fashion_mnist_dir();
  if (!fs::exists(root)) GTEST_SKIP() << root << " does not exist (install dataset-fashion-mnist or set DIFFTRAIN_TEST_DATA)";
  DataConfig c = idx_config(root);
  const auto train = open_dataset(c);
  c.split = Split::test;
  const auto test = open_dataset(c);
  // Xiao et al. 2017: 60,000 training and 10,000 test images of 28x28, 10 balanced classes.
  ASSERT_EQ(train->size(), 60000);
  ASSERT_EQ(test->size(), 10000);
  EXPECT_EQ(train->num_classes(), 10);
  EXPECT_EQ(train->get(0).label, 9);  // the first training image is an ankle boot
  EXPECT_EQ(train->get(0).image.sizes(), (std::vector<int64_t>{1, 28, 28}));
  std::vector<int64_t> histogram(10, 0);
  for (int64_t i = 0; i < test->size(); ++i) ++histogram[static_cast<size_t>(test->get(i).label)];
  EXPECT_EQ(histogram, std::vector<int64_t>(10, 1000));
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10.

TEST_F(Data, Cifar10ReadsAndRejectsCorruption) {
  DataConfig c;
  c.dataset = DatasetKind::cifar10;
  c.split = Split::test;
  c.path = dir_.string();
  write(dir_ / "test_batch.bin", cifar(3));
  const auto ds = open_dataset(c);
  ASSERT_EQ(ds->size(), 3);
  const Sample s = ds->get(1);
  EXPECT_EQ(s.label, 1);
  EXPECT_EQ(s.image.sizes(), (std::vector<int64_t>{3, 32, 32}));
  EXPECT_EQ(s.image[2][0][5].item<int>(), (1 + 2048 + 5) % 251);  // blue plane starts at byte 2048 of the record

  auto truncated = cifar(3);
  truncated.pop_back();
  write(dir_ / "test_batch.bin", truncated);
  EXPECT_NE(error_of([&] { open_dataset(c); }).find("not a whole number of 3073-byte"), std::string::npos);
  auto bad_label = cifar(3);
  bad_label[3073] = 10;
  write(dir_ / "test_batch.bin", bad_label);
  const std::string err = error_of([&] { open_dataset(c); });
  EXPECT_NE(err.find("offset 3073"), std::string::npos) << err;
  EXPECT_NE(err.find("label 10"), std::string::npos) << err;
  c.split = Split::train;
  EXPECT_NE(error_of([&] { open_dataset(c); }).find("missing data_batch_1.bin"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Image folders.

void write_png(const fs::path& p, int w, int h, int c, uint8_t value) {
  fs::create_directories(p.parent_path());
  std::vector<uint8_t> px(static_cast<size_t>(w * h * c), value);
  ASSERT_TRUE(stbi_write_png(p.c_str(), w, h, c, px.data(), w * c));
}

TEST_F(Data, ImageFolderLabelsFromSubfolders) {
  write_png(dir_ / "lab/cat/a.png", 6, 5, 1, 10);   // gray
  write_png(dir_ / "lab/cat/b.PNG", 6, 5, 4, 20);   // RGBA
  write_png(dir_ / "lab/dog/c.png", 6, 5, 3, 30);   // RGB
  std::vector<uint8_t> px(6 * 5 * 3, 200);
  ASSERT_TRUE(stbi_write_jpg((dir_ / "lab/dog/d.jpg").c_str(), 6, 5, 3, px.data(), 95));
  ImageFolderDataset ds((dir_ / "lab").string(), BadImagePolicy::fail);
  ASSERT_EQ(ds.size(), 4);
  EXPECT_EQ(ds.classes(), (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(ds.get(0).label, 0);
  EXPECT_EQ(ds.get(3).label, 1);
  EXPECT_EQ(ds.get(1).image.size(0), 4);
  EXPECT_NEAR(ds.get(3).image.to(torch::kFloat).mean().item<double>(), 200.0, 2.0);  // lossy JPEG
  // Flat folder: unlabelled. Empty folder: an error.
  write_png(dir_ / "flat/x.png", 4, 4, 3, 1);
  EXPECT_EQ(ImageFolderDataset((dir_ / "flat").string(), BadImagePolicy::fail).get(0).label, -1);
  fs::create_directories(dir_ / "empty/sub");
  EXPECT_NE(error_of([&] { ImageFolderDataset((dir_ / "empty").string(), BadImagePolicy::fail); }).find("no PNG or JPEG files"),
            std::string::npos);
}

// The bytes of a 4x4 RGB PNG with pixel value `value`.
std::vector<uint8_t> png_bytes(uint8_t value) {
  const std::vector<uint8_t> px(3 * 4 * 4, value);
  return formats::encode_png(px.data(), /*channels=*/3, /*height=*/4, /*width=*/4);
}

TEST_F(Data, ExtremeAspectRatiosAreBadImages) {
  write_png(dir_ / "w/a/wide.png", 40, 2, 1, 5);  // 20:1 would resize to a huge strip
  write_png(dir_ / "w/a/ok.png", 4, 4, 1, 9);
  const std::string err = error_of([&] { ImageFolderDataset((dir_ / "w").string(), BadImagePolicy::fail); });
  EXPECT_NE(err.find("wide.png: 40x2 has an aspect ratio beyond 16:1"), std::string::npos) << err;
  ImageFolderDataset lenient((dir_ / "w").string(), BadImagePolicy::skip);
  ASSERT_EQ(lenient.size(), 1);
  EXPECT_EQ(lenient.get(0).image[0][0][0].item<int>(), 9);
}

// A PNG header claiming 4294926125 x 3221231671 pixels (both sides near 2^32) is refused; their
// product overflowed int64 before the sides were checked (a fuzzing finding, UBSan).
TEST_F(Data, HugePngSidesAreRefusedWithoutOverflow) {
  std::vector<uint8_t> png = {0x89, 'P',  'N',  'G',  0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, 'I', 'H', 'D', 'R', 0xff,
                              0xff, 0x5f, 0x2d, 0xc0, 0x00, 0x18, 0x37, 8,    0, 0, 0, 0,  0,   0,   0,   0};
  for (uint8_t b : std::initializer_list<uint8_t>{0x00, 0x00, 0x00, 0x00, 'I', 'E', 'N', 'D', 0xae, 0x42, 0x60, 0x82})
    png.push_back(b);
  try {
    formats::check_image(png.data(), png.size(), "huge.png");
    ADD_FAILURE() << "no error";
  } catch (const formats::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("huge.png: header claims 4294926125x3221231671 pixels, too many"), std::string::npos)
        << e.what();
  }
}

// All bad files are found when the folder is opened, each named with its reason, in one error.
TEST_F(Data, BadImageFilesAreAllNamedAtOpen) {
  for (int i = 0; i < 5; ++i)
    write(dir_ / "f/a" / ("good" + std::to_string(i) + ".png"), png_bytes(static_cast<uint8_t>(10 * i)));
  const auto png = png_bytes(7);
  write(dir_ / "f/a/text.png", {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '\n'});
  write(dir_ / "f/a/cut.png", std::vector<uint8_t>(png.begin(), png.begin() + static_cast<std::ptrdiff_t>(png.size() / 2)));
  write(dir_ / "f/b/empty.png", {});
  write(dir_ / "f/b/fake.jpg", {0xFF, 0xD8, 0xFF, 0xE0, 0, 2, 0xFF, 0xD9});  // JPEG markers, no frame header
  write_png(dir_ / "f/b/small.png", 3, 3, 1, 0);                             // below min_side = 4
  const std::string root = (dir_ / "f").string();
  const std::string err = error_of([&] { ImageFolderDataset(root, BadImagePolicy::fail, /*min_side=*/4); });
  EXPECT_NE(err.find("5 of 10 image files cannot be used"), std::string::npos) << err;
  for (const char* expected : {"text.png: not a PNG or JPEG file (it starts with \"hello wo\")", "cut.png: truncated PNG",
                               "empty.png: empty file (0 bytes)", "fake.jpg: unreadable JPEG header",
                               "small.png: 3x3 is smaller than data.resolution = 4 and data.allow_upscale is false"})
    EXPECT_NE(err.find(expected), std::string::npos) << expected << " not in:\n" << err;
  EXPECT_NE(err.find("data.on_bad_image = \"skip\""), std::string::npos) << err;

  ImageFolderDataset lenient(root, BadImagePolicy::skip, /*min_side=*/4);
  EXPECT_EQ(lenient.size(), 5);
  EXPECT_EQ(lenient.left_out().size(), 5u);
  EXPECT_EQ(lenient.classes(), (std::vector<std::string>{"a", "b"}));  // labels keep their numbers
  for (int64_t i = 0; i < lenient.size(); ++i) EXPECT_EQ(lenient.get(i).image[0][0][0].item<int>(), 10 * i);
  EXPECT_NE(lenient.describe().find("5 bad files left out"), std::string::npos) << lenient.describe();
  // Without min_side, small.png is good.
  EXPECT_EQ(ImageFolderDataset(root, BadImagePolicy::skip).size(), 6);
  // All of them bad: an error even when skipping.
  fs::remove_all(dir_ / "f/a");
  EXPECT_NE(error_of([&] { ImageFolderDataset(root, BadImagePolicy::skip, 4); }).find("none is usable"), std::string::npos);
}

TEST_F(Data, ManyBadFilesAreCappedInTheMessage) {
  write(dir_ / "m/good.png", png_bytes(1));
  for (int i = 0; i < 25; ++i) write(dir_ / "m" / ("bad" + std::to_string(100 + i) + ".png"), {'x'});
  const std::string err = error_of([&] { ImageFolderDataset((dir_ / "m").string(), BadImagePolicy::fail); });
  EXPECT_NE(err.find("25 of 26 image files cannot be used"), std::string::npos) << err;
  EXPECT_NE(err.find("bad119.png"), std::string::npos) << err;  // the 20th, sorted
  EXPECT_EQ(err.find("bad120.png"), std::string::npos) << err;  // the 21st: in the log only
  EXPECT_NE(err.find("... and 5 more (all listed in the log above)"), std::string::npos) << err;
}

// A file that passes the header check but fails to decode: on_bad_image applies when it is read.
TEST_F(Data, UndecodableImagesFailOrAreSkipped) {
  write_png(dir_ / "f/a/ok.png", 4, 4, 1, 7);
  auto png = png_bytes(3);
  ASSERT_EQ(std::string(png.begin() + 37, png.begin() + 41), "IDAT");
  png[41] = 0;  // the zlib header (CMF byte) of the pixel data
  write(dir_ / "f/a/broken.png", png);
  ImageFolderDataset strict((dir_ / "f").string(), BadImagePolicy::fail);
  EXPECT_EQ(strict.size(), 2);
  const std::string err = error_of([&] { strict.get(0); });  // sorted: broken.png first
  EXPECT_NE(err.find("broken.png: cannot decode image (bad zlib header)"), std::string::npos) << err;
  ImageFolderDataset lenient((dir_ / "f").string(), BadImagePolicy::skip);
  EXPECT_EQ(lenient.get(0).image[0][0][0].item<int>(), 7);
  EXPECT_EQ(lenient.skipped(), 1);
}

// A truncated PNG once failed with "cannot decode image ()": stb_image's reason for an unknown
// chunk type is built from the type's bytes, and past the end of the data those are zeros.
TEST(Formats, DecodeErrorsAlwaysSayWhy) {
  const auto png = png_bytes(5);
  for (const size_t cut : {size_t{20}, size_t{40}, png.size() / 2, png.size() - 12, png.size() - 1}) {
    SCOPED_TRACE(cut);
    const std::vector<uint8_t> part(png.begin(), png.begin() + static_cast<std::ptrdiff_t>(cut));
    try {
      formats::decode_image(part.data(), part.size(), "cut.png");
      ADD_FAILURE() << "accepted";
    } catch (const formats::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("cut.png: truncated PNG"), std::string::npos) << e.what();
    }
  }
  // Ends well, but a zero chunk type before IEND: stb_image fails with "" as its reason.
  auto zero_chunk = png;
  zero_chunk.insert(zero_chunk.end() - 12, 12, 0);
  try {
    formats::decode_image(zero_chunk.data(), zero_chunk.size(), "zero.png");
    ADD_FAILURE() << "accepted";
  } catch (const formats::FormatError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.find("()"), std::string::npos) << what;
    EXPECT_NE(what.find("zero.png: cannot decode image (corrupt or cut-short data, stb_image gave no reason)"), std::string::npos)
        << what;
  }
  // A chunk that claims more bytes than the file holds (fuzzing: stb_image allocated 2 GiB for
  // this 171-byte file's IDAT before finding the data missing). Here: the IEND chunk moved past a
  // chunk claiming 2^30 bytes.
  auto liar = png;
  const std::vector<uint8_t> claim = {0x40, 0x00, 0x00, 0x00, 't', 'E', 'X', 't'};
  liar.insert(liar.end() - 12, claim.begin(), claim.end());
  const size_t liar_at = liar.size() - 12 - claim.size();
  try {
    formats::decode_image(liar.data(), liar.size(), "liar.png");
    ADD_FAILURE() << "accepted";
  } catch (const formats::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("liar.png (offset " + std::to_string(liar_at) + "): corrupt PNG (a chunk claims " +
                                         std::to_string(1u << 30) + " bytes; 12 remain in the file)"),
              std::string::npos)
        << e.what();
  }
  // The file check agrees with the check in memory and reads only the ends of a large file.
  const fs::path big = fs::temp_directory_path() / ("difftrain_big_" + std::to_string(::getpid()) + ".png");
  std::vector<uint8_t> noise(3 * 256 * 256);
  uint64_t state = 1;  // Knuth's MMIX LCG, top byte: incompressible enough
  for (auto& v : noise) v = static_cast<uint8_t>((state = state * 6364136223846793005ULL + 1442695040888963407ULL) >> 56);
  auto large = formats::encode_png(noise.data(), 3, 256, 256);
  ASSERT_GT(large.size(), size_t{1} << 17);
  std::ofstream(big, std::ios::binary)
      .write(reinterpret_cast<const char*>(large.data()), static_cast<std::streamsize>(large.size()));
  const auto info = formats::check_image_file(big.string());
  EXPECT_EQ(info.channels, 3);
  EXPECT_EQ(info.height, 256);
  EXPECT_EQ(info.width, 256);
  fs::resize_file(big, large.size() - 100);
  EXPECT_THROW(formats::check_image_file(big.string()), formats::FormatError);
  fs::remove(big);
  EXPECT_THROW(formats::check_image_file(big.string()), formats::FormatError);  // gone: cannot open
}

TEST(Formats, OnlyPngAndJpegAndNoHugeClaims) {
  // Found by scripts/fuzz.sh: a 34-byte TGA header claiming a huge image took stb_image > 10 s.
  const std::vector<uint8_t> tga = {0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x0b, 0x00, 0x2a, 0x00, 0x03, 0x00, 0x4c, 0x0c, 0xa8, 0x80, 0x10, 0x1f, 0x00, 0x0f, 0xb4, 0x00, 0x44, 0xe8, 0xf7, 0x36, 0x9e, 0x00, 0x00, 0x2a, 0x00, 0x03, 0x10};
  EXPECT_THROW(formats::decode_image(tga.data(), tga.size(), "tga"), formats::FormatError);
  const std::vector<uint8_t> bmp = {'B', 'M', 0, 0, 0, 0};
  EXPECT_THROW(formats::decode_image(bmp.data(), bmp.size(), "bmp"), formats::FormatError);
  // A PNG header (signature + IHDR) claiming 65535 x 65535 pixels in 33 bytes.
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R', 0, 0, 0xFF, 0xFF,
                              0, 0, 0xFF, 0xFF, 8, 0, 0, 0, 0, 0, 0, 0, 0};
  try {
    formats::decode_image(png.data(), png.size(), "bomb.png");
    ADD_FAILURE() << "accepted";
  } catch (const formats::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("bomb.png"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Augmentation on synthetic patterns.

TEST(Augment, FlipIsAFlipAndCropKeepsTheCenter) {
  const auto img = torch::arange(36, torch::kByte).view({1, 6, 6});
  AugmentOptions o;
  o.resolution = 6;
  o.channels = 1;
  o.random_flip = true;
  int flipped = 0;
  for (uint64_t key = 0; key < 64; ++key) {
    const auto out = augment(img, o, key);
    if (torch::equal(out, img.flip({2}))) ++flipped;
    else EXPECT_TRUE(torch::equal(out, img)) << "neither the image nor its mirror";
  }
  EXPECT_GT(flipped, 16);
  EXPECT_LT(flipped, 48);
  // Center crop of a 6x8 image to ... first the short side stays 6, then columns 1..6 remain.
  const auto wide = torch::arange(48, torch::kByte).view({1, 6, 8});
  o.random_flip = false;
  EXPECT_TRUE(torch::equal(augment(wide, o, 0), wide.slice(2, 1, 7)));
  // An odd margin rounds half to even, as torchvision (Python round): 6x7 -> columns 0..5.
  const auto odd = torch::arange(42, torch::kByte).view({1, 6, 7});
  EXPECT_TRUE(torch::equal(augment(odd, o, 0), odd.slice(2, 0, 6)));
  // Random crops are windows of the image.
  o.crop = CropMode::random;
  std::set<int> lefts;
  for (uint64_t key = 0; key < 32; ++key) {
    const auto out = augment(wide, o, key);
    const int left = out[0][0][0].item<int>();
    EXPECT_TRUE(torch::equal(out, wide.slice(2, left, left + 6)));
    lefts.insert(left);
  }
  EXPECT_EQ(lefts, (std::set<int>{0, 1, 2}));
}

TEST(Augment, ResizeAndChannels) {
  // 8x8 made of 2x2 blocks of constant value: area downscaling to 4x4 returns the block values.
  const auto blocks = torch::arange(16, torch::kFloat).mul(10).view({1, 1, 4, 4}).repeat_interleave(2, 2).repeat_interleave(2, 3);
  AugmentOptions o;
  o.resolution = 4;
  o.resize = ResizeMode::area;
  EXPECT_TRUE(torch::equal(augment(blocks.squeeze(0).to(torch::kByte), o, 0), torch::arange(16, torch::kFloat).mul(10).view({1, 4, 4}).to(torch::kByte)));
  // A constant image stays constant under bilinear resampling, up or down.
  const auto flat = torch::full({1, 9, 9}, 77, torch::kByte);
  o.resize = ResizeMode::bilinear;
  EXPECT_TRUE(torch::equal(augment(flat, o, 0), torch::full({1, 4, 4}, 77, torch::kByte)));
  o.resolution = 16;
  EXPECT_TRUE(torch::equal(augment(flat, o, 0), torch::full({1, 16, 16}, 77, torch::kByte)));
  o.allow_upscale = false;
  EXPECT_THROW(augment(flat, o, 0), RuntimeError);
  // Gray -> RGB copies; RGB -> gray is PIL's L = (299 R + 587 G + 114 B) / 1000.
  o.resolution = 2;
  o.channels = 3;
  EXPECT_TRUE(torch::equal(augment(torch::full({1, 2, 2}, 9, torch::kByte), o, 0), torch::full({3, 2, 2}, 9, torch::kByte)));
  o.channels = 1;
  const auto rgb = torch::stack({torch::full({2, 2}, 200, torch::kByte), torch::full({2, 2}, 100, torch::kByte),
                                 torch::full({2, 2}, 50, torch::kByte)});
  EXPECT_EQ(augment(rgb, o, 0)[0][0][0].item<int>(), 124);  // 59.8 + 58.7 + 5.7 = 124.2
  // RGBA drops alpha.
  EXPECT_EQ(augment(torch::cat({rgb, torch::zeros({1, 2, 2}, torch::kByte)}), o, 0)[0][0][0].item<int>(), 124);
}

// ---------------------------------------------------------------------------------------------
// The loader.

std::shared_ptr<Dataset> synthetic(int64_t n) {
  formats::ImageArray a;
  a.count = n;
  a.channels = 1;
  a.height = a.width = 4;
  for (int64_t i = 0; i < n; ++i) {
    for (int p = 0; p < 16; ++p) a.pixels.push_back(static_cast<uint8_t>((i * 7 + p) % 256));
    a.labels.push_back(i % 5);
  }
  return std::make_shared<ArrayDataset>(std::move(a), 5, "synthetic");
}

LoaderOptions small_options(int64_t workers) {
  LoaderOptions o;
  o.batch_size = 4;
  o.seed = 17;
  o.num_workers = workers;
  o.augment.resolution = 4;
  o.augment.channels = 1;
  o.augment.random_flip = true;
  return o;
}

TEST(Loader, ShardsMatchPyTorchsDistributedSampler) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python";
  const std::string cmd = python +
                          " -c \"import json, torch.utils.data as d\n"
                          "def shard(e, r):\n"
                          "  s = d.DistributedSampler(range(103), num_replicas=3, rank=r, shuffle=True, seed=17, drop_last=True)\n"
                          "  s.set_epoch(e)\n"
                          "  return list(s)\n"
                          "print(json.dumps([[shard(e, r) for r in range(3)] for e in range(2)]))\" 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  ASSERT_EQ(out.rfind("[[", 0), 0u) << out;
  const auto want = nlohmann::json::parse(out);  // [epoch][rank] -> indices
  for (int e = 0; e < 2; ++e) {
    std::set<int64_t> all;
    for (int r = 0; r < 3; ++r) {
      const auto got = epoch_indices(103, 17, e, r, 3);
      EXPECT_EQ(got, want[e][r].get<std::vector<int64_t>>()) << "epoch " << e << " rank " << r;
      EXPECT_EQ(got.size(), 34u);
      all.insert(got.begin(), got.end());
    }
    EXPECT_EQ(all.size(), 102u);  // disjoint, and together all but the 103 % 3 dropped
  }
}

TEST(Loader, DeterministicAcrossRunsAndWorkerCounts) {
  auto ds = synthetic(50);
  Loader a(ds, small_options(0)), b(ds, small_options(3));
  EXPECT_EQ(a.batches_per_epoch(), 12);
  for (int i = 0; i < 30; ++i) {  // across two epoch boundaries
    const Batch x = a.next(), y = b.next();
    ASSERT_TRUE(torch::equal(x.images, y.images)) << "batch " << i;
    ASSERT_TRUE(torch::equal(x.labels, y.labels)) << "batch " << i;
  }
  EXPECT_EQ(a.state(), (LoaderState{2, 6}));
  Loader c(ds, small_options(0));
  const Batch first = c.next();
  EXPECT_EQ(first.images.sizes(), (std::vector<int64_t>{4, 1, 4, 4}));
  EXPECT_LE(first.images.max().item<float>(), 1.0f);
  EXPECT_GE(first.images.min().item<float>(), -1.0f);
}

TEST(Loader, ResumeContinuesTheSameStream) {
  auto ds = synthetic(50);
  Loader full(ds, small_options(2));
  std::vector<Batch> stream;
  for (int i = 0; i < 20; ++i) stream.push_back(full.next());
  Loader head(ds, small_options(2));
  for (int i = 0; i < 9; ++i) head.next();
  const LoaderState saved = head.state();  // what a checkpoint stores
  Loader resumed(ds, small_options(2), saved);
  for (int i = 9; i < 20; ++i) {
    const Batch b = resumed.next();
    ASSERT_TRUE(torch::equal(b.images, stream[static_cast<size_t>(i)].images)) << "batch " << i;
    ASSERT_TRUE(torch::equal(b.labels, stream[static_cast<size_t>(i)].labels)) << "batch " << i;
  }
}

TEST(Loader, PreloadGivesTheSameBatches) {
  auto ds = synthetic(40);
  LoaderOptions o = small_options(0);
  Loader streamed(ds, o);
  o.preload = true;
  Loader preloaded(ds, o);
  for (int i = 0; i < 15; ++i) {
    const Batch x = streamed.next(), y = preloaded.next();
    ASSERT_TRUE(torch::equal(x.images, y.images)) << "batch " << i;
    ASSERT_TRUE(torch::equal(x.labels, y.labels)) << "batch " << i;
  }
}

TEST(Loader, AWorkerErrorIsRethrownOnEveryCallWithoutHanging) {
  LoaderOptions o = small_options(1);
  o.augment.resolution = 8;
  o.augment.allow_upscale = false;  // the 4x4 items cannot be scaled up
  Loader loader(synthetic(20), o);
  EXPECT_THROW(loader.next(), RuntimeError);
  EXPECT_THROW(loader.next(), RuntimeError);
  LoaderOptions zero = small_options(0);
  zero.batch_size = 0;
  EXPECT_THROW(Loader(synthetic(20), zero), c10::Error);
}

TEST(Loader, TooFewItemsIsAnError) {
  EXPECT_THROW(Loader(synthetic(3), small_options(0)), RuntimeError);  // 3 items < one batch of 4
  LoaderOptions o = small_options(0);
  o.world_size = 2;
  EXPECT_THROW(Loader(synthetic(7), o), RuntimeError);  // 7 / 2 ranks < one batch of 4
}

}  // namespace
}  // namespace difftrain

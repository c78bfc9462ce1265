// `difftrain data pack` end to end: shards of Fashion-MNIST hold exactly the IDX reader's images
// and labels, in its order, byte-identically on a second run; Python's webdataset reads them
// (pixels and labels compared through SHA-256), and our tar reader groups what webdataset's own
// TarWriter wrote into the same samples.
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/sha256.h"
#include "difftrain/tar.h"
#include "difftrain/webdataset.h"
#include "temp_dir.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

std::string slurp(const fs::path& p) {
  std::stringstream ss;
  ss << std::ifstream(p, std::ios::binary).rdbuf();
  return ss.str();
}

class DataPack : public test::TempDirTest {
 protected:
  DataPack() : TempDirTest("pack") {}

  int run(const std::string& args, const std::string& log) const {
    const std::string cmd = test::difftrain_bin() + " " + args + " >" + (dir_ / log).string() + " 2>&1 </dev/null";
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string pack(const std::string& out, int64_t limit, int64_t shard_size) const {
    return fmt::format("data pack --from idx --path {} --out {} --limit {} --shard-size {}", test::fashion_mnist_dir(),
                       (dir_ / out).string(), limit, shard_size);
  }
  std::shared_ptr<Dataset> idx() const {
    DataConfig cfg;
    cfg.path = test::fashion_mnist_dir();
    return open_dataset(cfg);
  }
};

TEST_F(DataPack, ShardsHoldTheReadersImagesAndLabelsInOrder) {
  ASSERT_EQ(run(pack("a", 300, 128), "a.log"), 0) << slurp(dir_ / "a.log");
  ASSERT_EQ(run(pack("b", 300, 128), "b.log"), 0) << slurp(dir_ / "b.log");
  const auto dataset = idx();
  int64_t item = 0;
  for (int shard = 0; shard < 3; ++shard) {
    const auto path = dir_ / "a" / fmt::format("shard-{:06d}.tar", shard);
    EXPECT_EQ(slurp(path), slurp(dir_ / "b" / path.filename())) << "packing is not deterministic: " << path;
    const auto members = formats::read_tar_file(path.string());
    ASSERT_EQ(members.size(), 2u * (shard < 2 ? 128 : 300 - 256)) << path;
    for (size_t m = 0; m < members.size(); m += 2, ++item) {
      const Sample s = dataset->get(item);
      const std::string key = fmt::format("{:06d}", item);
      EXPECT_EQ(members[m].first.name, key + ".png");
      EXPECT_EQ(members[m + 1].first.name, key + ".cls");
      const auto image = formats::decode_image(members[m].second.data(), members[m].second.size(), members[m].first.name);
      ASSERT_EQ(image.channels, 1);
      const at::Tensor decoded =
          torch::from_blob(const_cast<uint8_t*>(image.pixels.data()), {1, image.height, image.width}, torch::kUInt8);
      ASSERT_TRUE(torch::equal(decoded, s.image)) << key;
      EXPECT_EQ(std::string(members[m + 1].second.begin(), members[m + 1].second.end()), std::to_string(s.label)) << key;
    }
  }
  EXPECT_EQ(item, 300);
  EXPECT_FALSE(fs::exists(dir_ / "a" / "shard-000003.tar"));
  // The shard index (webdataset's wids format): each shard's url and count, and the classes.
  const auto index = nlohmann::json::parse(slurp(dir_ / "a" / "shard-index.json"));
  EXPECT_EQ(index["__kind__"], "wids-shard-index-v1");
  EXPECT_EQ(index["num_classes"], 10);
  ASSERT_EQ(index["shardlist"].size(), 3u);
  for (int shard = 0; shard < 3; ++shard) {
    EXPECT_EQ(index["shardlist"][shard]["url"], fmt::format("shard-{:06d}.tar", shard));
    EXPECT_EQ(index["shardlist"][shard]["nsamples"], shard < 2 ? 128 : 44);
  }
  EXPECT_EQ(slurp(dir_ / "a" / "shard-index.json"), slurp(dir_ / "b" / "shard-index.json"));
  EXPECT_NE(slurp(dir_ / "a.log").find("300 samples in 3 shard(s)"), std::string::npos) << slurp(dir_ / "a.log");
}

TEST_F(DataPack, PythonWebdatasetReadsOurShardsAndWeReadItsOwn) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python";
  if (std::system((python + " -c 'import webdataset' 2>/dev/null").c_str()) != 0) GTEST_SKIP() << "no webdataset in the venv";
  ASSERT_EQ(run(pack("s", 100, 40), "pack.log"), 0) << slurp(dir_ / "pack.log");
  const auto script = dir_ / "read.py";
  std::ofstream(script)
      << "import hashlib, io, json, sys, webdataset as wds\n"
         "import numpy as np\n"
         "urls = sys.argv[1] + '/shard-{000000..000002}.tar'\n"
         "out = []\n"
         "for s in wds.WebDataset(urls, shardshuffle=False).decode('l8'):  # uint8 grayscale\n"
         "    out.append([s['__key__'], int(s['cls']), hashlib.sha256(np.ascontiguousarray(s['png'])\n"
         "                .astype(np.uint8).tobytes()).hexdigest()])\n"
         "with wds.TarWriter(sys.argv[1] + '/theirs.tar') as w:\n"
         "    for i in range(3):\n"
         "        w.write({'__key__': 'k/%04d' % i, 'png': np.full((4, 5), i, np.uint8), 'cls': i, 'json': {'n': i}})\n"
         "print(json.dumps(out))\n";
  const std::string cmd = python + " " + script.string() + " " + (dir_ / "s").string() + " > " + (dir_ / "py.out").string() +
                          " 2> " + (dir_ / "py.err").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(dir_ / "py.err");
  const auto got = nlohmann::json::parse(slurp(dir_ / "py.out"));
  const auto dataset = idx();
  ASSERT_EQ(got.size(), 100u);
  for (int64_t i = 0; i < 100; ++i) {
    const Sample s = dataset->get(i);
    EXPECT_EQ(got[i][0].get<std::string>(), fmt::format("{:06d}", i));
    EXPECT_EQ(got[i][1].get<int64_t>(), s.label);
    EXPECT_EQ(got[i][2].get<std::string>(), sha256_hex(s.image.data_ptr<uint8_t>(), static_cast<size_t>(s.image.numel()))) << i;
  }
  // webdataset's TarWriter: three samples of png, cls and json, grouped by key as it would.
  std::map<std::string, std::vector<std::string>> samples;
  for (const auto& [m, data] : formats::read_tar_file((dir_ / "s" / "theirs.tar").string())) {
    const auto name = formats::split_wds_name(m.name);
    samples[name.key].push_back(name.extension);
    if (name.extension == "cls") {
      EXPECT_EQ(std::string(data.begin(), data.end()), name.key.substr(name.key.size() - 1)) << m.name;
    }
  }
  ASSERT_EQ(samples.size(), 3u);
  for (const auto& [key, extensions] : samples) {
    EXPECT_EQ(key.rfind("k/", 0), 0u) << key;
    EXPECT_EQ(extensions, (std::vector<std::string>{"cls", "json", "png"})) << key;
  }
  // ... and as a dataset: labels from .cls or from the json field, pixels as written.
  for (const std::string field : {"", "n"}) {
    WebDataset theirs((dir_ / "s" / "theirs.tar").string(), field, 1, BadImagePolicy::fail);
    ASSERT_EQ(theirs.size(), 3);
    for (int64_t i = 0; i < 3; ++i) {
      const Sample s = theirs.get(i);
      EXPECT_EQ(s.label, i);
      ASSERT_EQ(s.image.sizes(), (c10::IntArrayRef{1, 4, 5}));
      EXPECT_TRUE(torch::equal(s.image, torch::full({1, 4, 5}, i, torch::kUInt8))) << i;
    }
  }
}

// Training reads the shards: data.dataset = "webdataset" with the quickstart model, a few steps.
TEST_F(DataPack, TrainingReadsTheShards) {
  ASSERT_EQ(run(pack("t", 512, 100), "pack.log"), 0) << slurp(dir_ / "pack.log");
  const std::string args = fmt::format(
      "train --config {}/configs/quickstart.json --device cpu --set data.dataset=webdataset --set data.path={} "
      "--set data.shuffle_buffer=64 --set train.max_steps=4 --set logging.log_every=2 --set logging.sample_every=0 "
      "--set sampling.num_final_samples=0 --set run.output_dir={}",
      test::source_dir(), (dir_ / "t").string(), (dir_ / "runs").string());
  ASSERT_EQ(run(args, "train.log"), 0) << slurp(dir_ / "train.log");
  EXPECT_NE(slurp(dir_ / "train.log").find("WebDataset " + (dir_ / "t").string() + ": 512 samples in 6 shard(s), 10 classes"),
            std::string::npos)
      << slurp(dir_ / "train.log");
  EXPECT_TRUE(fs::exists(dir_ / "runs" / "quickstart" / "checkpoints" / "step_00000004" / "manifest.json"));
}

TEST_F(DataPack, BadArgumentsAreNamed) {
  EXPECT_EQ(run(pack("x", 10, 0), "zero.log"), 1);
  EXPECT_NE(slurp(dir_ / "zero.log").find("--shard-size 0: must be at least 1"), std::string::npos) << slurp(dir_ / "zero.log");
  EXPECT_EQ(run("data pack --from nope --path . --out " + (dir_ / "y").string(), "from.log"), 1);
  EXPECT_NE(slurp(dir_ / "from.log").find("allowed: idx | cifar10 | image_folder | webdataset"), std::string::npos)
      << slurp(dir_ / "from.log");
  EXPECT_EQ(run("data pack --from idx --path " + (dir_ / "missing").string() + " --out " + (dir_ / "z").string(), "missing.log"),
            2);
  EXPECT_NE(slurp(dir_ / "missing.log").find("no IDX train split there"), std::string::npos) << slurp(dir_ / "missing.log");
}

}  // namespace
}  // namespace difftrain

// WebDataset shards as a dataset (webdataset.h): shards packed from Fashion-MNIST hold the IDX
// reader's images and labels; data.path resolves as a directory, a brace pattern or a list; an
// epoch streams whole shards in a (seed, epoch) order through a shuffle buffer; the Loader's rank
// split and resume hold for it as for any dataset; damage is named by shard and member.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "difftrain/config.h"
#include "difftrain/data.h"
#include "difftrain/shards.h"
#include "difftrain/tar.h"
#include "difftrain/webdataset.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

class WebDatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("difftrain_wds_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    DataConfig cfg;
    cfg.path = test::fashion_mnist_dir();
    idx_ = open_dataset(cfg);
    PackOptions pack;
    pack.out_dir = (dir_ / "shards").string();
    pack.shard_size = 64;
    pack.limit = 300;  // shards of 64, 64, 64, 64, 44
    pack_shards(*idx_, pack);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string shard(int i) const { return (dir_ / "shards" / fmt::format("shard-{:06d}.tar", i)).string(); }
  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "(no error)";
  }
  fs::path dir_;
  std::shared_ptr<Dataset> idx_;
};

TEST_F(WebDatasetTest, HoldsTheReadersImagesAndLabels) {
  WebDataset wds((dir_ / "shards").string(), "", 100, BadImagePolicy::fail);
  ASSERT_EQ(wds.size(), 300);
  EXPECT_EQ(wds.shards().size(), 5u);
  EXPECT_EQ(wds.num_classes(), 10);
  for (int64_t i = 0; i < 300; i += 7) {
    const Sample a = wds.get(i), b = idx_->get(i);
    ASSERT_TRUE(torch::equal(a.image, b.image)) << i;
    EXPECT_EQ(a.label, b.label) << i;
    EXPECT_EQ(wds.label(i), b.label) << i;
  }
}

TEST_F(WebDatasetTest, PathIsADirectoryABracePatternOrAList) {
  const auto by_dir = resolve_shards((dir_ / "shards").string());
  const auto by_braces = resolve_shards((dir_ / "shards" / "shard-{000000..000004}.tar").string());
  ASSERT_EQ(by_dir.size(), 5u);
  EXPECT_EQ(by_braces, by_dir);
  std::ofstream(dir_ / "list.txt") << "# training shards\nshards/shard-000003.tar\n\n  " << shard(1) << "  # absolute\n";
  EXPECT_EQ(resolve_shards((dir_ / "list.txt").string()),
            (std::vector<std::string>{(dir_ / "shards/shard-000003.tar").string(), shard(1)}));
  std::ofstream(dir_ / "gap.txt") << "shards/shard-000000.tar\nshards/shard-000009.tar\n";
  EXPECT_NE(error_of([&] {
              resolve_shards((dir_ / "gap.txt").string());
            }).find("shard " + (dir_ / "shards/shard-000009.tar").string() + " named by the list does not exist"),
            std::string::npos);
  EXPECT_NE(error_of([&] { resolve_shards((dir_ / "shards" / "shard-{000000..000007}.tar").string()); }).find("shard-000005.tar"),
            std::string::npos);
  EXPECT_NE(error_of([&] { resolve_shards((dir_ / "s-{9..1}.tar").string()); }).find("FIRST <= LAST"), std::string::npos);
  EXPECT_NE(error_of([&] { resolve_shards((dir_ / "nothing").string()); }).find("no such directory, shard, shard list"),
            std::string::npos);
}

TEST_F(WebDatasetTest, AnEpochStreamsWholeShardsThroughTheShuffleBuffer) {
  WebDataset one((dir_ / "shards").string(), "", 1, BadImagePolicy::fail),
      buffered((dir_ / "shards").string(), "", 16, BadImagePolicy::fail);
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    // Buffer 1: the shards one after another, each front to back.
    const auto order = one.epoch_order(5, epoch);
    ASSERT_EQ(order.size(), 300u);
    std::set<int64_t> starts;
    for (size_t p = 0; p < order.size(); ++p) {
      if (p > 0 && order[p] == order[p - 1] + 1 && order[p] % 64 != 0) continue;
      EXPECT_EQ(order[p] % 64, 0) << "position " << p << " starts no shard";
      starts.insert(order[p] / 64);
    }
    EXPECT_EQ(starts.size(), 5u);
    // Buffer 16: a permutation, the same for the same (seed, epoch), and each item at most 15
    // positions earlier than in the unbuffered stream (it waited in the buffer, never jumped ahead).
    const auto shuffled = buffered.epoch_order(5, epoch);
    EXPECT_EQ(shuffled, buffered.epoch_order(5, epoch));
    EXPECT_EQ(std::set<int64_t>(shuffled.begin(), shuffled.end()).size(), 300u);
    std::vector<size_t> stream_position(300);
    for (size_t p = 0; p < order.size(); ++p) stream_position[static_cast<size_t>(order[p])] = p;
    for (size_t p = 0; p < shuffled.size(); ++p) EXPECT_LE(stream_position[static_cast<size_t>(shuffled[p])], p + 15) << p;
    EXPECT_NE(shuffled, order);
  }
  EXPECT_NE(one.epoch_order(5, 0), one.epoch_order(5, 1));
  EXPECT_NE(buffered.epoch_order(5, 0), buffered.epoch_order(6, 0));
}

TEST_F(WebDatasetTest, RanksSplitGlobalBatchesAndALoaderResumesExactly) {
  auto wds = std::make_shared<WebDataset>((dir_ / "shards").string(), "", 32, BadImagePolicy::fail);
  LoaderOptions o;
  o.batch_size = 16;
  o.seed = 3;
  o.num_workers = 2;
  o.augment.resolution = 28;
  Loader whole(wds, o);
  LoaderOptions half = o;
  half.batch_size = 8;
  half.world_size = 2;
  half.rank = 0;
  Loader r0(wds, half);
  half.rank = 1;
  Loader r1(wds, half);
  // 300 samples, global batch 16: 18 batches an epoch (12 samples dropped); two epochs and more.
  std::vector<Batch> straight;
  for (int b = 0; b < 40; ++b) {
    const Batch g = whole.next(), a = r0.next(), c = r1.next();
    straight.push_back(g);
    auto key = [](const at::Tensor& images, const at::Tensor& labels) {
      std::multiset<std::pair<double, int64_t>> k;
      for (int64_t i = 0; i < images.size(0); ++i) k.insert({images[i].sum().item<double>(), labels[i].item<int64_t>()});
      return k;
    };
    auto both = key(a.images, a.labels);
    const auto second = key(c.images, c.labels);
    both.insert(second.begin(), second.end());
    EXPECT_EQ(key(g.images, g.labels), both) << "global batch " << b;
  }
  EXPECT_EQ(whole.state(), (LoaderState{2, 4}));
  Loader resumed(wds, o, LoaderState{1, 5});
  for (int b = 18 + 5; b < 40; ++b) {
    const Batch x = resumed.next();
    ASSERT_TRUE(torch::equal(x.images, straight[static_cast<size_t>(b)].images)) << b;
    ASSERT_TRUE(torch::equal(x.labels, straight[static_cast<size_t>(b)].labels)) << b;
  }
}

TEST_F(WebDatasetTest, DamageIsNamedByShardAndMember) {
  // A shard cut inside its 9th member, the png of its 5th sample (000132).
  std::string bytes;
  {
    std::ifstream in(shard(2), std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto first_members = formats::read_tar_file(shard(2));
  const uint64_t cut = first_members[8].first.offset + 10;
  std::ofstream(shard(2), std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(cut));
  const std::string err = error_of([&] { WebDataset((dir_ / "shards").string(), "", 1, BadImagePolicy::fail); });
  EXPECT_NE(err.find(shard(2) + ": truncated member data"), std::string::npos) << err;
  WebDataset lenient((dir_ / "shards").string(), "", 1, BadImagePolicy::skip);
  EXPECT_EQ(lenient.size(), 300 - 64 + 4);  // samples 128-131 are whole
  ASSERT_EQ(lenient.left_out().size(), 1u);
  EXPECT_NE(lenient.describe().find("1 damaged shard(s) cut short"), std::string::npos);

  // An image member whose bytes are not an image: found when it is decoded.
  std::ofstream(shard(2), std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  std::vector<uint8_t> junk(100, 0x42);
  {
    std::ofstream out(shard(4), std::ios::binary | std::ios::trunc);
    formats::TarWriter w(out, shard(4));
    const std::string cls = "3";
    w.add("000256.png", junk.data(), junk.size());
    w.add("000256.cls", reinterpret_cast<const uint8_t*>(cls.data()), cls.size());
    w.finish();
  }
  WebDataset strict((dir_ / "shards").string(), "", 1, BadImagePolicy::fail);
  const std::string decode_err = error_of([&] { strict.get(strict.size() - 1); });
  EXPECT_NE(decode_err.find(shard(4) + ": 000256.png: not a PNG or JPEG"), std::string::npos) << decode_err;
  WebDataset skipping((dir_ / "shards").string(), "", 1, BadImagePolicy::skip);
  EXPECT_TRUE(torch::equal(skipping.get(skipping.size() - 1).image, idx_->get(0).image));  // the next good one
  EXPECT_EQ(skipping.skipped(), 1);
}

TEST_F(WebDatasetTest, LabelsFromAJsonField) {
  std::vector<uint8_t> png = formats::read_tar_file(shard(0))[0].second;
  {
    std::ofstream out(dir_ / "j.tar", std::ios::binary);
    formats::TarWriter w(out, "j.tar");
    for (int i = 0; i < 3; ++i) {
      const std::string json = fmt::format("{{\"caption\": \"x\", \"class_id\": {}}}", 7 - i);
      w.add(fmt::format("s{}.png", i), png.data(), png.size());
      w.add(fmt::format("s{}.json", i), reinterpret_cast<const uint8_t*>(json.data()), json.size());
    }
    w.finish();
  }
  WebDataset wds((dir_ / "j.tar").string(), "class_id", 1, BadImagePolicy::fail);
  ASSERT_EQ(wds.size(), 3);
  EXPECT_EQ(wds.label(0), 7);
  EXPECT_EQ(wds.label(2), 5);
  EXPECT_EQ(wds.num_classes(), 8);
  WebDataset unlabelled((dir_ / "j.tar").string(), "", 1, BadImagePolicy::fail);
  EXPECT_EQ(unlabelled.label(0), -1);
  EXPECT_EQ(unlabelled.num_classes(), 0);
  EXPECT_NE(error_of([&] {
              WebDataset((dir_ / "j.tar").string(), "label", 1, BadImagePolicy::fail);
            }).find("j.tar: s0.json: no non-negative integer field \"label\" (data.label_field)"),
            std::string::npos);
}

}  // namespace
}  // namespace difftrain

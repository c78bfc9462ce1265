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
#include "temp_dir.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

class WebDatasetTest : public test::TempDirTest {
 protected:
  WebDatasetTest() : TempDirTest("wds") {}
  void SetUp() override {
    TempDirTest::SetUp();
    DataConfig cfg;
    cfg.path = test::fashion_mnist_dir();
    idx_ = open_dataset(cfg);
    PackOptions pack;
    pack.out_dir = (dir_ / "shards").string();
    pack.shard_size = 64;
    pack.limit = 300;  // shards of 64, 64, 64, 64, 44
    pack_shards(*idx_, pack);
  }
  std::string shard(int i) const { return (dir_ / "shards" / fmt::format("shard-{:06d}.tar", i)).string(); }
  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "(no error)";
  }
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
  const auto by_dir = resolve_shards((dir_ / "shards").string()).shards;
  const auto by_braces = resolve_shards((dir_ / "shards" / "shard-{000000..000004}.tar").string()).shards;
  ASSERT_EQ(by_dir.size(), 5u);
  EXPECT_EQ(by_braces, by_dir);
  std::ofstream(dir_ / "list.txt") << "# training shards\nshards/shard-000003.tar\n\n  " << shard(1) << "  # absolute\n";
  EXPECT_EQ(resolve_shards((dir_ / "list.txt").string()).shards,
            (std::vector<std::string>{(dir_ / "shards/shard-000003.tar").string(), shard(1)}));
  // The index data pack wrote: the same shards, their counts and the classes.
  const auto by_index = resolve_shards((dir_ / "shards" / "shard-index.json").string());
  EXPECT_EQ(by_index.shards, by_dir);
  EXPECT_EQ(by_index.counts, (std::vector<int64_t>{64, 64, 64, 64, 44}));
  EXPECT_EQ(by_index.num_classes, 10);
  EXPECT_TRUE(resolve_shards((dir_ / "list.txt").string()).counts.empty());
  std::ofstream(dir_ / "bad-index.json")
      << R"({"__kind__": "wids-shard-index-v1", "shardlist": [{"url": "shards/shard-000000.tar"}]})";
  EXPECT_NE(error_of([&] { resolve_shards((dir_ / "bad-index.json").string()); }).find("is not {\"url\": string, \"nsamples\""),
            std::string::npos);
  std::ofstream(dir_ / "other.json") << R"({"shards": []})";
  EXPECT_NE(error_of([&] { resolve_shards((dir_ / "other.json").string()); }).find("not a shard index with shards"),
            std::string::npos);
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

// For samples split across ranks (shard_streams 0) and for 4 shard streams: 2 ranks x 8 see the
// global batches of 1 x 16 over more than two epochs, and a Loader resumed mid-epoch gives the
// straight run's batches bit for bit.
TEST_F(WebDatasetTest, RanksSplitGlobalBatchesAndALoaderResumesExactly) {
  for (const int64_t streams : {0, 4}) {
    SCOPED_TRACE("data.shard_streams = " + std::to_string(streams));
    auto wds = std::make_shared<WebDataset>((dir_ / "shards").string(), "", 32, BadImagePolicy::fail, 0, streams);
    // 300 samples, global batch 16: 18 batches an epoch (12 samples dropped); with 4 streams of
    // the smallest shard's 44 samples, 176 an epoch: 11 batches.
    const int64_t per_epoch = streams ? 11 : 18;
    LoaderOptions o;
    o.batch_size = 16;
    o.seed = 3;
    o.num_workers = 2;
    o.augment.resolution = 28;
    Loader whole(wds, o);
    ASSERT_EQ(whole.batches_per_epoch(), per_epoch);
    LoaderOptions half = o;
    half.batch_size = 8;
    half.world_size = 2;
    half.rank = 0;
    Loader r0(wds, half);
    half.rank = 1;
    Loader r1(wds, half);
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
    EXPECT_EQ(whole.state(), (LoaderState{40 / per_epoch, 40 % per_epoch}));
    Loader resumed(wds, o, LoaderState{1, 5});
    for (int64_t b = per_epoch + 5; b < 40; ++b) {
      const Batch x = resumed.next();
      ASSERT_TRUE(torch::equal(x.images, straight[static_cast<size_t>(b)].images)) << b;
      ASSERT_TRUE(torch::equal(x.labels, straight[static_cast<size_t>(b)].labels)) << b;
    }
  }
}

// With V shard streams each rank reads only its own shards, a different set each epoch; each
// stream is its shards through the buffer, cut to the same length.
TEST_F(WebDatasetTest, ShardStreamsGiveEachShardToOneRankPerEpoch) {
  WebDataset wds((dir_ / "shards").string(), "", 16, BadImagePolicy::fail, 0, /*shard_streams=*/4);
  EXPECT_EQ(wds.epoch_size(), 4 * 44);  // floor(5 / 4) = 1 shard per stream at least: the smallest, 44
  EXPECT_EQ(wds.world_size_divides(), 4);
  std::set<std::set<int64_t>> rank0_sets;
  for (int64_t epoch = 0; epoch < 4; ++epoch) {
    const auto order = wds.epoch_order(9, epoch);
    ASSERT_EQ(order.size(), 176u);
    EXPECT_EQ(std::set<int64_t>(order.begin(), order.end()).size(), 176u);
    std::vector<std::set<int64_t>> stream_shards(4), rank_shards(2);
    for (size_t p = 0; p < order.size(); ++p) stream_shards[p % 4].insert(order[p] / 64);
    for (int64_t rank = 0; rank < 2; ++rank)
      for (const int64_t i : epoch_indices(wds, 9, epoch, rank, 2)) rank_shards[static_cast<size_t>(rank)].insert(i / 64);
    for (size_t a = 0; a < 4; ++a)
      for (size_t b = a + 1; b < 4; ++b)
        for (const int64_t sh : stream_shards[a])
          EXPECT_EQ(stream_shards[b].count(sh), 0u) << "shard " << sh << " in two streams";
    for (const int64_t sh : rank_shards[0]) EXPECT_EQ(rank_shards[1].count(sh), 0u) << "epoch " << epoch << ": shard " << sh;
    // Each stream's shards are cut to 44 samples: stream 0's second shard shows only when its first
    // is the 44-sample one (the buffer lets items at most 15 places ahead of 44 in).
    EXPECT_GE(rank_shards[0].size() + rank_shards[1].size(), 4u);
    rank0_sets.insert(rank_shards[0]);
  }
  EXPECT_GT(rank0_sets.size(), 1u);  // the shards move between ranks from epoch to epoch
  // A world size that does not divide the streams is refused; so are more streams than shards.
  LoaderOptions o;
  o.batch_size = 8;
  o.world_size = 3;
  auto shared = std::make_shared<WebDataset>((dir_ / "shards").string(), "", 16, BadImagePolicy::fail, 0, 4);
  EXPECT_NE(error_of([&] { Loader(shared, o); }).find("data.shard_streams = 4 is not a multiple of the world size 3"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              WebDataset((dir_ / "shards").string(), "", 1, BadImagePolicy::fail, 0, 6);
            }).find("1..5, the number of shards"),
            std::string::npos);
}

// With an index (data pack's), a shard's headers are read when the shard is first read, so a
// rank touches only the shards it reads; a shard that disagrees with the index is named.
TEST_F(WebDatasetTest, AShardIndexDefersEachShardsHeadersToItsFirstRead) {
  const std::string index = (dir_ / "shards" / "shard-index.json").string();
  WebDataset wds(index, "", 16, BadImagePolicy::fail);
  EXPECT_EQ(wds.shards_scanned(), 0);
  EXPECT_EQ(wds.size(), 300);
  EXPECT_EQ(wds.num_classes(), 10);
  const Sample s = wds.get(130);  // shard 2
  EXPECT_EQ(wds.shards_scanned(), 1);
  EXPECT_TRUE(torch::equal(s.image, idx_->get(130).image));
  EXPECT_EQ(wds.label(131), idx_->label(131));
  EXPECT_EQ(wds.shards_scanned(), 1);
  EXPECT_NE(wds.describe().find("(counts from the index)"), std::string::npos);
  // An index that overstates a shard: the error names the shard and both counts.
  std::ofstream(dir_ / "shards" / "wrong-index.json")
      << R"({"__kind__": "wids-shard-index-v1", "wids_version": 1, "num_classes": 10, "shardlist": [)"
      << R"({"url": "shard-000000.tar", "nsamples": 64}, {"url": "shard-000004.tar", "nsamples": 45}]})";
  WebDataset wrong((dir_ / "shards" / "wrong-index.json").string(), "", 1, BadImagePolicy::fail);
  EXPECT_EQ(wrong.size(), 109);
  EXPECT_NE(error_of([&] { wrong.get(100); })
                .find(shard(4) + ": the shard index " + (dir_ / "shards" / "wrong-index.json").string() +
                      " says 45 samples, the shard has 44"),
            std::string::npos)
      << error_of([&] { wrong.get(100); });
  // With "skip", the 44 samples read and the promised 45th is skipped.
  WebDataset lenient((dir_ / "shards" / "wrong-index.json").string(), "", 1, BadImagePolicy::skip);
  EXPECT_TRUE(torch::equal(lenient.get(64 + 44).image, lenient.get(0).image));  // the next good one: wraps to 0
  EXPECT_EQ(lenient.skipped(), 1);
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

// Checkpoint storage: SHA-256 against FIPS 180-2 and coreutils, safetensors against an
// independent header reader and the safetensors package, and the save/verify/rotate/recover rules.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "difftrain/checkpoint.h"
#include "difftrain/safetensors_header.h"
#include "difftrain/sha256.h"
#include "test_paths.h"

namespace difftrain {
namespace {

namespace fs = std::filesystem;

std::string run(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  while (p && fgets(buf, sizeof buf, p)) out += buf;
  if (p) pclose(p);
  return out;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

class CheckpointFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / fmt::format("difftrain_ckpt_{}_{}", ::getpid(),
                                                   ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST(Sha256, Fips180Vectors) {
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 h;  // one million 'a', fed in uneven pieces
  const std::string chunk(997, 'a');
  size_t left = 1000000;
  while (left > 0) {
    const size_t n = std::min(left, chunk.size());
    h.update(chunk.data(), n);
    left -= n;
  }
  EXPECT_EQ(h.hex_digest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_F(CheckpointFiles, Sha256FileAgreesWithCoreutils) {
  const fs::path f = dir_ / "blob";
  {
    std::ofstream out(f, std::ios::binary);
    for (int i = 0; i < 300000; ++i) out.put(static_cast<char>((i * 7919) & 0xff));
  }
  const std::string coreutils = run("sha256sum '" + f.string() + "'");
  if (coreutils.size() < 64) GTEST_SKIP() << "no sha256sum";
  EXPECT_EQ(sha256_file(f), coreutils.substr(0, 64));
}

NamedTensors sample_tensors() {
  torch::manual_seed(0);
  return {{"a.weight", torch::randn({3, 4})},
          {"bf16", torch::randn({5}).to(torch::kBFloat16)},
          {"half", torch::randn({2, 2}).to(torch::kHalf)},
          {"long", torch::arange(7, torch::kLong)},
          {"bytes", torch::arange(5, torch::kByte)},
          {"scalar", torch::full({}, 2.5)},
          {"empty", torch::zeros({0, 3})},
          {"flags", torch::tensor({true, false})}};
}

TEST_F(CheckpointFiles, SafetensorsRoundTripIsExactAndDeterministic) {
  const auto tensors = sample_tensors();
  const fs::path f = dir_ / "t.safetensors";
  save_safetensors(f, tensors, {{"format", "pt"}});
  const auto back = load_safetensors(f);
  ASSERT_EQ(back.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(back.tensors[i].first, tensors[i].first) << "file order is the writer's order";
    EXPECT_EQ(back.tensors[i].second.scalar_type(), tensors[i].second.scalar_type());
    EXPECT_TRUE(torch::equal(back.tensors[i].second, tensors[i].second)) << tensors[i].first;
  }
  EXPECT_EQ(back.metadata.at("format"), "pt");
  EXPECT_EQ(safetensors_bytes(tensors, {{"format", "pt"}}), slurp(f)) << "same input, same bytes";
}

TEST_F(CheckpointFiles, SafetensorsHeaderReadIndependently) {
  const auto tensors = sample_tensors();
  const std::string bytes = safetensors_bytes(tensors);
  // The spec by hand: u64 little-endian N, N bytes of JSON, data 8-byte aligned.
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["a.weight"]["dtype"], "F32");
  EXPECT_EQ(header["a.weight"]["shape"], nlohmann::json::array({3, 4}));
  EXPECT_EQ(header["bf16"]["dtype"], "BF16");
  EXPECT_EQ(header["flags"]["dtype"], "BOOL");
  const auto offs = header["a.weight"]["data_offsets"].get<std::vector<uint64_t>>();
  ASSERT_EQ(offs[1] - offs[0], 48u);
  float first = 0;
  std::memcpy(&first, bytes.data() + 8 + n + offs[0], 4);
  EXPECT_EQ(first, tensors[0].second[0][0].item<float>());
  EXPECT_EQ(8 + n + header["flags"]["data_offsets"][1].get<uint64_t>(), bytes.size());
}

TEST_F(CheckpointFiles, SafetensorsPackageReadsOurFile) {
  const std::string python = test::python();
  if (python.empty()) GTEST_SKIP() << "no venv python";
  const fs::path f = dir_ / "t.safetensors";
  save_safetensors(f, sample_tensors());
  const std::string out = run(python + " -c \"from safetensors.torch import load_file; d = load_file('" + f.string() +
                              "'); print(sorted(d)); print(float(d['a.weight'].sum()), str(d['bf16'].dtype), int(d['long'].sum()))\" 2>&1");
  const auto t = sample_tensors();
  EXPECT_NE(out.find("['a.weight', 'bf16', 'bytes', 'empty', 'flags', 'half', 'long', 'scalar']"), std::string::npos) << out;
  EXPECT_NE(out.find("torch.bfloat16 21"), std::string::npos) << out;
  EXPECT_NEAR(std::stod(out.substr(out.find('\n') + 1)), t[0].second.sum().item<double>(), 1e-4) << out;
}

TEST_F(CheckpointFiles, SafetensorsRejectsMalformedFilesByName) {
  const fs::path f = dir_ / "bad.safetensors";
  std::string bytes = safetensors_bytes(sample_tensors());
  auto expect_error = [&](const std::string& content, const std::string& what) {
    std::ofstream(f, std::ios::binary | std::ios::trunc) << content;
    try {
      load_safetensors(f);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const RuntimeError& e) {
      EXPECT_NE(std::string(e.what()).find(f.string()), std::string::npos) << e.what();
    }
  };
  expect_error("", "empty");
  expect_error(bytes.substr(0, bytes.size() - 1), "truncated data");
  std::string huge = bytes;
  huge[6] = 0x7f;
  expect_error(huge, "header length past the end");
  std::string garbled = bytes;
  garbled[9] = '!';
  expect_error(garbled, "header not JSON");
  // Regression (issue 22, the safetensors fuzz target under UBSan): a float where an integer belongs
  // was converted to int64 out of range, which is undefined behaviour (UBSan reports it under
  // make test-asan); an uninstrumented build rejected the file later anyway.
  for (const std::string entry : {R"({"w":{"dtype":"F32","shape":[3.18447e20],"data_offsets":[0,4]}})",
                                  R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}})",
                                  R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}})"}) {
    std::string header = entry;
    header.append((8 - header.size() % 8) % 8, ' ');
    const uint64_t n = header.size();
    expect_error(std::string(reinterpret_cast<const char*>(&n), 8) + header + std::string(4, '\0'), entry);
  }
}

Checkpoint make_checkpoint(int64_t step) {
  Checkpoint c;
  c.step = step;
  c.config = "{\"run\": {}}\n";
  c.state = R"({"loader": {"epoch": 1, "batch": 2}})";
  c.tensors["model"] = {{"w", torch::full({2, 2}, static_cast<float>(step))}};
  c.tensors["rng"] = {{"cpu", torch::arange(10, torch::kByte)}};
  return c;
}

TEST_F(CheckpointFiles, CheckpointRoundTripWithManifest) {
  const auto path = save_checkpoint(dir_, make_checkpoint(1000));
  EXPECT_EQ(path.filename(), "step_00001000");
  EXPECT_EQ(verify_checkpoint(path), "");
  const auto manifest = nlohmann::json::parse(slurp(path / "manifest.json"));
  EXPECT_EQ(manifest["format"], "difftrain-checkpoint");
  EXPECT_EQ(manifest["version"], kCheckpointFormatVersion);
  for (const auto& [file, info] : manifest["files"].items()) EXPECT_EQ(info["sha256"], sha256_file(path / file)) << file;
  const auto back = load_checkpoint(path);
  EXPECT_EQ(back.step, 1000);
  EXPECT_EQ(nlohmann::json::parse(back.state)["loader"]["batch"], 2);
  EXPECT_EQ(nlohmann::json::parse(back.state)["step"], 1000);
  EXPECT_EQ(back.config, "{\"run\": {}}\n");
  EXPECT_TRUE(torch::equal(back.tensors.at("model")[0].second, torch::full({2, 2}, 1000.0f)));
  for (const auto& e : fs::directory_iterator(dir_)) EXPECT_EQ(e.path().filename().string().rfind(".tmp", 0), std::string::npos);
}

// Generator states are device-specific, so each carries its device type; older checkpoints have
// none, and the type is inferred from whether a "device" state (written only on CUDA) is there.
TEST_F(CheckpointFiles, RngStatesCarryTheirDeviceType) {
  Checkpoint c = make_checkpoint(10);
  c.tensors["rng"] = {{"trainer", torch::zeros({16}, torch::kByte)},
                      {"cpu", torch::zeros({5056}, torch::kByte)},
                      {"device", torch::zeros({16}, torch::kByte)}};
  c.metadata["rng"] = {{"trainer", "cuda"}, {"cpu", "cpu"}, {"device", "cuda"}};
  const auto back = load_checkpoint(save_checkpoint(dir_ / "new", c));
  EXPECT_EQ(back.metadata.at("rng"), c.metadata.at("rng"));
  EXPECT_EQ(rng_state_devices(back),
            (std::map<std::string, std::string>{{"trainer", "cuda"}, {"cpu", "cpu"}, {"device", "cuda"}}));

  Checkpoint legacy = c;  // as written before the record: a "device" state means a CUDA run
  legacy.metadata.clear();
  EXPECT_EQ(rng_state_devices(load_checkpoint(save_checkpoint(dir_ / "legacy_cuda", legacy))),
            (std::map<std::string, std::string>{{"trainer", "cuda"}, {"cpu", "cpu"}, {"device", "cuda"}}));
  legacy.tensors["rng"].pop_back();
  EXPECT_EQ(rng_state_devices(load_checkpoint(save_checkpoint(dir_ / "legacy_cpu", legacy))),
            (std::map<std::string, std::string>{{"trainer", "cpu"}, {"cpu", "cpu"}}));

  c.metadata["rng"]["device"] = "mps";
  try {
    rng_state_devices(c);
    ADD_FAILURE() << "an unknown device type was accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("generator state \"device\" is from device type \"mps\"; known: cpu, cuda"),
              std::string::npos)
        << e.what();
  }
  c.metadata["rng"].erase("device");
  EXPECT_THROW(rng_state_devices(c), CheckpointError);
}

TEST_F(CheckpointFiles, CorruptAndIncompleteCheckpointsAreSkippedByLatest) {
  save_checkpoint(dir_, make_checkpoint(100));
  const auto p200 = save_checkpoint(dir_, make_checkpoint(200));
  const auto p300 = save_checkpoint(dir_, make_checkpoint(300));
  {  // flip one byte of step 300's weights
    std::fstream f(p300 / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x55');
  }
  EXPECT_NE(verify_checkpoint(p300).find("SHA-256"), std::string::npos) << verify_checkpoint(p300);
  fs::remove(p200 / "manifest.json");  // as if killed mid-save without the rename (cannot happen) or tampered
  std::vector<std::string> skipped;
  const auto latest = find_latest_checkpoint(dir_, &skipped);
  ASSERT_TRUE(latest);
  EXPECT_EQ(latest->filename(), "step_00000100");
  EXPECT_EQ(skipped.size(), 2u);
  EXPECT_THROW(load_checkpoint(p300), CheckpointError);
}

// Regression (issue 22, found while writing the manifest's fuzz target): the manifest's file names were joined to the checkpoint path
// unchecked, so a manifest naming "../x.safetensors" with x's true size and SHA-256 verified and
// loaded a file outside the checkpoint. Names must be plain file names; sizes and digests must
// have their types (a string "bytes" used to escape as a JSON type error).
TEST_F(CheckpointFiles, ManifestNamesStayInsideTheCheckpoint) {
  const auto path = save_checkpoint(dir_ / "run", make_checkpoint(100));
  const auto outside = dir_ / "outside.safetensors";
  save_safetensors(outside, {{"w", torch::full({2, 2}, 42.0f)}});
  auto manifest = nlohmann::json::parse(slurp(path / "manifest.json"));
  const auto good = manifest;
  auto write = [&](const nlohmann::json& m) { std::ofstream(path / "manifest.json", std::ios::trunc) << m.dump(2); };
  const std::string content = slurp(outside);
  for (const std::string name : {"../../outside.safetensors", "/etc/passwd", "..", ".", "sub/model.safetensors", ""}) {
    manifest = good;
    manifest["files"][name] = {{"bytes", content.size()}, {"sha256", sha256_hex(content.data(), content.size())}};
    write(manifest);
    EXPECT_NE(verify_checkpoint(path).find("not a plain file name"), std::string::npos)
        << name << ": " << verify_checkpoint(path);
    EXPECT_THROW(load_checkpoint(path), CheckpointError) << name;
  }
  for (const nlohmann::json& info :
       {nlohmann::json{{"bytes", "12"}, {"sha256", std::string(64, 'a')}},
        nlohmann::json{{"bytes", -1}, {"sha256", std::string(64, 'a')}}, nlohmann::json{{"bytes", 1}, {"sha256", "abc"}},
        nlohmann::json{{"bytes", 1}}, nlohmann::json(3)}) {
    manifest = good;
    manifest["files"]["model.safetensors"] = info;
    write(manifest);
    EXPECT_NE(verify_checkpoint(path).find("files.model.safetensors: not {\"bytes\""), std::string::npos)
        << info.dump() << ": " << verify_checkpoint(path);
  }
  manifest = good;
  manifest["version"] = "1";
  write(manifest);
  EXPECT_EQ(verify_checkpoint(path), "checkpoint format version \"1\"; this difftrain reads version 1");
  write(good);
  EXPECT_EQ(verify_checkpoint(path), "");
  EXPECT_EQ(parse_checkpoint_manifest(slurp(path / "manifest.json")).size(), good["files"].size());
}

// Regression (issue 22, found while splitting out the header parser): a tensor with no elements has no data; reading one must not pass
// its null data pointer to memcpy. Its header entry has equal offsets, also at the end of the data.
TEST_F(CheckpointFiles, SafetensorsWithEmptyTensorsRoundTrip) {
  const NamedTensors tensors = {
      {"empty", torch::zeros({0, 3})}, {"w", torch::arange(6, torch::kFloat)}, {"last", torch::zeros({2, 0}, torch::kByte)}};
  save_safetensors(dir_ / "e.safetensors", tensors);
  const auto back = load_safetensors(dir_ / "e.safetensors");
  ASSERT_EQ(back.tensors.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(back.tensors[i].first, tensors[i].first);
    EXPECT_TRUE(torch::equal(back.tensors[i].second, tensors[i].second)) << tensors[i].first;
  }
  const auto header = parse_safetensors_header(slurp(dir_ / "e.safetensors"), "e");
  ASSERT_EQ(header.entries.size(), 3u);
  EXPECT_EQ(header.entries.back().begin, header.entries.back().end);
  EXPECT_EQ(header.entries.back().end, 24u);  // 6 floats of data in all
}

TEST_F(CheckpointFiles, RotationKeepsTheLastKAndEveryNth) {
  for (int64_t s = 100; s <= 1000; s += 100) save_checkpoint(dir_, make_checkpoint(s));
  const auto deleted = rotate_checkpoints(dir_, /*keep_last=*/3, /*keep_every=*/400);
  std::vector<int64_t> left;
  for (const auto& [step, path] : list_checkpoints(dir_)) left.push_back(step);
  EXPECT_EQ(left, (std::vector<int64_t>{1000, 900, 800, 400}));
  EXPECT_EQ(deleted.size(), 6u);
}

TEST_F(CheckpointFiles, ReplacingAStepAndRecoveringInterruptedSaves) {
  save_checkpoint(dir_, make_checkpoint(100));
  auto c = make_checkpoint(100);
  c.tensors["model"][0].second.fill_(7.0);
  const auto path = save_checkpoint(dir_, c);
  EXPECT_TRUE(torch::equal(load_checkpoint(path).tensors.at("model")[0].second, torch::full({2, 2}, 7.0f)));

  // A save killed between its renames leaves .old-step_X-PID and no step_X: the old copy comes back.
  fs::rename(path, dir_ / ".old-step_00000100-123");
  fs::create_directory(dir_ / ".tmp-step_00000200-123");  // a save killed while writing
  EXPECT_EQ(remove_interrupted_saves(dir_), 1);
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(dir_ / ".tmp-step_00000200-123"));
  EXPECT_EQ(verify_checkpoint(path), "");
}

}  // namespace
}  // namespace difftrain

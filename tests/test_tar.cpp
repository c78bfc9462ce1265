// The tar reader and writer (tar.h) against Python's tarfile, the reference implementation that
// webdataset itself writes with: each reads what the other wrote, in the pax, GNU and ustar
// formats, long names included; and damaged archives are errors naming the archive and offset.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "difftrain/tar.h"
#include "temp_dir.h"
#include "test_paths.h"

namespace difftrain::formats {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

class Tar : public test::TempDirTest {
 protected:
  Tar() : TempDirTest("tar") {}

  // Members of every size class around the 512-byte block, and a name past ustar's 100 bytes.
  static std::vector<std::pair<std::string, std::vector<uint8_t>>> members() {
    std::vector<std::pair<std::string, std::vector<uint8_t>>> m;
    m.emplace_back("000001.png", bytes_of("\x89PNG not really"));
    m.emplace_back("000001.cls", bytes_of("7"));
    m.emplace_back("empty.txt", std::vector<uint8_t>{});
    for (size_t n : {511, 512, 513, 4096}) {
      std::vector<uint8_t> d(n);
      for (size_t i = 0; i < n; ++i) d[i] = static_cast<uint8_t>((i * 31 + n) & 0xff);
      m.emplace_back("sizes/" + std::to_string(n) + ".bin", d);
    }
    m.emplace_back(std::string(120, 'd') + "/" + std::string(90, 'n') + ".json", bytes_of("{\"label\": 3}"));
    return m;
  }

  std::string write_ours(const std::string& name) {
    const auto path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    TarWriter w(out, path);
    for (const auto& [n, d] : members()) w.add(n, d.data(), d.size());
    w.finish();
    return path;
  }

  // Runs a Python script with the venv's python; its stdout parsed as JSON.
  nlohmann::json python_json(const std::string& script) {
    const auto py = dir_ / "script.py", out = dir_ / "out.json";
    std::ofstream(py) << script;
    const std::string cmd = test::python() + " " + py.string() + " > " + out.string() + " 2>&1";
    std::ifstream in(out);
    const int rc = std::system(cmd.c_str());
    std::stringstream text;
    text << std::ifstream(out).rdbuf();
    EXPECT_EQ(rc, 0) << text.str();
    return rc == 0 ? nlohmann::json::parse(text.str()) : nlohmann::json();
  }
};

TEST_F(Tar, RoundTripsAndWritesTheSameBytesTwice) {
  const auto a = write_ours("a.tar"), b = write_ours("b.tar");
  const auto read = read_tar_file(a);
  const auto expected = members();
  ASSERT_EQ(read.size(), expected.size());
  for (size_t i = 0; i < read.size(); ++i) {
    EXPECT_EQ(read[i].first.name, expected[i].first);
    EXPECT_EQ(read[i].first.size, expected[i].second.size());
    EXPECT_EQ(read[i].first.offset % 512, 0u);
    EXPECT_EQ(read[i].second, expected[i].second) << expected[i].first;
  }
  std::stringstream sa, sb;
  sa << std::ifstream(a, std::ios::binary).rdbuf();
  sb << std::ifstream(b, std::ios::binary).rdbuf();
  EXPECT_EQ(sa.str(), sb.str());
  EXPECT_EQ(sa.str().size() % 512, 0u);
}

TEST_F(Tar, PythonTarfileReadsOurs) {
  if (test::python().empty()) GTEST_SKIP() << "no venv python";
  const auto path = write_ours("ours.tar");
  const auto got = python_json(
      "import json, tarfile\n"
      "with tarfile.open('" +
      path +
      "') as t:\n"
      "    print(json.dumps([[m.name, t.extractfile(m).read().hex()] for m in t.getmembers()]))\n");
  const auto expected = members();
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(got[i][0].get<std::string>(), expected[i].first);
    std::string hex;
    for (uint8_t b : expected[i].second) hex += fmt::format("{:02x}", b);
    EXPECT_EQ(got[i][1].get<std::string>(), hex) << expected[i].first;
  }
}

TEST_F(Tar, WeReadPythonTarfilesInEveryFormat) {
  if (test::python().empty()) GTEST_SKIP() << "no venv python";
  // Regular files with short and long names, a directory and a symlink (passed over), a
  // pax-only non-ASCII name, and a 70 KB member; in each of tarfile's three formats.
  const auto got = python_json(
      "import io, json, tarfile\n"
      "files = [('a/000001.jpg', b'x' * 70000), ('a/000001.cls', b'3'), ('d' * 60 + '/' + 'n' * 80 + '.png', b'long'),\n"
      "         ('e' * 150 + '.json', b'{}'), ('caf\\u00e9.txt', b'pax only')]\n"
      "out = {}\n"
      "for fmt, name in [(tarfile.PAX_FORMAT, 'pax'), (tarfile.GNU_FORMAT, 'gnu'), (tarfile.USTAR_FORMAT, 'ustar')]:\n"
      "    path = '" +
      dir_.string() +
      "/' + name + '.tar'\n"
      "    written = []\n"
      "    with tarfile.open(path, 'w', format=fmt) as t:\n"
      "        d = tarfile.TarInfo('a'); d.type = tarfile.DIRTYPE; t.addfile(d)\n"
      "        s = tarfile.TarInfo('link'); s.type = tarfile.SYMTYPE; s.linkname = 'a/000001.jpg'; t.addfile(s)\n"
      "        for n, data in files:\n"
      "            info = tarfile.TarInfo(n); info.size = len(data)\n"
      "            try:\n"
      "                t.addfile(info, io.BytesIO(data)); written.append([n, data.hex()])\n"
      "            except ValueError:\n"
      "                pass  # a name this format cannot hold\n"
      "    out[name] = [path, written]\n"
      "print(json.dumps(out))\n");
  ASSERT_EQ(got.size(), 3u);
  for (const auto& [format, entry] : got.items()) {
    const auto read = read_tar_file(entry[0].get<std::string>());
    const auto& written = entry[1];
    ASSERT_EQ(read.size(), written.size()) << format;
    for (size_t i = 0; i < read.size(); ++i) {
      EXPECT_EQ(read[i].first.name, written[i][0].get<std::string>()) << format;
      std::string hex;
      for (uint8_t b : read[i].second) hex += fmt::format("{:02x}", b);
      EXPECT_EQ(hex, written[i][1].get<std::string>()) << format << " " << read[i].first.name;
    }
    if (format != "ustar") {
      EXPECT_EQ(read.size(), 5u) << format;  // pax and GNU hold every name
    }
  }
}

TEST_F(Tar, DamageIsANamedErrorWithItsOffset) {
  const auto path = write_ours("good.tar");
  std::stringstream whole;
  whole << std::ifstream(path, std::ios::binary).rdbuf();
  const std::string good = whole.str();
  auto expect_error = [](const std::string& bytes, const std::string& what, uint64_t max_member = uint64_t{1} << 32) {
    std::istringstream in(bytes);
    TarReader r(in, "shard-000007.tar", max_member);
    TarMember m;
    try {
      while (r.next(m)) r.read_data();
      ADD_FAILURE() << "no error; expected " << what;
    } catch (const FormatError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("shard-000007.tar"), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
    }
  };
  std::string bad = good;
  bad[10] ^= 1;  // a name byte: the checksum no longer matches
  expect_error(bad, "header checksum mismatch (offset 0");
  expect_error(good.substr(0, 300), "truncated header: 300 of 512 bytes (offset 300");
  expect_error(good.substr(0, 512 + 5), "truncated member data: 5 of 15 bytes (offset 517");
  bad = good;
  bad[124] = 'z';  // the size field, under a checksum recomputed (POSIX: field counted as spaces)
  unsigned sum = 0;
  for (int i = 0; i < 512; ++i) sum += i >= 148 && i < 156 ? ' ' : static_cast<unsigned char>(bad[static_cast<size_t>(i)]);
  std::snprintf(bad.data() + 148, 8, "%06o", sum);
  expect_error(bad, "bad size field in the header (offset 124");
  expect_error(good, "member of 4096 bytes, more than the 1000 allowed", 1000);
  expect_error(std::string(512, 'x'), "header checksum mismatch");
  // The end of the stream on a block boundary, without the two zero blocks, is a clean end.
  std::istringstream in(good.substr(0, 512 + 512));
  TarReader r(in, "cut.tar");
  TarMember m;
  ASSERT_TRUE(r.next(m));
  EXPECT_EQ(m.name, "000001.png");
  EXPECT_EQ(r.read_data(), bytes_of("\x89PNG not really"));
  EXPECT_FALSE(r.next(m));
}

TEST(WdsName, KeyIsUpToTheFirstDotOfTheBaseName) {
  EXPECT_EQ(split_wds_name("a/b.c.PNG").key, "a/b");
  EXPECT_EQ(split_wds_name("a/b.c.PNG").extension, "c.png");
  EXPECT_EQ(split_wds_name("dir.v2/000123.jpg").key, "dir.v2/000123");
  EXPECT_EQ(split_wds_name("dir.v2/000123.jpg").extension, "jpg");
  EXPECT_EQ(split_wds_name("noext").key, "noext");
  EXPECT_EQ(split_wds_name("noext").extension, "");
}

}  // namespace
}  // namespace difftrain::formats

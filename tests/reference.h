// Reference tensors from diffusers, made at test time by tests/reference/make_reference.py with
// the venv's Python (the same torch version), once per test process.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/jit/serialization/pickle.h>

#include "test_paths.h"

namespace difftrain::test {

// Directory with the reference files, or "" when they are missing and there is no venv Python to
// make them (the caller skips). ctest makes them first (the make_reference fixture); a test run by
// hand makes them if missing. Files made elsewhere (DIFFTRAIN_TEST_REFERENCE_DIR) need no Python.
inline std::string reference_dir() {
  static const std::string dir = [] {
    const std::string python = test::python();
    const std::filesystem::path out = test::reference_output_dir();
    const std::filesystem::path script = test::source_dir() + "/tests/reference/make_reference.py";
    std::error_code ec;  // scheduler.json is written last; older than the script means stale
    const auto made = std::filesystem::last_write_time(out / "scheduler.json", ec);
    if (!ec) {
      const auto script_time = std::filesystem::last_write_time(script, ec);
      if (ec || made >= script_time) return out.string();  // no script here (a carried build): take them as they are
    }
    if (python.empty()) return std::string();
    const std::string cmd = python + " " + script.string() + " " + out.string() +
                            " >" + out.string() + ".log 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      std::ifstream log(out.string() + ".log");
      ADD_FAILURE() << "make_reference.py failed:\n" << std::string(std::istreambuf_iterator<char>(log), {});
      return std::string();
    }
    return out.string();
  }();
  return dir;
}

inline nlohmann::json load_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// A dict of tensors written by torch.save.
inline std::map<std::string, at::Tensor> load_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  std::map<std::string, at::Tensor> out;
  for (const auto& item : torch::pickle_load(bytes).toGenericDict())
    out[item.key().toStringRef()] = item.value().toTensor();
  return out;
}

#define DIFFTRAIN_REQUIRE_REFERENCE(dir)                                            \
  const std::string dir = ::difftrain::test::reference_dir();                      \
  if (dir.empty()) GTEST_SKIP() << "no venv python with diffusers (make test installs it)"

}  // namespace difftrain::test

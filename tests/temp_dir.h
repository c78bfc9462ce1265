// A test fixture with its own empty directory, made before each test and removed after it:
// <tmp>/difftrain_<tag>_<pid>_<test name>, so that tests running in parallel (ctest -j, several
// checkouts) never share one. keep_on_failure leaves it for a look when the test failed.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

namespace difftrain::test {

class TempDirTest : public ::testing::Test {
 protected:
  explicit TempDirTest(std::string tag, bool keep_on_failure = false) : tag_(std::move(tag)), keep_(keep_on_failure) {}
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("difftrain_" + tag_ + "_" + std::to_string(::getpid()) + "_" +
                                                     ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    if (!(keep_ && HasFailure())) std::filesystem::remove_all(dir_);
  }
  std::filesystem::path dir_;

 private:
  std::string tag_;
  bool keep_;
};

}  // namespace difftrain::test

// Shared by the tests that train or need a GPU: a small decoded dataset made from a fixed LCG
// (no files), and the skip for tests that need CUDA.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>

#include <gtest/gtest.h>

#include "difftrain/data.h"
#include "difftrain/env.h"

namespace difftrain::test {

// n random gray images (resolution x resolution) with labels 0..9, as a decoded dataset.
inline std::shared_ptr<Dataset> stand_in_data(int64_t n, int64_t resolution) {
  formats::ImageArray a;
  a.count = n, a.channels = 1, a.height = a.width = resolution;
  a.pixels.resize(static_cast<size_t>(n * resolution * resolution));
  uint32_t s = 12345;
  for (auto& p : a.pixels) p = static_cast<uint8_t>((s = s * 1664525u + 1013904223u) >> 24);
  for (int64_t i = 0; i < n; ++i) a.labels.push_back(i % 10);
  return std::make_shared<ArrayDataset>(std::move(a), 10, "stand-in");
}

}  // namespace difftrain::test

// Skips the test, with the reason, where CUDA is not usable (so CPU CI stays green).
#define DIFFTRAIN_REQUIRE_CUDA()                                                                                          \
  do {                                                                                                                    \
    const auto env_ = ::difftrain::collect_env();                                                                         \
    if (env_.cuda.state != ::difftrain::CudaState::ok)                                                                    \
      GTEST_SKIP() << "CUDA is not usable here (" << ::difftrain::to_string(env_.cuda.state)                              \
                   << (env_.cuda.detail.empty() ? "" : ": ") << env_.cuda.detail << ")";                                  \
  } while (0)

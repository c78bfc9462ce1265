// Every path a test uses, baked in at build time (tests/CMakeLists.txt) and each overridable by
// an environment variable, so the test binaries also run where the build tree is not (carried to
// a GPU machine at another path). README "Tests" lists the variables.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <string>

namespace difftrain::test {

// The variable's value when it is set (even to "": DIFFTRAIN_TEST_PYTHON= means no Python), else
// the value baked in.
inline std::string path_from_env(const char* variable, const char* built_in) {
  const char* v = std::getenv(variable);
  return v ? std::string(v) : std::string(built_in);
}

// The source tree: configs/, scripts/, docs/, tests/*/*.py.
inline std::string source_dir() { return path_from_env("DIFFTRAIN_TEST_SOURCE_DIR", DIFFTRAIN_SOURCE_DIR); }
// The difftrain executable the e2e tests run.
inline std::string difftrain_bin() { return path_from_env("DIFFTRAIN_TEST_BIN", DIFFTRAIN_BIN); }
// The venv's python (diffusers, tensorboard, torchrun next to it); "" = none, those tests skip.
inline std::string python() { return path_from_env("DIFFTRAIN_TEST_PYTHON", DIFFTRAIN_PYTHON); }
// Where tests/reference/make_reference.py writes (or has written) the diffusers reference tensors.
inline std::string reference_output_dir() { return path_from_env("DIFFTRAIN_TEST_REFERENCE_DIR", DIFFTRAIN_REFERENCE_DIR); }
// Fashion-MNIST in IDX files (Debian's dataset-fashion-mnist), the data of every training test.
inline std::string fashion_mnist_dir() { return path_from_env("DIFFTRAIN_TEST_DATA", "/usr/share/datasets/fashion-mnist"); }

// A rendezvous port for this test process (offset 0-7 for its several jobs): per process, so that
// parallel ctest runs do not collide, and below Linux's ephemeral range (32768-60999 by default,
// /proc/sys/net/ipv4/ip_local_port_range), where the kernel picks the ports of outgoing
// connections; a port there can be taken by any client meanwhile (a CI run failed with
// EADDRINUSE on 34934).
inline int rendezvous_port(int offset) { return 10000 + static_cast<int>(::getpid() % 2700) * 8 + offset; }

// Under a sanitizer (scripts/test-sanitized.sh exports these) processes start and run several times
// slower: margins that cover a process's start-up scale by DIFFTRAIN_TEST_TIME_SCALE (default 1);
// DIFFTRAIN_TEST_SANITIZER names the sanitizer ("asan", "tsan"; empty otherwise).
inline double time_scale() {
  const char* v = std::getenv("DIFFTRAIN_TEST_TIME_SCALE");
  return v && std::atof(v) >= 1 ? std::atof(v) : 1.0;
}
inline std::string sanitizer() {
  const char* v = std::getenv("DIFFTRAIN_TEST_SANITIZER");
  return v ? v : "";
}

}  // namespace difftrain::test

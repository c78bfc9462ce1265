# Every third-party dependency is found here, once. All come from Debian packages
# (scripts/install-deps.sh names them); LibTorch is found in Torch.cmake.
find_package(nlohmann_json 3.10 REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(Threads REQUIRED)
if(DIFFTRAIN_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# Gloo's headers (Debian's libgloo-dev), for c10d's ProcessGroupGloo.hpp. LibTorch carries the
# Gloo library itself, so nothing is linked: the headers only declare what libtorch_cpu defines.
# ProcessGroupGloo.hpp compiles against this older Gloo (its newer Store v2 methods sit behind
# GLOO_STORE_HAS_STORE_V2, which this Gloo does not define).
find_path(DIFFTRAIN_GLOO_INCLUDE_DIR gloo/rendezvous/store.h REQUIRED)

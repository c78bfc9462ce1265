# Every third-party dependency is found here, once. All come from Debian packages
# (scripts/install-deps.sh names them); LibTorch is found in Torch.cmake.
find_package(nlohmann_json 3.10 REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(Threads REQUIRED)
if(DIFFTRAIN_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()

# Finds LibTorch once and records whether it was built with CUDA.
# Sources, in order: Torch_DIR / CMAKE_PREFIX_PATH given by the user (a PyTorch install,
# the official LibTorch archive), else the project venv's torch (scripts/install-deps.sh).
set(DIFFTRAIN_MIN_TORCH_VERSION 2.4.0)

if(NOT Torch_DIR AND NOT CMAKE_PREFIX_PATH)
  find_program(DIFFTRAIN_VENV_PYTHON python NO_DEFAULT_PATH
               PATHS ${CMAKE_SOURCE_DIR}/.venv/bin)
  if(DIFFTRAIN_VENV_PYTHON)
    execute_process(
      COMMAND ${DIFFTRAIN_VENV_PYTHON} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _torch_rc ERROR_QUIET)
    if(_torch_rc EQUAL 0)
      list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})
    endif()
  endif()
endif()

# A CUDA LibTorch enables the CUDA language: nvcc takes C++17 at most here, and the target
# architectures are set rather than probed (no GPU on build machines). Hopper (9.0) by default.
set(CMAKE_CUDA_STANDARD 17)
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "9.0" CACHE STRING "CUDA architectures for CUDA sources (e.g. \"8.0;9.0\")")
endif()

find_package(Torch REQUIRED)
if(Torch_VERSION VERSION_LESS DIFFTRAIN_MIN_TORCH_VERSION)
  message(FATAL_ERROR "difftrain needs LibTorch >= ${DIFFTRAIN_MIN_TORCH_VERSION}; found ${Torch_VERSION} at ${Torch_DIR}")
endif()

# TorchConfig puts its compile flags (the CXX11 ABI define) in TORCH_CXX_FLAGS.
separate_arguments(DIFFTRAIN_TORCH_CXX_FLAGS UNIX_COMMAND "${TORCH_CXX_FLAGS}")

# difftrain::torch: LibTorch for our targets. libtorch.so exports its own copy of parts of
# std::filesystem (built with a newer GCC) that crashes when called against the system libstdc++
# (remove_all jumps to a null pointer). Putting libstdc++ ahead of LibTorch in the link line makes
# the dynamic linker resolve std:: symbols in libstdc++ first.
add_library(difftrain_torch INTERFACE)
add_library(difftrain::torch ALIAS difftrain_torch)
target_link_libraries(difftrain_torch INTERFACE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state" ${TORCH_LIBRARIES})

if(TARGET torch_cuda OR TARGET c10_cuda OR CAFFE2_USE_CUDA)
  set(DIFFTRAIN_WITH_CUDA ON)
else()
  set(DIFFTRAIN_WITH_CUDA OFF)
endif()
message(STATUS "difftrain: LibTorch ${Torch_VERSION} at ${Torch_DIR} (CUDA: ${DIFFTRAIN_WITH_CUDA})")

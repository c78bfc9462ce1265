# Finds LibTorch once and records whether it was built with CUDA.
# Sources, in order: Torch_DIR / CMAKE_PREFIX_PATH given by the user (a PyTorch install,
# the official LibTorch archive), else the project venv's torch (scripts/install-deps.sh).
# 2.7 is the first release whose Linux wheels use the C++11 ABI, which Debian's spdlog and
# GoogleTest are built with; older LibTorch archives in their cxx11-abi flavour may work but are untested.
set(DIFFTRAIN_MIN_TORCH_VERSION 2.7.0)

set(DIFFTRAIN_VENV "${CMAKE_SOURCE_DIR}/.venv" CACHE PATH "The project venv (scripts/install-deps.sh)")
if(NOT Torch_DIR AND NOT CMAKE_PREFIX_PATH)
  find_program(DIFFTRAIN_VENV_PYTHON python NO_DEFAULT_PATH
               PATHS ${DIFFTRAIN_VENV}/bin)
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

# A CUDA LibTorch needs a CUDA toolkit (nvcc, headers) at configure time. When the machine has
# none (no /usr/local/cuda, no nvcc on PATH, nothing given), use the one pip installed into the
# venv next to torch (cuda-toolkit[nvcc,crt,nvvm,cccl] in scripts/requirements.txt), laid out
# as a toolkit directory (bin/, include/, lib64/, nvvm/) under the build tree.
function(difftrain_use_pip_cuda_toolkit)
  if(CMAKE_CUDA_COMPILER OR CUDAToolkit_ROOT OR CUDA_TOOLKIT_ROOT_DIR OR DEFINED ENV{CUDACXX})
    return()
  endif()
  find_program(_system_nvcc nvcc PATHS $ENV{CUDA_HOME}/bin /usr/local/cuda/bin NO_CACHE)
  if(_system_nvcc)
    execute_process(COMMAND "${_system_nvcc}" --version RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_QUIET)
    if(_rc EQUAL 0)
      return()
    endif()
  endif()
  set(_candidates "")
  foreach(_prefix IN LISTS CMAKE_PREFIX_PATH)  # <site-packages>/torch/share/cmake
    get_filename_component(_site "${_prefix}/../../.." ABSOLUTE)
    file(GLOB _found "${_site}/nvidia/cu*/bin/nvcc")
    list(APPEND _candidates ${_found})
  endforeach()
  if(NOT _candidates)
    return()
  endif()
  list(GET _candidates 0 _nvcc)
  get_filename_component(_cu "${_nvcc}/../.." ABSOLUTE)
  set(_tk "${CMAKE_BINARY_DIR}/pip-cuda-toolkit")
  file(MAKE_DIRECTORY "${_tk}/bin" "${_tk}/lib64")
  foreach(_dir bin lib)  # files linked one by one: nvcc finds its tree through bin/.. and lib64
    set(_dest "${_dir}")
    if(_dir STREQUAL "lib")
      set(_dest "lib64")
    endif()
    file(GLOB _files "${_cu}/${_dir}/*")
    foreach(_f IN LISTS _files)
      get_filename_component(_name "${_f}" NAME)
      if(NOT EXISTS "${_tk}/${_dest}/${_name}")
        file(CREATE_LINK "${_f}" "${_tk}/${_dest}/${_name}" SYMBOLIC)
      endif()
    endforeach()
  endforeach()
  foreach(_dir include nvvm)
    if(NOT EXISTS "${_tk}/${_dir}")
      file(CREATE_LINK "${_cu}/${_dir}" "${_tk}/${_dir}" SYMBOLIC)
    endif()
  endforeach()
  file(GLOB _sonames "${_cu}/lib/*.so.*")  # libcudart.so -> libcudart.so.13, for -lcudart
  foreach(_f IN LISTS _sonames)
    get_filename_component(_name "${_f}" NAME)
    string(REGEX REPLACE "\\.so\\..*$" ".so" _dev "${_name}")
    if(NOT EXISTS "${_tk}/lib64/${_dev}")
      file(CREATE_LINK "${_f}" "${_tk}/lib64/${_dev}" SYMBOLIC)
    endif()
  endforeach()
  message(STATUS "difftrain: no system CUDA toolkit; using the venv's pip toolkit at ${_cu}")
  set(CUDA_TOOLKIT_ROOT_DIR "${_tk}" CACHE PATH "CUDA toolkit" FORCE)
  set(CUDAToolkit_ROOT "${_tk}" CACHE PATH "CUDA toolkit" FORCE)
  set(CMAKE_CUDA_COMPILER "${_tk}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
endfunction()
difftrain_use_pip_cuda_toolkit()

find_package(Torch REQUIRED)
if(Torch_VERSION VERSION_LESS DIFFTRAIN_MIN_TORCH_VERSION)
  message(FATAL_ERROR "difftrain needs LibTorch >= ${DIFFTRAIN_MIN_TORCH_VERSION}; found ${Torch_VERSION} at ${Torch_DIR}")
endif()

# TorchConfig puts its compile flags (the CXX11 ABI define) in TORCH_CXX_FLAGS.
separate_arguments(DIFFTRAIN_TORCH_CXX_FLAGS UNIX_COMMAND "${TORCH_CXX_FLAGS}")
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
  message(FATAL_ERROR "LibTorch at ${Torch_DIR} uses the pre-C++11 ABI (_GLIBCXX_USE_CXX11_ABI=0); difftrain links "
                      "system libraries built with the C++11 ABI. Use a PyTorch >= 2.7 wheel or a cxx11-abi LibTorch archive.")
endif()

# difftrain::torch: LibTorch for our targets. libtorch.so exports its own copy of parts of
# std::filesystem (built with a newer GCC) that crashes when called against the system libstdc++
# (remove_all jumps to a null pointer; pytorch/pytorch#133437). Putting libstdc++ ahead of LibTorch in the link line makes
# the dynamic linker resolve std:: symbols in libstdc++ first.
# It is installed as difftrain::torch: the exported target keeps the libstdc++ flags, and the
# installed difftrainConfig.cmake appends the TORCH_LIBRARIES of the consumer's find_package(Torch)
# (TORCH_LIBRARIES holds absolute paths into this LibTorch, which must not be baked in).
add_library(difftrain_torch INTERFACE)
add_library(difftrain::torch ALIAS difftrain_torch)
set_target_properties(difftrain_torch PROPERTIES EXPORT_NAME torch)
target_link_libraries(difftrain_torch INTERFACE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state")

if(TARGET torch_cuda OR TARGET c10_cuda OR CAFFE2_USE_CUDA)
  set(DIFFTRAIN_TORCH_HAS_CUDA ON)
else()
  set(DIFFTRAIN_TORCH_HAS_CUDA OFF)
endif()
# DIFFTRAIN_CUDA=OFF builds a CPU-only difftrain from a CUDA LibTorch (the PyPI wheel): it links
# LibTorch's CPU libraries alone (libtorch_cpu, libc10; libtorch_cpu still needs the small
# libcudart and libcupti), so it runs without the 2 GB of CUDA libraries that libtorch_cuda
# loads, as in the slim CPU image (docker/Dockerfile). --device cuda is then refused.
option(DIFFTRAIN_CUDA "Build the CUDA code paths when LibTorch is a CUDA build (OFF: a CPU-only binary)" ON)
set(DIFFTRAIN_TORCH_LIBRARIES ${TORCH_LIBRARIES})
if(DIFFTRAIN_TORCH_HAS_CUDA AND DIFFTRAIN_CUDA)
  set(DIFFTRAIN_WITH_CUDA ON)
else()
  set(DIFFTRAIN_WITH_CUDA OFF)
  if(DIFFTRAIN_TORCH_HAS_CUDA)
    if(NOT TARGET torch_cpu_library OR NOT TARGET c10)
      message(FATAL_ERROR "DIFFTRAIN_CUDA=OFF: the LibTorch at ${Torch_DIR} has no torch_cpu_library/c10 targets to link alone")
    endif()
    set(DIFFTRAIN_TORCH_LIBRARIES torch_cpu_library c10)
    foreach(_dir IN LISTS TORCH_INCLUDE_DIRS)  # the C++ API's headers: on the `torch` target only
      target_include_directories(difftrain_torch SYSTEM INTERFACE $<BUILD_INTERFACE:${_dir}>)
    endforeach()
  endif()
endif()
foreach(_lib IN LISTS DIFFTRAIN_TORCH_LIBRARIES)
  target_link_libraries(difftrain_torch INTERFACE $<BUILD_INTERFACE:${_lib}>)
endforeach()
message(STATUS "difftrain: LibTorch ${Torch_VERSION} at ${Torch_DIR} (CUDA build: ${DIFFTRAIN_TORCH_HAS_CUDA}; "
               "difftrain's CUDA paths: ${DIFFTRAIN_WITH_CUDA})")
# The NCCL backend of a CUDA LibTorch (src/CMakeLists.txt finds nccl.h or stops).
include(CMakeDependentOption)
cmake_dependent_option(DIFFTRAIN_WITH_NCCL "Build the NCCL backend (multi-GPU training); needs nccl.h" ON "DIFFTRAIN_WITH_CUDA" OFF)

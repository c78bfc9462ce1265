# `cmake --install build --prefix P` (or `make install PREFIX=P`):
#   P/bin/difftrain                      the CLI, with an RPATH to the LibTorch it was built against
#   P/include/difftrain/*.h              the public headers and the generated version.h
#   P/lib/libdifftrain_*.a               difftrain_core and the helper libraries it links
#   P/lib/cmake/difftrain/               difftrainConfig.cmake, its version file and the exported targets:
#                                        find_package(difftrain CONFIG) then link difftrain::core
include(CMakePackageConfigHelpers)

set(DIFFTRAIN_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/difftrain CACHE STRING
    "Where the CMake package files go, relative to the prefix")

# The installed CLI finds LibTorch (and the CUDA runtime it links) where it was built against:
# the directory of every library on its link line outside the system's (resolved when the build
# linked through the symlinked pip CUDA toolkit under build/, which an install must not point into).
# LibTorch's own libraries carry RUNPATHs to the NVIDIA wheels they load.
set(_rpath "")
foreach(_lib IN LISTS DIFFTRAIN_TORCH_LIBRARIES)
  if(IS_ABSOLUTE "${_lib}" AND EXISTS "${_lib}")
    list(APPEND _rpath "${_lib}")
  elseif(TARGET "${_lib}")
    get_target_property(_imported "${_lib}" IMPORTED)
    if(_imported)
      get_target_property(_loc "${_lib}" IMPORTED_LOCATION)
      if(NOT _loc)
        get_target_property(_loc "${_lib}" IMPORTED_LOCATION_RELEASE)
      endif()
      if(_loc)
        list(APPEND _rpath "${_loc}")
      endif()
    endif()
  endif()
endforeach()
if(DIFFTRAIN_WITH_CUDA AND TARGET CUDA::cudart)
  get_target_property(_loc CUDA::cudart IMPORTED_LOCATION)
  if(_loc)
    list(APPEND _rpath "${_loc}")
  endif()
endif()
set(DIFFTRAIN_INSTALL_RPATH "")
foreach(_file IN LISTS _rpath)
  get_filename_component(_dir "${_file}" DIRECTORY)
  string(FIND "${_dir}" "${PROJECT_BINARY_DIR}/" _in_build)
  if(_in_build EQUAL 0)  # a symlink under build/ (pip-cuda-toolkit): where it points
    get_filename_component(_real "${_file}" REALPATH)
    get_filename_component(_dir "${_real}" DIRECTORY)
  endif()
  if(NOT _dir IN_LIST CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES AND NOT _dir IN_LIST DIFFTRAIN_INSTALL_RPATH)
    list(APPEND DIFFTRAIN_INSTALL_RPATH "${_dir}")
  endif()
endforeach()
set_target_properties(difftrain PROPERTIES INSTALL_RPATH "${DIFFTRAIN_INSTALL_RPATH}")
message(STATUS "difftrain: installed binary's RPATH: ${DIFFTRAIN_INSTALL_RPATH}")

install(TARGETS difftrain RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# A sanitized build's static libraries need the sanitizer runtimes wherever they are linked: the
# link option travels with the exported targets (the install_package test links a consumer).
if(DIFFTRAIN_SANITIZERS)
  foreach(_t difftrain_core difftrain_log difftrain_formats difftrain_metrics difftrain_util)
    target_link_options(${_t} INTERFACE -fsanitize=${DIFFTRAIN_SANITIZERS})
  endforeach()
endif()
install(TARGETS difftrain_core difftrain_log difftrain_formats difftrain_metrics difftrain_util difftrain_torch
        EXPORT difftrainTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
set_target_properties(difftrain_core PROPERTIES EXPORT_NAME core)
set_target_properties(difftrain_log PROPERTIES EXPORT_NAME log)
set_target_properties(difftrain_formats PROPERTIES EXPORT_NAME formats)
set_target_properties(difftrain_metrics PROPERTIES EXPORT_NAME metrics)
set_target_properties(difftrain_util PROPERTIES EXPORT_NAME util)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/difftrain DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h")
install(FILES ${PROJECT_BINARY_DIR}/generated/difftrain/version.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/difftrain)

install(EXPORT difftrainTargets NAMESPACE difftrain:: DESTINATION ${DIFFTRAIN_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/difftrainConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/difftrainConfig.cmake
                              INSTALL_DESTINATION ${DIFFTRAIN_INSTALL_CMAKEDIR})
# 0.x: a minor release may break the API, so a consumer asking for 0.1 accepts 0.1.y only.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/difftrainConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/difftrainConfig.cmake ${PROJECT_BINARY_DIR}/difftrainConfigVersion.cmake
        DESTINATION ${DIFFTRAIN_INSTALL_CMAKEDIR})

# -DDIFFTRAIN_SANITIZERS=address,undefined builds every target with those sanitizers.
if(DIFFTRAIN_SANITIZERS)
  string(REPLACE "," ";" _sanitizers "${DIFFTRAIN_SANITIZERS}")
  foreach(_s IN LISTS _sanitizers)
    if(NOT _s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "DIFFTRAIN_SANITIZERS: unknown sanitizer '${_s}' (allowed: address, undefined, thread, leak)")
    endif()
  endforeach()
  # C and C++ only: nvcc (src/cuda/*.cu) takes no -fsanitize.
  add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=${DIFFTRAIN_SANITIZERS}> $<$<COMPILE_LANGUAGE:C,CXX>:-fno-omit-frame-pointer>)
  add_link_options(-fsanitize=${DIFFTRAIN_SANITIZERS})
endif()

# difftrain_set_warnings(target): the project's warning set, applied to our own targets only.
function(difftrain_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
      -Wcast-align -Wunused -Woverloaded-virtual -Wdouble-promotion
      -Wformat=2 -Wimplicit-fallthrough -Wno-unused-parameter
      -Wno-missing-field-initializers>)
  if(DIFFTRAIN_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()

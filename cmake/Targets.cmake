# One helper for every library and executable so warnings and the torch
# precompiled header are applied the same way everywhere. The PCH is built once
# (fmoe_pch) and reused, which needs identical compile flags on every target.
set(FMOE_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)

add_library(fmoe_pch STATIC cmake/pch_anchor.cpp)
target_link_libraries(fmoe_pch PUBLIC fmoe_torch_cpu)
target_compile_options(fmoe_pch PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${FMOE_WARNINGS}>)
target_precompile_headers(fmoe_pch PRIVATE cmake/torch_pch.h)

function(fmoe_setup_target target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${FMOE_WARNINGS}>)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
  get_target_property(_srcs ${target} SOURCES)
  set(_uses_torch OFF)
  foreach(_arg ${ARGN})
    if(_arg STREQUAL "TORCH")
      set(_uses_torch ON)
    endif()
  endforeach()
  if(_uses_torch)
    target_link_libraries(${target} PUBLIC fmoe_torch_cpu)
    target_precompile_headers(${target} REUSE_FROM fmoe_pch)
  endif()
endfunction()

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

# A source of CPU kernels compiled once per instruction set (DEFAULT, AVX2,
# AVX512), like ATen's own kernels: each copy sees CPU_CAPABILITY=<set> and
# CPU_CAPABILITY_<set>, so at::vec::Vectorized<float> is 8 or 16 lanes of AVX2 /
# AVX-512 or the portable loop, and its functions land in namespace
# CPU_CAPABILITY. The copies cannot share the torch precompiled header (built
# without those flags). Sets <out_var> to the object files, for a library's sources;
# the library picks the copy at run time (at::get_cpu_capability()).
function(fmoe_add_isa_objects out_var name source)
  set(_flags_DEFAULT "")
  set(_flags_AVX2 -mavx2 -mfma -mf16c)
  set(_flags_AVX512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma)
  set(_objects)
  foreach(_isa DEFAULT AVX2 AVX512)
    add_library(${name}_${_isa} OBJECT ${source})
    target_link_libraries(${name}_${_isa} PRIVATE fmoe_torch_cpu)
    target_include_directories(${name}_${_isa} PRIVATE ${PROJECT_SOURCE_DIR})
    target_compile_definitions(${name}_${_isa} PRIVATE CPU_CAPABILITY=${_isa} CPU_CAPABILITY_${_isa})
    # -Wno-maybe-uninitialized: GCC 12 warns inside its own AVX-512 intrinsics (_mm512_cvtepu16_epi32) as ATen inlines them.
    target_compile_options(${name}_${_isa} PRIVATE ${FMOE_WARNINGS} -Wno-maybe-uninitialized ${_flags_${_isa}})
    set_target_properties(${name}_${_isa} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    list(APPEND _objects $<TARGET_OBJECTS:${name}_${_isa}>)
  endforeach()
  set(${out_var} ${_objects} PARENT_SCOPE)
endfunction()

# One helper for every library and executable so warnings and the torch
# precompiled headers are applied the same way everywhere. Each PCH is built once
# and reused, which needs identical compile flags on every target. Two of them:
# fmoe_pch holds ATen and autograd functions (what most sources use: a 0.45 GB
# PCH), fmoe_pch_frontend all of <torch/torch.h> (0.7 GB, which costs about 8 s
# more to load in every translation unit than the smaller one saves to parse).
set(FMOE_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)

foreach(_pch fmoe_pch:torch_pch.h fmoe_pch_frontend:torch_frontend_pch.h)
  string(REPLACE ":" ";" _pch "${_pch}")
  list(GET _pch 0 _name)
  list(GET _pch 1 _header)
  add_library(${_name} STATIC cmake/pch_anchor.cpp)
  target_link_libraries(${_name} PUBLIC fmoe_torch_cpu)
  target_compile_options(${_name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${FMOE_WARNINGS}>)
  target_precompile_headers(${_name} PRIVATE cmake/${_header})
endforeach()

# fmoe_setup_target(target [TORCH | TORCH_FRONTEND]): TORCH links LibTorch's CPU
# libraries and reuses fmoe_pch; TORCH_FRONTEND the same with fmoe_pch_frontend,
# for targets whose sources include <torch/torch.h> or torch/nn (moe/model.h).
function(fmoe_setup_target target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${FMOE_WARNINGS}>)
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR})
  get_target_property(_srcs ${target} SOURCES)
  set(_pch "")
  foreach(_arg ${ARGN})
    if(_arg STREQUAL "TORCH")
      set(_pch fmoe_pch)
    elseif(_arg STREQUAL "TORCH_FRONTEND")
      set(_pch fmoe_pch_frontend)
    endif()
  endforeach()
  if(_pch)
    target_link_libraries(${target} PUBLIC fmoe_torch_cpu)
    target_precompile_headers(${target} REUSE_FROM ${_pch})
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

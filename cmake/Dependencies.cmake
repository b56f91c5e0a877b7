# Third-party dependencies. LibTorch comes from the pip wheel (torch==2.11.0),
# everything else from Debian packages; scripts/setup.sh installs all of it.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
if(NOT Torch_DIR)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_QUIET RESULT_VARIABLE _torch_rc)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "python3 cannot import torch: run scripts/setup.sh first")
  endif()
  list(APPEND CMAKE_PREFIX_PATH ${_torch_prefix})
endif()

if(FMOE_CUDA)
  if(NOT FMOE_NVCC)
    message(FATAL_ERROR "FMOE_CUDA=ON but no nvcc: set CUDACXX, or install the CUDA toolkit under /usr/local/cuda")
  endif()
  set(CMAKE_CUDA_COMPILER ${FMOE_NVCC} CACHE FILEPATH "")
  set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "")
  # CMake 3.25 knows no C++20 dialect flag for nvcc; kernels are C++17.
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  # Skip LibTorch's probe for installed GPUs (there are none on build machines).
  set(TORCH_CUDA_ARCH_LIST "9.0")
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
else()
  # LibTorch's CMake config probes for a CUDA toolkit when the wheel is a CUDA build;
  # without FMOE_CUDA we only link its CPU libraries.
  set(USE_CUDA OFF)
endif()

find_package(Torch REQUIRED)
# The CPU part of LibTorch: linking it alone keeps CUDA libraries out of CPU binaries.
get_filename_component(FMOE_TORCH_LIB_DIR "${TORCH_LIBRARY}" DIRECTORY)
add_library(fmoe_torch_cpu INTERFACE)
target_include_directories(fmoe_torch_cpu SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_link_libraries(fmoe_torch_cpu INTERFACE
  ${FMOE_TORCH_LIB_DIR}/libtorch_cpu.so ${FMOE_TORCH_LIB_DIR}/libc10.so)
target_link_options(fmoe_torch_cpu INTERFACE "-Wl,-rpath,${FMOE_TORCH_LIB_DIR}")
# at::parallel_for is a header template: without OpenMP in our own compiles
# (_OPENMP undefined) it runs its whole range on the calling thread, so every
# fused CPU kernel would use one core. LibTorch's OpenMP runtime is GCC's
# libgomp (torch/lib/libgomp.so.1); ours resolves to the same library by its
# soname through the rpath above, so one thread pool serves both and
# at::set_num_threads governs ours too.
target_compile_options(fmoe_torch_cpu INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
target_link_options(fmoe_torch_cpu INTERFACE $<$<LINK_LANGUAGE:CXX>:-fopenmp>)
if(FMOE_CUDA)
  # LibTorch's CUDA libraries for the binaries that make CUDA tensors themselves
  # (the GPU tests and benchmarks), without the compile definitions of
  # ${TORCH_LIBRARIES} (USE_DISTRIBUTED, USE_C10D_NCCL, ...), which would keep
  # them off the torch precompiled headers. libtorch_cuda registers the CUDA
  # kernels when loaded, so it is linked even where no symbol of it is used.
  add_library(fmoe_torch_cuda INTERFACE)
  target_link_libraries(fmoe_torch_cuda INTERFACE fmoe_torch_cpu
    "-Wl,--no-as-needed,${FMOE_TORCH_LIB_DIR}/libtorch_cuda.so -Wl,--as-needed"
    ${FMOE_TORCH_LIB_DIR}/libc10_cuda.so CUDA::cudart)
endif()

find_package(MPI REQUIRED COMPONENTS C)
find_package(yaml-cpp REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(ZLIB REQUIRED)
# sentencepiece ships a pkg-config file; where pkg-config is missing (the GPU
# machine builds from unpacked Debian packages) the library and header are found directly.
add_library(fmoe_sentencepiece INTERFACE)
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(SENTENCEPIECE QUIET IMPORTED_TARGET sentencepiece)
endif()
if(TARGET PkgConfig::SENTENCEPIECE)
  target_link_libraries(fmoe_sentencepiece INTERFACE PkgConfig::SENTENCEPIECE)
else()
  find_library(FMOE_SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)
  find_path(FMOE_SENTENCEPIECE_INCLUDE sentencepiece_processor.h REQUIRED)
  target_link_libraries(fmoe_sentencepiece INTERFACE ${FMOE_SENTENCEPIECE_LIBRARY})
  target_include_directories(fmoe_sentencepiece SYSTEM INTERFACE ${FMOE_SENTENCEPIECE_INCLUDE})
endif()
find_package(Threads REQUIRED)

#include "fp8/cuda/cast_kernels.h"

#include <cuda_fp8.h>

namespace fmoe::fp8::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void encode_e4m3_kernel(const float* in, uint8_t* out, int64_t count, bool saturate) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  out[i] = __nv_cvt_float_to_fp8(in[i], saturate ? __NV_SATFINITE : __NV_NOSAT, __NV_E4M3);
}

__global__ void decode_e4m3_kernel(const uint8_t* in, float* out, int64_t count) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const __half_raw h = __nv_cvt_fp8_to_halfraw(in[i], __NV_E4M3);
  out[i] = __half2float(__half(h));
}

unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_encode_e4m3(const float* in, uint8_t* out, int64_t count, bool saturate,
                               cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  encode_e4m3_kernel<<<blocks_for(count), kThreads, 0, stream>>>(in, out, count, saturate);
  return cudaGetLastError();
}

cudaError_t launch_decode_e4m3(const uint8_t* in, float* out, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  decode_e4m3_kernel<<<blocks_for(count), kThreads, 0, stream>>>(in, out, count);
  return cudaGetLastError();
}

}  // namespace fmoe::fp8::cuda

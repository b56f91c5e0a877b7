#include "fp8/cuda/cast_kernels.h"

#include <cuda_fp8.h>

namespace fmoe::fp8::cuda {
namespace {

constexpr int kThreads = 256;

__nv_fp8_interpretation_t interpretation(Format format) { return format == Format::kE4M3 ? __NV_E4M3 : __NV_E5M2; }

__global__ void encode_kernel(const float* in, uint8_t* out, int64_t count, __nv_fp8_interpretation_t kind,
                              __nv_saturation_t saturation) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count) out[i] = __nv_cvt_float_to_fp8(in[i], saturation, kind);
}

__global__ void decode_kernel(const uint8_t* in, float* out, int64_t count, __nv_fp8_interpretation_t kind) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < count) out[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(in[i], kind)));
}

unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_encode(const float* in, uint8_t* out, int64_t count, Format format, bool saturate, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  encode_kernel<<<blocks_for(count), kThreads, 0, stream>>>(in, out, count, interpretation(format),
                                                            saturate ? __NV_SATFINITE : __NV_NOSAT);
  return cudaGetLastError();
}

cudaError_t launch_decode(const uint8_t* in, float* out, int64_t count, Format format, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  decode_kernel<<<blocks_for(count), kThreads, 0, stream>>>(in, out, count, interpretation(format));
  return cudaGetLastError();
}

}  // namespace fmoe::fp8::cuda

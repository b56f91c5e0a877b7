// Torch-free launchers for the FP8 cast kernels (compiled by nvcc for sm_90).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fmoe::fp8::cuda {

// Encodes count floats to E4M3 (saturating or not), on stream.
cudaError_t launch_encode_e4m3(const float* in, uint8_t* out, int64_t count, bool saturate,
                               cudaStream_t stream);
cudaError_t launch_decode_e4m3(const uint8_t* in, float* out, int64_t count, cudaStream_t stream);

}  // namespace fmoe::fp8::cuda

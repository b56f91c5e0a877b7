// Torch-free launchers for the FP8 cast kernels (compiled by nvcc for sm_90).
// Codes follow fp8/codec.h: E4M3 ("fn") or E5M2, round to nearest even.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fp8/codec.h"

namespace fmoe::fp8::cuda {

// Encodes count floats; saturate clamps to the largest finite value, otherwise
// overflow gives NaN (E4M3) or Inf (E5M2), as PyTorch's casts do.
cudaError_t launch_encode(const float* in, uint8_t* out, int64_t count, Format format, bool saturate, cudaStream_t stream);
cudaError_t launch_decode(const uint8_t* in, float* out, int64_t count, Format format, cudaStream_t stream);

}  // namespace fmoe::fp8::cuda

// OCP FP8 codecs (E4M3 "fn" and E5M2), bit-exact to the OCP 8-bit floating point
// spec: round to nearest, ties to even. No LibTorch here: the codecs are used by
// both CPU and CUDA paths and by the optimizer's state storage.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fmoe::fp8 {

enum class Format : uint8_t { kE4M3, kE5M2 };

// Training casts saturate to the largest finite value (±448 / ±57344); the
// non-saturating mode matches PyTorch's casts (E4M3 overflow -> NaN, E5M2 -> Inf).
enum class Overflow : uint8_t { kSaturate, kNonSaturating };

struct FormatInfo {
  int exponent_bits;
  int mantissa_bits;
  int bias;
  uint8_t max_finite_code;  // magnitude code of the largest finite value
  float max_finite;
};

FormatInfo format_info(Format format);

uint8_t encode(float value, Format format, Overflow overflow);
float decode(uint8_t code, Format format);

void encode_array(const float* in, uint8_t* out, size_t count, Format format, Overflow overflow);
void decode_array(const uint8_t* in, float* out, size_t count, Format format);

}  // namespace fmoe::fp8

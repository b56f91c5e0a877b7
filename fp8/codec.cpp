#include "fp8/codec.h"

#include <bit>
#include <cmath>

namespace fmoe::fp8 {
namespace {

constexpr uint8_t kSignBit = 0x80;

uint8_t nan_code(Format format) { return 0x7F; }

uint8_t overflow_code(Format format, Overflow overflow) {
  const FormatInfo info = format_info(format);
  if (overflow == Overflow::kSaturate) return info.max_finite_code;
  return format == Format::kE4M3 ? nan_code(format) : uint8_t{0x7C};  // E5M2 has Inf
}

}  // namespace

FormatInfo format_info(Format format) {
  if (format == Format::kE4M3) return {4, 3, 7, 0x7E, 448.0f};
  return {5, 2, 15, 0x7B, 57344.0f};
}

uint8_t encode(float value, Format format, Overflow overflow) {
  const FormatInfo info = format_info(format);
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint8_t sign = (bits >> 31) ? kSignBit : 0;
  if (std::isnan(value)) return static_cast<uint8_t>(sign | nan_code(format));
  if (std::isinf(value)) return static_cast<uint8_t>(sign | overflow_code(format, overflow));

  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  const float magnitude = std::bit_cast<float>(abs_bits);
  const int min_normal_exponent = 1 - info.bias;
  int64_t code;
  if (magnitude < std::ldexp(1.0f, min_normal_exponent)) {
    // Subnormal range: the value in units of the smallest subnormal, rounded half
    // to even (the default FP environment of nearbyint). Rounding up to
    // 2^mantissa_bits lands exactly on the smallest normal's code.
    const float units = std::ldexp(magnitude, info.mantissa_bits - min_normal_exponent);
    code = static_cast<int64_t>(std::nearbyint(units));
  } else {
    // Normal range: round the float's bit pattern to mantissa_bits (ties to
    // even); a mantissa carry propagates into the exponent by itself.
    const int shift = 23 - info.mantissa_bits;
    const uint32_t round_bias = ((1u << (shift - 1)) - 1) + ((abs_bits >> shift) & 1u);
    const int64_t rounded = static_cast<int64_t>((static_cast<uint64_t>(abs_bits) + round_bias) >> shift);
    code = rounded - (static_cast<int64_t>(127 - info.bias) << info.mantissa_bits);
  }
  if (code > info.max_finite_code) return static_cast<uint8_t>(sign | overflow_code(format, overflow));
  return static_cast<uint8_t>(sign | static_cast<uint8_t>(code));
}

float decode(uint8_t code, Format format) {
  const FormatInfo info = format_info(format);
  const bool negative = code & kSignBit;
  const int magnitude = code & 0x7F;
  const int exponent = magnitude >> info.mantissa_bits;
  const int mantissa = magnitude & ((1 << info.mantissa_bits) - 1);
  const int max_exponent = (1 << info.exponent_bits) - 1;
  float value;
  if (format == Format::kE4M3 && magnitude == 0x7F) {
    value = std::nanf("");
  } else if (format == Format::kE5M2 && exponent == max_exponent) {
    value = mantissa == 0 ? INFINITY : std::nanf("");
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mantissa), 1 - info.bias - info.mantissa_bits);
  } else {
    value = std::ldexp(static_cast<float>((1 << info.mantissa_bits) | mantissa),
                       exponent - info.bias - info.mantissa_bits);
  }
  return negative ? -value : value;
}

void encode_array(const float* in, uint8_t* out, size_t count, Format format, Overflow overflow) {
  for (size_t i = 0; i < count; ++i) out[i] = encode(in[i], format, overflow);
}

void decode_array(const uint8_t* in, float* out, size_t count, Format format) {
  // A 256-entry table makes decoding a gather.
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = decode(static_cast<uint8_t>(c), format);
  for (size_t i = 0; i < count; ++i) out[i] = table[in[i]];
}

}  // namespace fmoe::fp8

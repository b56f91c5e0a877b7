#include <gtest/gtest.h>

#include <cmath>

#include "fp8/codec.h"

namespace {

using fmoe::fp8::decode;
using fmoe::fp8::encode;
using fmoe::fp8::Format;
using fmoe::fp8::Overflow;

uint8_t e4m3(float x, Overflow o = Overflow::kSaturate) { return encode(x, Format::kE4M3, o); }
uint8_t e5m2(float x, Overflow o = Overflow::kSaturate) { return encode(x, Format::kE5M2, o); }

TEST(Fp8Codec, E4M3SpecVectors) {
  EXPECT_EQ(e4m3(1.0f), 0x38);
  EXPECT_EQ(e4m3(-1.0f), 0xB8);
  EXPECT_EQ(e4m3(448.0f), 0x7E);
  EXPECT_EQ(e4m3(0.1f), 0x1D);
  EXPECT_EQ(e4m3(std::ldexp(1.0f, -6)), 0x08);
  EXPECT_EQ(e4m3(std::ldexp(1.0f, -9)), 0x01);
  EXPECT_EQ(e4m3(1.0625f), 0x38);  // tie rounds to even
  EXPECT_EQ(e4m3(1.1875f), 0x3A);  // tie rounds up to even
  EXPECT_EQ(e4m3(464.0f, Overflow::kNonSaturating), 0x7E);
  EXPECT_EQ(e4m3(480.0f, Overflow::kNonSaturating), 0x7F);
  EXPECT_EQ(e4m3(480.0f, Overflow::kSaturate), 0x7E);
  EXPECT_EQ(e4m3(-0.0f), 0x80);
  EXPECT_EQ(e4m3(NAN) & 0x7F, 0x7F);
  EXPECT_EQ(e4m3(INFINITY, Overflow::kSaturate), 0x7E);
  EXPECT_EQ(e4m3(-1e9f, Overflow::kSaturate), 0xFE);
}

TEST(Fp8Codec, E5M2SpecVectors) {
  EXPECT_EQ(e5m2(1.0f), 0x3C);
  EXPECT_EQ(e5m2(1.25f), 0x3D);
  EXPECT_EQ(e5m2(57344.0f), 0x7B);
  EXPECT_EQ(e5m2(std::ldexp(1.0f, -14)), 0x04);
  EXPECT_EQ(e5m2(std::ldexp(1.0f, -16)), 0x01);
  EXPECT_EQ(e5m2(1.125f), 0x3C);  // tie rounds to even
  EXPECT_EQ(e5m2(61440.0f, Overflow::kNonSaturating), 0x7C);
  EXPECT_EQ(e5m2(61440.0f, Overflow::kSaturate), 0x7B);
  EXPECT_EQ(e5m2(INFINITY, Overflow::kNonSaturating), 0x7C);
  EXPECT_TRUE(std::isnan(decode(e5m2(NAN), Format::kE5M2)));
}

TEST(Fp8Codec, ExhaustiveRoundTrip) {
  for (Format format : {Format::kE4M3, Format::kE5M2}) {
    for (int code = 0; code < 256; ++code) {
      const float value = decode(static_cast<uint8_t>(code), format);
      if (std::isnan(value)) continue;
      const Overflow overflow = std::isinf(value) ? Overflow::kNonSaturating : Overflow::kSaturate;
      EXPECT_EQ(encode(value, format, overflow), code) << "format " << static_cast<int>(format) << " value " << value;
    }
  }
}

TEST(Fp8Codec, DecodeKnownValues) {
  EXPECT_EQ(decode(0x7E, Format::kE4M3), 448.0f);
  EXPECT_EQ(decode(0x01, Format::kE4M3), std::ldexp(1.0f, -9));
  EXPECT_EQ(decode(0x7B, Format::kE5M2), 57344.0f);
  EXPECT_TRUE(std::isinf(decode(0x7C, Format::kE5M2)));
  EXPECT_TRUE(std::isnan(decode(0x7F, Format::kE4M3)));
}

}  // namespace

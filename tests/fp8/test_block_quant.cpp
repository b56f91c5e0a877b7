#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/cpu_isa.h"
#include "fp8/block_quant.h"
#include "fp8/codec.h"
#include "fp8/fake_quant_cpu.h"
#include "fp8/fp8_gemm.h"

namespace {

using namespace fmoe::fp8;

// Every code's value, its float neighbours, midpoints, and log-uniform random values.
at::Tensor probe_values(Format format) {
  std::vector<float> values;
  for (int code = 0; code < 256; ++code) {
    const float v = decode(static_cast<uint8_t>(code), format);
    if (std::isnan(v) || std::isinf(v)) continue;
    values.push_back(v);
    values.push_back(std::nextafter(v, INFINITY));
    values.push_back(std::nextafter(v, -INFINITY));
    const float next = decode(static_cast<uint8_t>(code + 1), format);
    if (code != 0x7F && code != 0xFF && std::isfinite(next)) values.push_back((v + next) / 2);
  }
  for (float v : {INFINITY, -INFINITY, NAN, 1e30f, -1e30f, 0.0f, -0.0f, 1e-30f}) values.push_back(v);
  torch::manual_seed(1);
  const at::Tensor random = at::exp2(at::rand({4000}) * 50 - 30) * (at::rand({4000}) - 0.5).sign();
  at::Tensor probes = at::tensor(values);
  return at::cat({probes, random});
}

TEST(Fp8Vectorised, EncodeMatchesScalarCodecBitForBit) {
  for (Format format : {Format::kE4M3, Format::kE5M2}) {
    for (Overflow overflow : {Overflow::kSaturate, Overflow::kNonSaturating}) {
      const at::Tensor x = probe_values(format);
      const at::Tensor codes = encode_tensor(x, format, overflow);
      const float* xs = x.data_ptr<float>();
      const uint8_t* cs = codes.data_ptr<uint8_t>();
      for (int64_t i = 0; i < x.numel(); ++i) {
        const uint8_t expected = encode(xs[i], format, overflow);
        if (std::isnan(xs[i])) {
          EXPECT_TRUE(std::isnan(decode(cs[i], format)));
        } else {
          ASSERT_EQ(cs[i], expected) << "value " << xs[i] << " format " << int(format) << " overflow " << int(overflow);
        }
      }
    }
  }
}

TEST(Fp8Vectorised, DecodeMatchesScalarCodec) {
  for (Format format : {Format::kE4M3, Format::kE5M2}) {
    const at::Tensor codes = at::arange(256, at::kInt).to(at::kByte);
    const at::Tensor values = decode_tensor(codes, format);
    for (int c = 0; c < 256; ++c) {
      const float expected = decode(static_cast<uint8_t>(c), format);
      const float got = values[c].item<float>();
      if (std::isnan(expected)) {
        EXPECT_TRUE(std::isnan(got));
      } else {
        EXPECT_EQ(got, expected) << c;
      }
    }
  }
}

TEST(BlockQuant, RelativeErrorWithinE4M3PrecisionAndScalesFromMaxAbs) {
  torch::manual_seed(4);
  const at::Tensor x = at::randn({3, 200, 300}) * at::exp2(at::randint(-8, 8, {3, 200, 1}).to(at::kFloat));
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 128}, {128, 128}, {128, 1}}) {
    BlockQuantOptions o;
    o.block_rows = rows;
    o.block_cols = cols;
    const BlockQuantized q = quantize_blocks(x, o);
    EXPECT_EQ(q.codes.sizes(), x.sizes());
    EXPECT_EQ(q.scales.size(1), (200 + rows - 1) / rows);
    EXPECT_EQ(q.scales.size(2), (300 + cols - 1) / cols);
    // The first block's scale is its max-abs / 448.
    const double amax = x[0].narrow(0, 0, std::min<int64_t>(rows, 200)).narrow(1, 0, std::min<int64_t>(cols, 300)).abs().max().item<double>();
    EXPECT_FLOAT_EQ(q.scales[0][0][0].item<float>(), static_cast<float>(amax / 448.0));
    const at::Tensor back = dequantize_blocks(q);
    EXPECT_TRUE(at::equal(back, fake_quantize(x, o)));
    // Normal range of E4M3 after scaling: |x / scale| >= 2^-6. There the error is <= 2^-4 relative.
    const at::Tensor scale_full = q.scales.repeat_interleave(rows, 1).repeat_interleave(cols, 2).narrow(1, 0, 200).narrow(2, 0, 300);
    const at::Tensor normal = (x / scale_full).abs() >= std::ldexp(1.0, -6);
    const at::Tensor rel = ((back - x).abs() / x.abs()).masked_select(normal);
    EXPECT_LE(rel.max().item<double>(), std::ldexp(1.0, -4));
    // Per-row tiles see one row's magnitude only, so nearly every value is normal;
    // larger blocks mix rows 2^16 apart and push the small rows into subnormals.
    if (rows == 1) {
      EXPECT_GT(normal.to(at::kFloat).mean().item<double>(), 0.99);
    }
  }
}

TEST(BlockQuant, OutlierOnlyAffectsItsOwnBlockAndPowerOfTwoScales) {
  at::Tensor x = at::ones({2, 256});
  x[0][3] = 1e4;
  BlockQuantOptions o;
  const at::Tensor back = fake_quantize(x, o);
  EXPECT_EQ(back[1][10].item<float>(), 1.0f);    // another row: untouched
  EXPECT_EQ(back[0][200].item<float>(), 1.0f);   // same row, other tile: untouched
  EXPECT_EQ(back[0][3].item<float>(), 1e4f);     // the max maps to 448 exactly
  o.power_of_two_scales = true;
  const BlockQuantized q = quantize_blocks(at::randn({4, 512}), o);
  const at::Tensor log2 = at::log2(q.scales);
  EXPECT_TRUE(at::equal(log2, at::round(log2)));
}

}  // namespace

namespace fused {

using namespace fmoe::fp8;

// The instruction-set copies of the fused kernel this CPU can run.
std::vector<const FakeQuantKernel*> runnable_kernels() {
  return fmoe::common::runnable_copies(fake_quant_isa::kernel_DEFAULT(), fake_quant_isa::kernel_AVX2(), fake_quant_isa::kernel_AVX512());
}

// Bit for bit, NaN for NaN.
void expect_same_bits(const at::Tensor& got, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(got.sizes(), expected.sizes()) << what;
  const at::Tensor g = got.contiguous().view(at::kInt), e = expected.contiguous().view(at::kInt);
  const at::Tensor differ = (g != e) & ~(got.isnan() & expected.isnan()).view(g.sizes());
  const int64_t n = differ.sum().item<int64_t>();
  if (n > 0) {
    const int64_t i = differ.flatten().nonzero()[0].item<int64_t>();
    ADD_FAILURE() << what << ": " << n << " values differ, first at " << i << ": " << got.flatten()[i].item<float>() << " against "
                  << expected.flatten()[i].item<float>() << " (input block-scaled to E4M3)";
  }
}

TEST(FusedFakeQuantize, EveryInstructionSetMatchesTheCompositionBitForBit) {
  torch::manual_seed(21);
  // Magnitudes over 2^-30 .. 2^16 per row, so blocks mix normal and subnormal E4M3 values.
  at::Tensor x = at::randn({3, 200, 300}) * at::exp2(at::randint(-30, 16, {3, 200, 1}).to(at::kFloat));
  // Exact ties between E4M3 neighbours once scaled: a block whose max is 448 keeps scale 1,
  // and 1 + 2^-4 (halfway between 1 and 1.125) rounds to even (1), 1 + 3 * 2^-4 to 1.25.
  x[0][0].narrow(0, 0, 128).fill_(1.0f + 1.0f / 16);
  x[0][0][1] = 448.0f;
  x[0][0][2] = 1.0f + 3.0f / 16;
  x[0][0][3] = std::ldexp(1.0f, -7) * 3 / 2 + std::ldexp(1.0f, -10);  // a tie between two subnormals
  x[1][5].zero_();                                                      // an all-zero row: scale 1
  x[2][7][9] = std::numeric_limits<float>::quiet_NaN();
  x[2][9][130] = std::numeric_limits<float>::infinity();
  x[2][11][260] = -0.0f;
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 128}, {128, 128}, {128, 1}, {1, 7}, {3, 5}}) {
    BlockQuantOptions o;
    o.block_rows = rows;
    o.block_cols = cols;
    const at::Tensor expected = dequantize_blocks(quantize_blocks(x, o));  // the ATen composition
    for (const FakeQuantKernel* k : runnable_kernels()) {
      at::Tensor y = at::empty_like(x);
      k->e4m3(x.data_ptr<float>(), y.data_ptr<float>(), 3, 200, 300, rows, cols);
      expect_same_bits(y, expected, std::string(k->isa) + " tiles " + std::to_string(rows) + "x" + std::to_string(cols));
    }
  }
  EXPECT_EQ(fake_quantize(x, BlockQuantOptions{})[0][0][0].item<float>(), 1.0f);  // the tie went to even
  EXPECT_EQ(fake_quantize(x, BlockQuantOptions{})[0][0][2].item<float>(), 1.25f);
}

TEST(FusedFakeQuantize, OtherShapesAndDtypesMatchTheComposition) {
  torch::manual_seed(22);
  BlockQuantOptions o;
  for (const at::Tensor& x : {at::randn({1000}), at::randn({2, 3, 40, 260}), at::randn({64, 256}).to(at::kBFloat16)}) {
    const at::Tensor got = fake_quantize(x, o);
    EXPECT_EQ(got.scalar_type(), at::kFloat);
    expect_same_bits(got, dequantize_blocks(quantize_blocks(x, o)), "shape " + std::to_string(x.dim()) + "-D " + c10::toString(x.scalar_type()));
  }
  // Empty (the composition cannot reshape it): empty out.
  EXPECT_EQ(fake_quantize(at::randn({0, 128}), o).sizes(), at::IntArrayRef({0, 128}));
  // Not contiguous: a transposed view.
  const at::Tensor t = at::randn({256, 96}).t();
  expect_same_bits(fake_quantize(t, o), dequantize_blocks(quantize_blocks(t, o)), "transposed");
}

}  // namespace fused

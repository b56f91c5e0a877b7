#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>

#include "fp8/low_precision_tensor.h"

namespace {

using namespace fmoe::fp8;

TEST(LowPrecisionTensor, RoundTripErrorAndBytesPerDtype) {
  torch::manual_seed(9);
  const at::Tensor value = at::randn({300, 70}) * 1e-3;
  struct Case {
    StorageDtype dtype;
    double max_relative;  // on the tensor norm
    double bytes_per_element;
  };
  for (const Case& c : {Case{StorageDtype::kFp32, 0.0, 4.0}, Case{StorageDtype::kBf16, 4e-3, 2.0},
                        Case{StorageDtype::kFp16, 5e-4, 2.0}, Case{StorageDtype::kFp8, 0.06, 1.0 + 4.0 / 128},
                        Case{StorageDtype::kFp4, 0.12, 0.5 + 4.0 / 128}, Case{StorageDtype::kNvfp4, 0.105, 0.5 + 1.0 / 16},
                        Case{StorageDtype::kFp6, 0.035, 0.75 + 1.0 / 32}}) {
    LowPrecisionTensor t(value.sizes(), c.dtype);
    t.store(value);
    const at::Tensor back = t.load();
    EXPECT_EQ(back.sizes(), value.sizes());
    EXPECT_LE(((back - value).norm() / value.norm()).item<double>(), c.max_relative) << storage_dtype_name(c.dtype);
    EXPECT_NEAR(static_cast<double>(t.bytes()) / value.numel(), c.bytes_per_element, 0.01) << storage_dtype_name(c.dtype);
  }
}

TEST(LowPrecisionTensor, LoadIsTheFp32TensorItselfOrAFreshDecoding) {
  // The optimizers update load()'s tensor in place and store it back, with no clone.
  const at::Tensor value = at::randn({4, 64});
  LowPrecisionTensor fp32(value.sizes(), StorageDtype::kFp32);
  fp32.store(value);
  at::Tensor caller = value.clone();
  fp32.store(caller);
  caller.fill_(7.0);  // a stored tensor is copied: the caller's later writes do not reach it
  EXPECT_TRUE(at::equal(fp32.load(), value));
  at::Tensor loaded = fp32.load();
  EXPECT_TRUE(loaded.is_same(fp32.load()));
  loaded.mul_(2.0);
  fp32.store(loaded);  // storing load()'s own tensor keeps it
  EXPECT_TRUE(loaded.is_same(fp32.load()));
  EXPECT_TRUE(at::equal(fp32.load(), value * 2.0));
  for (StorageDtype dtype : {StorageDtype::kBf16, StorageDtype::kFp16, StorageDtype::kFp8, StorageDtype::kFp6, StorageDtype::kFp4,
                             StorageDtype::kNvfp4}) {
    LowPrecisionTensor t(value.sizes(), dtype);
    t.store(value);
    const at::Tensor first = t.load();
    at::Tensor second = t.load();
    second.fill_(7.0);  // a decoding the caller owns: the store and the other decodings are untouched
    EXPECT_TRUE(at::equal(t.load(), first)) << storage_dtype_name(dtype);
    EXPECT_FALSE(at::equal(first, second)) << storage_dtype_name(dtype);
    EXPECT_NE(first.data_ptr(), second.data_ptr()) << storage_dtype_name(dtype);
  }
}

TEST(LowPrecisionTensor, SqrtTransformKeepsSmallSecondMoments) {
  // Second moments span many decades; storing the square root halves the range.
  const at::Tensor v = at::exp2(at::linspace(-30, 0, 128));
  LowPrecisionTensor plain(v.sizes(), StorageDtype::kFp8, 128, false);
  LowPrecisionTensor rooted(v.sizes(), StorageDtype::kFp8, 128, true);
  plain.store(v);
  rooted.store(v);
  const auto zeros = [&](const at::Tensor& t) { return (t == 0).sum().item<int64_t>(); };
  EXPECT_LT(zeros(rooted.load()), zeros(plain.load()));
  EXPECT_EQ(zeros(rooted.load()), 0);
}

TEST(LowPrecisionTensor, PartsRestoreExactly) {
  const at::Tensor value = at::randn({5, 300});
  for (StorageDtype dtype :
       {StorageDtype::kFp32, StorageDtype::kBf16, StorageDtype::kFp16, StorageDtype::kFp8, StorageDtype::kFp4, StorageDtype::kNvfp4,
        StorageDtype::kFp6}) {
    LowPrecisionTensor a(value.sizes(), dtype);
    a.store(value);
    LowPrecisionTensor b(value.sizes(), dtype);
    b.restore(a.parts(), "test");
    EXPECT_TRUE(at::equal(a.load(), b.load())) << storage_dtype_name(dtype);
  }
  LowPrecisionTensor c(value.sizes(), StorageDtype::kFp8);
  EXPECT_THROW(c.restore({{"data", at::zeros({3})}}, "x"), std::runtime_error);
  // NVFP4 needs its E4M3 tile scales (not FP32 ones) and its tensor scale.
  LowPrecisionTensor nv(value.sizes(), StorageDtype::kNvfp4);
  nv.store(value);
  auto parts = nv.parts();
  parts.at("scales") = parts.at("scales").to(at::kFloat);
  EXPECT_THROW(LowPrecisionTensor(value.sizes(), StorageDtype::kNvfp4).restore(parts, "x"), std::runtime_error);
  parts = nv.parts();
  parts.erase("tensor_scale");
  EXPECT_THROW(LowPrecisionTensor(value.sizes(), StorageDtype::kNvfp4).restore(parts, "x"), std::runtime_error);
  EXPECT_EQ(parse_storage_dtype("fp4"), StorageDtype::kFp4);
  EXPECT_EQ(parse_storage_dtype("nvfp4"), StorageDtype::kNvfp4);
  EXPECT_EQ(parse_storage_dtype("fp6"), StorageDtype::kFp6);
  EXPECT_THROW(parse_storage_dtype("fp5"), std::invalid_argument);
}

}  // namespace

namespace {

TEST(LowPrecisionTensor, StochasticRoundingIsUnbiasedAndSeeded) {
  // 1 + 2^-10 lies an eighth of the way from BF16's 1 to its next value 1 + 2^-7:
  // it rounds up with probability 1/8, so the mean of many roundings is the value.
  const double value = 1.0 + std::ldexp(1.0, -10), lo = 1.0, hi = 1.0 + std::ldexp(1.0, -7);
  const at::Tensor v = at::full({200000}, value, at::kFloat);
  const at::Tensor r = fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(v, 17).to(at::kDouble);
  EXPECT_TRUE(at::logical_or(r == lo, r == hi).all().item<bool>());
  EXPECT_NEAR(r.mean().item<double>(), value, 2e-5);               // round to nearest gives 1.0: biased by 2^-10
  EXPECT_NEAR((r == hi).to(at::kDouble).mean().item<double>(), 0.125, 0.005);
  // Negative values alike (the magnitude rounds), and exact BF16 values stay.
  const at::Tensor n = fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(-v, 17).to(at::kDouble);
  EXPECT_TRUE(at::equal(n, -r));
  const at::Tensor exact = at::tensor({0.5f, -3.0f, 0.0f, 1.0f + 1.0f / 128});
  EXPECT_TRUE(at::equal(fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(exact, 5).to(at::kFloat), exact));
  // The same seed, the same bits; another seed, other bits.
  EXPECT_TRUE(at::equal(fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(v, 17), r.to(at::kBFloat16)));
  EXPECT_FALSE(at::equal(fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(v, 18), r.to(at::kBFloat16)));
  // Small updates accumulate: 1000 additions of 2^-12 to a BF16 weight of 1.
  at::Tensor nearest = at::ones({4096}, at::kBFloat16), stochastic = nearest.clone();
  for (uint32_t step = 0; step < 1000; ++step) {
    nearest = (nearest.to(at::kFloat) + std::ldexp(1.0, -12)).to(at::kBFloat16);
    stochastic = fmoe::fp8::LowPrecisionTensor::stochastic_round_bf16(stochastic.to(at::kFloat) + std::ldexp(1.0, -12), step);
  }
  EXPECT_EQ(nearest.to(at::kFloat).mean().item<double>(), 1.0);  // every addition lost
  EXPECT_NEAR(stochastic.to(at::kFloat).mean().item<double>(), 1.0 + 1000 * std::ldexp(1.0, -12), 0.01);
}

}  // namespace

namespace {

using fmoe::fp8::LowPrecisionTensor;
using fmoe::fp8::StorageDtype;

TEST(LowPrecisionTensor, Fp4IsE2M1InTilesPackedTwoCodesAByte) {
  // One tile of 128 whose max-abs is 3: scale 0.5, so the grid is 0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3.
  std::vector<float> v(128, 0.0f);
  const float exact[] = {0.0f, 0.25f, -0.5f, 0.75f, 1.0f, -1.5f, 2.0f, 3.0f};
  for (int i = 0; i < 8; ++i) v[i] = exact[i];
  v[8] = 0.3f;     // 0.6 of a unit: nearest is 0.5 units (0.25)
  v[9] = -0.35f;   // -0.7 units: nearest is -0.5 units (-0.25)... ties aside, 0.7 -> 0.5
  v[10] = 1.25f;   // 2.5 units, the midpoint of 2 and 3: ties to the even code (2 units, code 4)
  v[11] = 0.625f;  // 1.25 units, between 1 and 1.5 (codes 2 and 3): ties to code 2, 0.5
  v[12] = 2.5f;    // 5 units, between 4 and 6 (codes 6 and 7): ties to code 6, 2.0
  const at::Tensor value = at::tensor(v);
  LowPrecisionTensor t(value.sizes(), StorageDtype::kFp4);
  t.store(value);
  const at::Tensor back = t.load();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(back[i].item<float>(), exact[i]) << i;
  EXPECT_EQ(back[8].item<float>(), 0.25f);
  EXPECT_EQ(back[9].item<float>(), -0.25f);
  EXPECT_EQ(back[10].item<float>(), 1.0f);
  EXPECT_EQ(back[11].item<float>(), 0.5f);
  EXPECT_EQ(back[12].item<float>(), 2.0f);
  // 128 codes in 64 bytes, one FP32 scale; the codes of the first two values share byte 0:
  // 0 (code 0) in the low nibble, 0.25 (code 1) in the high one.
  const auto parts = t.parts();
  EXPECT_EQ(parts.at("data").numel(), 64);
  EXPECT_EQ(parts.at("data").scalar_type(), at::kByte);
  EXPECT_EQ(parts.at("data")[0].item<uint8_t>(), 0x10);
  EXPECT_EQ(parts.at("data")[1].item<uint8_t>(), (0x2 | 0x8) | (0x3 << 4));  // -0.5: sign bit 8 and code 2; 0.75: code 3
  EXPECT_FLOAT_EQ(parts.at("scales")[0].item<float>(), 0.5f);
  EXPECT_EQ(t.bytes(), 64 + 4);
  // Every magnitude on a fine grid of [0, 6] and just below each E2M1 value rounds
  // to the nearest E2M1 value (ties, checked above, left out): tiles led by a 6, so the scale is 1.
  const at::Tensor grid = at::tensor({0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f});
  at::Tensor a = at::cat({at::linspace(0, 6, 127 * 200), at::nextafter(grid.narrow(0, 1, 7), at::zeros({7}))});
  a = at::constant_pad_nd(a, {0, 127 - a.numel() % 127}, 0.0).view({-1, 127});
  const at::Tensor tiles = at::cat({at::full({a.size(0), 1}, 6.0f), a}, 1);
  const at::Tensor got = LowPrecisionTensor::round_trip(tiles, StorageDtype::kFp4).narrow(1, 1, 127).reshape({-1});
  const at::Tensor dist = (a.reshape({-1, 1}) - grid).abs();
  const auto sorted = dist.sort(1);
  const at::Tensor not_tie = std::get<0>(sorted).select(1, 0) < std::get<0>(sorted).select(1, 1);
  const at::Tensor nearest = grid.index_select(0, std::get<1>(sorted).select(1, 0));
  EXPECT_TRUE(at::equal(got.masked_select(not_tie), nearest.masked_select(not_tie)));
  EXPECT_GT(not_tie.sum().item<int64_t>(), 25000);
  // An odd count over several tiles keeps its shape and each tile's own scale.
  const at::Tensor odd = at::cat({at::full({128}, 6.0f), at::tensor({-0.75f, -0.375f, 0.1875f})}).view({131});  // scale 0.125
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(odd, StorageDtype::kFp4), odd));
}

TEST(LowPrecisionTensor, Fp4StochasticRoundingIsUnbiasedAndSeeded) {
  // In a tile whose max-abs is 6 (scale 1), 2.2 lies a fifth of the way from 2 to 3.
  const int64_t n = 128 * 2000;
  at::Tensor v = at::full({n}, 2.2f);
  v.view({-1, 128}).select(1, 0).fill_(6.0f);
  const at::Tensor r = LowPrecisionTensor::round_trip(v, StorageDtype::kFp4, 128, 11u).view({-1, 128}).narrow(1, 1, 127);
  EXPECT_TRUE(at::logical_or(r == 2.0f, r == 3.0f).all().item<bool>());
  EXPECT_NEAR((r == 3.0f).to(at::kDouble).mean().item<double>(), 0.2, 0.005);
  EXPECT_NEAR(r.to(at::kDouble).mean().item<double>(), 2.2, 0.005);  // to nearest: always 2
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(v, StorageDtype::kFp4, 128, 11u), LowPrecisionTensor::round_trip(v, StorageDtype::kFp4, 128, 11u)));
  EXPECT_FALSE(at::equal(LowPrecisionTensor::round_trip(v, StorageDtype::kFp4, 128, 12u), LowPrecisionTensor::round_trip(v, StorageDtype::kFp4, 128, 11u)));
  // Negative values round their magnitude alike; values on the grid stay.
  const at::Tensor neg = LowPrecisionTensor::round_trip(-v, StorageDtype::kFp4, 128, 11u).view({-1, 128}).narrow(1, 1, 127);
  EXPECT_TRUE(at::equal(neg, -r));
  const at::Tensor on_grid = at::tensor({6.0f, -4.0f, 3.0f, 1.5f, 0.5f, 0.0f});
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(on_grid, StorageDtype::kFp4, 128, 3u), on_grid));
  // FP6 and FP16 have no stochastic store.
  for (StorageDtype dtype : {StorageDtype::kFp6, StorageDtype::kFp16}) {
    LowPrecisionTensor state(v.sizes(), dtype);
    EXPECT_THROW(state.store_stochastic(v, 1), std::logic_error) << storage_dtype_name(dtype);
  }
}

TEST(LowPrecisionTensor, Fp6IsE2M3In32ValueTilesWithPowerOfTwoScalesRoundedUp) {
  // E2M3's 32 magnitudes: 0 to 0.875 by 0.125, 1 to 1.875 by 0.125, 2 to 3.75 by 0.25, 4 to 7.5 by 0.5.
  std::vector<float> grid;
  for (int i = 0; i < 16; ++i) grid.push_back(0.125f * static_cast<float>(i));
  for (int i = 0; i < 8; ++i) grid.push_back(2.0f + 0.25f * static_cast<float>(i));
  for (int i = 0; i < 8; ++i) grid.push_back(4.0f + 0.5f * static_cast<float>(i));
  ASSERT_EQ(grid.size(), 32u);
  std::vector<float> v(4 * 32 + 5, 0.0f);
  for (int i = 0; i < 32; ++i) {
    v[i] = grid[i] * (i % 3 == 0 ? -1.0f : 1.0f) * 8.0f;  // tile 0: max-abs 60 -> scale 2^3, every code once
    v[32 + i] = grid[i] * std::ldexp(1.0f, -20);           // tile 1: scale 2^-20, the grid exactly
  }
  // Tile 2: max-abs 7.6 wants a scale of 7.6 / 7.5, rounded up to 2: 7.6 is 3.8 units (nearest 3.75),
  // 2.25 is 1.125 units (exact), 0.0625 is 0.03125 units (under half the subnormal step: 0),
  // 0.1875 is 0.09375 units (nearest 0.125), and 1.0625 x 2 is a tie between 1 and 1.125 (to even: 1).
  v[64] = 7.6f;
  v[65] = -2.25f;
  v[66] = 0.0625f;
  v[67] = 0.1875f;
  v[68] = 2.125f;
  // Tile 3 stays zero; the last 5 values are a partial tile of max-abs 1: scale 2^-2.
  v[128] = 1.0f;
  v[129] = -0.3f;
  const at::Tensor value = at::tensor(v);
  LowPrecisionTensor t(value.sizes(), StorageDtype::kFp6, /*block_size=*/128);  // the tile stays 32
  t.store(value);
  const at::Tensor back = t.load();
  EXPECT_TRUE(at::equal(back.narrow(0, 0, 64), value.narrow(0, 0, 64)));
  EXPECT_EQ(back[64].item<float>(), 7.5f);
  EXPECT_EQ(back[65].item<float>(), -2.25f);
  EXPECT_EQ(back[66].item<float>(), 0.0f);
  EXPECT_EQ(back[67].item<float>(), 0.25f);
  EXPECT_EQ(back[68].item<float>(), 2.0f);
  EXPECT_TRUE(at::equal(back.narrow(0, 69, 59), at::zeros({59})));
  EXPECT_EQ(back[128].item<float>(), 1.0f);
  EXPECT_EQ(back[129].item<float>(), -0.3125f);  // -1.2 units: nearest -1.25
  const auto parts = t.parts();
  EXPECT_EQ(parts.at("data").numel(), 5 * 32 * 3 / 4);  // 4 codes in 3 bytes, the last tile padded
  EXPECT_TRUE(at::equal(parts.at("scales"), at::tensor({127 + 3, 127 - 20, 127 + 1, 127, 127 - 2}, at::kByte)));
  EXPECT_EQ(t.bytes(), 120 + 5);
  // Round to nearest: the worst relative error of a value in a tile's top binade is E2M3's half step, 1/16.
  torch::manual_seed(4);
  const at::Tensor r = at::rand({4096}) * 4.0 + 4.0;
  EXPECT_LE(((LowPrecisionTensor::round_trip(r, StorageDtype::kFp6) - r).abs() / r).max().item<float>(), 1.0f / 16 + 1e-6f);
  // Scales at FP32's ends: tiles of max-abs 3e38 (scale 2^126, whose scaling by 2^-(e + 6) would
  // overflow as one factor) and 1e-37 (2^-126, the smallest E8M0 scale it takes) load within half
  // a step of E2M3's top binade (0.25 x 2^e).
  for (const float top : {3e38f, 1e38f, 1e-37f}) {
    const at::Tensor wide = at::rand({64}) * top;
    const at::Tensor wide_back = LowPrecisionTensor::round_trip(wide, StorageDtype::kFp6);
    ASSERT_TRUE(at::isfinite(wide_back).all().item<bool>()) << top;
    for (int64_t t = 0; t < 2; ++t) {
      const at::Tensor tile = wide.narrow(0, 32 * t, 32);
      const float step = std::ldexp(0.25f, static_cast<int>(std::ceil(std::log2(tile.abs().max().item<double>() / 7.5))));
      EXPECT_LE((wide_back.narrow(0, 32 * t, 32) - tile).abs().max().item<float>(), step) << top;
      EXPECT_GT(wide_back.narrow(0, 32 * t, 32).abs().max().item<float>(), 0.0f) << top;
    }
  }
  // A tile with a NaN or an infinity loads as NaN (E8M0's 255); the other tiles are untouched.
  at::Tensor bad = value.clone();
  bad[3] = std::numeric_limits<float>::infinity();
  const at::Tensor bad_back = LowPrecisionTensor::round_trip(bad, StorageDtype::kFp6);
  EXPECT_TRUE(at::isnan(bad_back.narrow(0, 0, 32)).all().item<bool>());
  EXPECT_TRUE(at::equal(bad_back.narrow(0, 32, 32), value.narrow(0, 32, 32)));
  EXPECT_THROW(t.store_stochastic(value, 1u), std::logic_error);
}

TEST(LowPrecisionTensor, Nvfp4IsE2M1In16ValueTilesWithE4m3ScalesRoundedUp) {
  // The tensor's max-abs 2688 = 6 x 448 makes its scale g = 1, so each tile's scale is its own max-abs / 6 in E4M3.
  std::vector<float> v(5 * 16, 0.0f);
  const float grid[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int i = 0; i < 8; ++i) {
    v[i] = 448.0f * grid[i] * (i % 2 == 0 ? 1.0f : -1.0f);  // tile 0: scale 448, on its grid
    v[16 + i] = 0.5f * grid[i];                             // tile 1: max-abs 3, scale 0.5
  }
  // Tile 2: max-abs 6.3 wants a scale of 1.05; E4M3's nearest is 1 (which would clip 6.3 to 6),
  // so it takes the next one up, 1.125: 6.3 is 5.6 units, nearest 6 (6.75); 4.5 is exactly 4 units.
  v[32] = 6.3f;
  v[33] = -4.5f;
  // Tile 3 stays zero. Tile 4: max-abs 6 x 2^-12 wants 2^-12, below E4M3's smallest value 2^-9:
  // the scale is 2^-9 and 0.75 units ties to the even code, 1 unit.
  v[64] = 6.0f * std::ldexp(1.0f, -12);
  const at::Tensor value = at::tensor(v);
  LowPrecisionTensor t(value.sizes(), StorageDtype::kNvfp4, /*block_size=*/128);  // the tile stays 16
  t.store(value);
  const at::Tensor back = t.load();
  EXPECT_TRUE(at::equal(back.narrow(0, 0, 32), value.narrow(0, 0, 32)));
  EXPECT_EQ(back[32].item<float>(), 6.75f);
  EXPECT_EQ(back[33].item<float>(), -4.5f);
  EXPECT_TRUE(at::equal(back.narrow(0, 34, 30), at::zeros({30})));
  EXPECT_EQ(back[64].item<float>(), std::ldexp(1.0f, -9));
  const auto parts = t.parts();
  EXPECT_EQ(parts.at("data").numel(), 40);
  EXPECT_EQ(parts.at("scales").scalar_type(), at::kByte);
  const at::Tensor scales = parts.at("scales").view(at::kFloat8_e4m3fn).to(at::kFloat);
  EXPECT_TRUE(at::equal(scales, at::tensor({448.0f, 0.5f, 1.125f, 0.0f, std::ldexp(1.0f, -9)})));
  EXPECT_EQ(parts.at("tensor_scale").item<float>(), 1.0f);
  EXPECT_EQ(t.bytes(), 40 + 5 + 4);
  // Another tensor scale: the values x 2^-20 keep their codes and tile scales, g = 2^-20.
  const at::Tensor small = value.narrow(0, 0, 32) * std::ldexp(1.0f, -20);
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(small, StorageDtype::kNvfp4), small));
}

TEST(LowPrecisionTensor, Nvfp4StochasticRoundingIsUnbiasedAndBeatsWideTilesOnSpreadValues) {
  // Tiles of 16 led by 6 (the tensor's max-abs: every tile's scale is 1): 2.2 rounds to 3 one time in five.
  const int64_t n = 16 * 10000;
  at::Tensor v = at::full({n}, 2.2f);
  v.view({-1, 16}).select(1, 0).fill_(6.0f);
  const at::Tensor r = LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, 11u).view({-1, 16}).narrow(1, 1, 15);
  EXPECT_TRUE(at::logical_or(r == 2.0f, r == 3.0f).all().item<bool>());
  EXPECT_NEAR((r == 3.0f).to(at::kDouble).mean().item<double>(), 0.2, 0.005);
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(-v, StorageDtype::kNvfp4, 128, 11u).view({-1, 16}).narrow(1, 1, 15), -r));
  EXPECT_FALSE(at::equal(LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, 12u), LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, 11u)));
  // Values whose size varies along the row in runs of 16 (1 to 128 times a unit, as gradients'
  // do from one input feature to the next): 16-value tiles keep the smallest runs to their own
  // precision, where 128-value tiles, scaled by the largest run, round them to 0 or their first step.
  torch::manual_seed(3);
  const at::Tensor size = at::exp2(at::randint(0, 8, {64, 64}).to(at::kFloat)).repeat_interleave(16, 1);
  const at::Tensor spread = at::randn({64, 1024}) * size;
  const at::Tensor smallest = size == 1.0f;
  const auto error = [&](StorageDtype dtype) {
    const at::Tensor e = LowPrecisionTensor::round_trip(spread, dtype, 128, 7u) - spread;
    return (e.masked_select(smallest).norm() / spread.masked_select(smallest).norm()).item<double>();
  };
  EXPECT_LT(error(StorageDtype::kNvfp4), 0.3);
  EXPECT_GT(error(StorageDtype::kFp4), 1.0);
}

TEST(LowPrecisionTensor, Nvfp4HadamardRotationTurnsNearestRoundingsBiasIntoNoise) {
  // Gaussian values whose size varies from tile to tile: rounded to nearest, a value reads back
  // with the same error whenever it is stored again (a bias a moving average keeps); rounded
  // stochastically, with no bias but twice the squared error. Rotated first, with a new seed
  // each store, nearest rounding keeps about its own error per store, and the mean over 64
  // seeds is within a fifth of it.
  torch::manual_seed(4);
  const at::Tensor v = at::randn({4096, 16}) * at::exp2(at::randint(0, 6, {4096, 1}).to(at::kFloat));
  const auto rel = [&](const at::Tensor& e) { return (e.norm() / v.norm()).item<double>(); };
  const double nearest = rel(LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4) - v);
  const double stochastic = rel(LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, 3u) - v);
  at::Tensor sum = at::zeros_like(v);
  const int stores = 64;
  for (int k = 0; k < stores; ++k) {
    const at::Tensor r = LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, std::nullopt, 1000u + k);
    EXPECT_EQ(r.sizes(), v.sizes());
    EXPECT_LT(rel(r - v), 1.15 * nearest);
    EXPECT_LT(rel(r - v), 0.85 * stochastic);
    sum += r;
  }
  EXPECT_LT(rel(sum / stores - v), 0.2 * nearest);
  // A tile of one value and fifteen far smaller ones is the rotation's blind spot: its sixteen
  // rotated values share one magnitude up to less than a step, so the small ones still read
  // back as zero whatever the signs (up to the FP32 arithmetic of the rotation).
  at::Tensor spike = at::full({16}, 0.01f);
  spike[0] = 1.0f;
  const at::Tensor spike_back = LowPrecisionTensor::round_trip(spike, StorageDtype::kNvfp4, 128, std::nullopt, 5u);
  EXPECT_LT(spike_back.narrow(0, 1, 15).abs().max().item<float>(), 1e-6f);  // zero up to the FP32 rotation's rounding
  // The same seed gives the same bits, another seed others; zeros stay zeros; a count that is
  // not a multiple of 16 keeps its shape; a dtype without E2M1 codes is refused.
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, std::nullopt, 5u),
                        LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, std::nullopt, 5u)));
  EXPECT_FALSE(at::equal(LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, std::nullopt, 5u),
                         LowPrecisionTensor::round_trip(v, StorageDtype::kNvfp4, 128, std::nullopt, 6u)));
  EXPECT_TRUE(at::equal(LowPrecisionTensor::round_trip(at::zeros({3, 7}), StorageDtype::kFp4, 128, 9u, 5u), at::zeros({3, 7})));
  const at::Tensor odd = v.reshape({-1}).narrow(0, 0, 37).view({37, 1});
  const at::Tensor r_odd = LowPrecisionTensor::round_trip(odd, StorageDtype::kNvfp4, 128, std::nullopt, 5u);
  EXPECT_EQ(r_odd.sizes(), odd.sizes());
  EXPECT_LT((r_odd - odd).norm().item<double>(), 0.2 * odd.norm().item<double>());
  EXPECT_THROW(LowPrecisionTensor::round_trip(v, StorageDtype::kFp8, 128, std::nullopt, 5u), std::invalid_argument);
}

TEST(LowPrecisionTensor, CpuKernelsStoreTheCompositionsBits) {
  // The fused CPU passes and the tensor composition (what CUDA runs) store the same codes and
  // read back the same values: FP4 and NVFP4 to nearest and stochastically, FP6 to nearest, BF16 stochastically,
  // FP8 (E4M3 in 1 x 128 tiles, and its square-root form for second moments) to nearest and stochastically,
  // over an odd count with a zero tile, values on the grids and at their midpoints (FP4's, then
  // FP6's ties), a wide spread of sizes, and tiles at FP32's extremes (max-abs near FLT_MAX,
  // scales of 2^126 and 2^-126, subnormals).
  torch::manual_seed(21);
  at::Tensor v = at::randn({6001}) * at::exp2(at::randint(-12, 12, {6001}).to(at::kFloat));
  v.narrow(0, 128, 128).zero_();
  v.narrow(0, 256, 16).copy_(at::tensor({6.0f, 0.25f, 1.25f, 2.5f, 5.0f, -3.5f, 0.75f, -1.75f, 4.0f, 3.0f, 2.0f, 1.5f, 1.0f, 0.5f, 0.0f, -6.0f}));
  for (int i = 0; i < 31; ++i) {  // a tile of scale 1 (max-abs 7.5): every midpoint between E2M3 neighbours
    const auto e2m3 = [](int c) { return c < 16 ? 0.125f * static_cast<float>(c) : c < 24 ? 2.0f + 0.25f * static_cast<float>(c - 16) : 4.0f + 0.5f * static_cast<float>(c - 24); };
    v[288 + i] = (e2m3(i) + e2m3(i + 1)) / 2.0f * (i % 2 == 0 ? 1.0f : -1.0f);
  }
  v[319] = -7.5f;
  v.narrow(0, 320, 32).copy_(at::randn({32}) * at::exp2(at::randint(100, 127, {32}).to(at::kFloat)));
  v[320] = std::numeric_limits<float>::max();
  v.narrow(0, 352, 32).copy_(at::randn({32}) * std::numeric_limits<float>::min());
  v.narrow(0, 384, 32).copy_(at::randn({32}) * std::numeric_limits<float>::denorm_min() * 1000.0f);
  v.narrow(0, 416, 32 * 64).mul_(at::exp2(at::randint(-100, 100, {64}).to(at::kFloat)).repeat_interleave(32));
  v[416] = -0.0f;
  v[417] = 1e-30f;  // flushes to a signed zero code in its tile
  v[418] = -1e-30f;
  struct Case {
    StorageDtype dtype;
    std::optional<uint32_t> seed;
    bool sqrt_transform = false;
  };
  for (const Case& c : {Case{StorageDtype::kFp4, std::nullopt}, Case{StorageDtype::kFp4, 77u}, Case{StorageDtype::kNvfp4, std::nullopt},
                        Case{StorageDtype::kNvfp4, 77u}, Case{StorageDtype::kFp6, std::nullopt}, Case{StorageDtype::kBf16, 77u},
                        Case{StorageDtype::kFp8, std::nullopt}, Case{StorageDtype::kFp8, std::nullopt, true},
                        Case{StorageDtype::kFp8, 77u}, Case{StorageDtype::kFp8, 77u, true}}) {
    {
      const auto [dtype, seed, sqrt_transform] = c;
      const auto stored = [&](bool tensor_ops) {
        use_codec_tensor_ops_on_cpu(tensor_ops);
        LowPrecisionTensor t(v.sizes(), dtype, 128, sqrt_transform);
        if (seed) {
          t.store_stochastic(v, *seed);
        } else {
          t.store(v);
        }
        auto parts = t.parts();
        parts["loaded"] = t.load();
        use_codec_tensor_ops_on_cpu(false);
        return parts;
      };
      const auto fused = stored(false), composed = stored(true);
      ASSERT_EQ(fused.size(), composed.size());
      for (const auto& [name, tensor] : fused) {
        EXPECT_TRUE(at::equal(tensor, composed.at(name))) << storage_dtype_name(dtype) << " " << name << (seed ? " stochastic" : "")
                                                          << (sqrt_transform ? " sqrt" : "");
      }
    }
  }
  // FP8 codes of a NaN (either sign) and of the values beside it in its tile agree too (its loaded values are NaN-free elsewhere).
  at::Tensor with_nan = v.narrow(0, 0, 256).clone();
  with_nan[5] = std::numeric_limits<float>::quiet_NaN();
  with_nan[200] = -std::numeric_limits<float>::quiet_NaN();
  for (const bool stochastic : {false, true}) {
    std::map<std::string, at::Tensor> parts[2];
    for (const bool tensor_ops : {false, true}) {
      use_codec_tensor_ops_on_cpu(tensor_ops);
      LowPrecisionTensor t(with_nan.sizes(), StorageDtype::kFp8);
      if (stochastic) {
        t.store_stochastic(with_nan, 5);
      } else {
        t.store(with_nan);
      }
      parts[tensor_ops ? 1 : 0] = t.parts();
      use_codec_tensor_ops_on_cpu(false);
    }
    EXPECT_TRUE(at::equal(parts[0].at("data"), parts[1].at("data"))) << stochastic;
    EXPECT_TRUE(at::equal(parts[0].at("scales"), parts[1].at("scales"))) << stochastic;
    EXPECT_EQ(parts[0].at("data")[5].item<uint8_t>(), 0x7F) << stochastic;
    EXPECT_EQ(parts[0].at("data")[200].item<uint8_t>(), 0xFF) << stochastic;
  }
}

TEST(LowPrecisionTensor, Fp8StochasticRoundingIsUnbiasedAndKeepsShrinkingSecondMomentsRight) {
  // Tiles of scale 1 (max-abs 448): 1 + 2^-5 lies a quarter of the way from E4M3's 1 to
  // 1.125, and 2^-10 half way from 0 to the smallest subnormal 2^-9.
  at::Tensor v = at::full({2000, 128}, 1.0 + std::ldexp(1.0, -5), at::kFloat);
  v.select(1, 0).fill_(448.0);
  v.narrow(1, 64, 64).fill_(std::ldexp(1.0, -10));
  v.narrow(1, 96, 32).neg_();
  LowPrecisionTensor t(v.sizes(), StorageDtype::kFp8);
  t.store_stochastic(v, 3);
  const at::Tensor r = t.load().to(at::kDouble);
  EXPECT_TRUE(at::equal(r.select(1, 0), v.select(1, 0).to(at::kDouble)));  // values on the grid stay
  const at::Tensor normal = r.narrow(1, 1, 63), subnormal = r.narrow(1, 64, 32), negative = r.narrow(1, 96, 32);
  EXPECT_TRUE(at::logical_or(normal == 1.0, normal == 1.125).all().item<bool>());
  EXPECT_NEAR((normal == 1.125).to(at::kDouble).mean().item<double>(), 0.25, 0.005);
  EXPECT_NEAR(normal.mean().item<double>(), 1.0 + std::ldexp(1.0, -5), 1e-3);
  EXPECT_TRUE(at::logical_or(subnormal == 0.0, subnormal == std::ldexp(1.0, -9)).all().item<bool>());
  EXPECT_NEAR(subnormal.mean().item<double>(), std::ldexp(1.0, -10), std::ldexp(1.0, -15));
  EXPECT_NEAR(negative.mean().item<double>(), -std::ldexp(1.0, -10), std::ldexp(1.0, -15));
  t.store(v);
  EXPECT_TRUE((t.load().narrow(1, 1, 63) == 1.0).all().item<bool>());  // to nearest: every one down, biased by 2^-5
  // The same seed stores the same bits, another seed other bits.
  LowPrecisionTensor again(v.sizes(), StorageDtype::kFp8), other(v.sizes(), StorageDtype::kFp8);
  again.store_stochastic(v, 3);
  other.store_stochastic(v, 4);
  EXPECT_TRUE(at::equal(again.load(), r.to(at::kFloat)));
  EXPECT_FALSE(at::equal(other.load(), r.to(at::kFloat)));

  // A second moment (stored as its square root) whose gradients shrink 3x over 300 steps of
  // v = 0.95 v + 0.05 g^2: rounded to nearest, a root that moved less than half a step keeps
  // its code, so the stored moment ends well above FP32's; rounded stochastically it follows it.
  torch::manual_seed(4);
  const int64_t n = 128 * 64;
  at::Tensor exact = at::zeros({n});
  LowPrecisionTensor nearest(exact.sizes(), StorageDtype::kFp8, 128, true), stochastic(exact.sizes(), StorageDtype::kFp8, 128, true);
  for (int step = 0; step < 300; ++step) {
    const at::Tensor g = at::randn({n}) * (1.0 - 2.0 / 3.0 * step / 300.0);
    exact = exact * 0.95 + g * g * 0.05;
    nearest.store(nearest.load() * 0.95 + g * g * 0.05);
    stochastic.store_stochastic(stochastic.load() * 0.95 + g * g * 0.05, static_cast<uint32_t>(step));
  }
  const double nearest_ratio = (nearest.load() / exact).median().item<double>();
  const double stochastic_ratio = (stochastic.load() / exact).median().item<double>();
  EXPECT_GT(nearest_ratio, 1.1);
  EXPECT_NEAR(stochastic_ratio, 1.0, 0.02);
}

}  // namespace


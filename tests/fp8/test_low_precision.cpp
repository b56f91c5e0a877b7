#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>

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
                        Case{StorageDtype::kFp4, 0.12, 0.5 + 4.0 / 128}}) {
    LowPrecisionTensor t(value.sizes(), c.dtype);
    t.store(value);
    const at::Tensor back = t.load();
    EXPECT_EQ(back.sizes(), value.sizes());
    EXPECT_LE(((back - value).norm() / value.norm()).item<double>(), c.max_relative) << storage_dtype_name(c.dtype);
    EXPECT_NEAR(static_cast<double>(t.bytes()) / value.numel(), c.bytes_per_element, 0.01) << storage_dtype_name(c.dtype);
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
  for (StorageDtype dtype : {StorageDtype::kFp32, StorageDtype::kBf16, StorageDtype::kFp16, StorageDtype::kFp8, StorageDtype::kFp4}) {
    LowPrecisionTensor a(value.sizes(), dtype);
    a.store(value);
    LowPrecisionTensor b(value.sizes(), dtype);
    b.restore(a.parts(), "test");
    EXPECT_TRUE(at::equal(a.load(), b.load())) << storage_dtype_name(dtype);
  }
  LowPrecisionTensor c(value.sizes(), StorageDtype::kFp8);
  EXPECT_THROW(c.restore({{"data", at::zeros({3})}}, "x"), std::runtime_error);
  EXPECT_EQ(parse_storage_dtype("fp4"), StorageDtype::kFp4);
  EXPECT_THROW(parse_storage_dtype("fp6"), std::invalid_argument);
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
  // FP8 has no stochastic store.
  LowPrecisionTensor fp8_state(v.sizes(), StorageDtype::kFp8);
  EXPECT_THROW(fp8_state.store_stochastic(v, 1), std::logic_error);
}

}  // namespace

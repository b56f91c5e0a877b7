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
                        Case{StorageDtype::kFp16, 5e-4, 2.0}, Case{StorageDtype::kFp8, 0.06, 1.0 + 4.0 / 128}}) {
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
  for (StorageDtype dtype : {StorageDtype::kFp32, StorageDtype::kBf16, StorageDtype::kFp16, StorageDtype::kFp8}) {
    LowPrecisionTensor a(value.sizes(), dtype);
    a.store(value);
    LowPrecisionTensor b(value.sizes(), dtype);
    b.restore(a.parts(), "test");
    EXPECT_TRUE(at::equal(a.load(), b.load())) << storage_dtype_name(dtype);
  }
  LowPrecisionTensor c(value.sizes(), StorageDtype::kFp8);
  EXPECT_THROW(c.restore({{"data", at::zeros({3})}}, "x"), std::runtime_error);
  EXPECT_THROW(parse_storage_dtype("fp4"), std::invalid_argument);
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

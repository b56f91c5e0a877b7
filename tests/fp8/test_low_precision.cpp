#include <gtest/gtest.h>

#include <torch/torch.h>

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

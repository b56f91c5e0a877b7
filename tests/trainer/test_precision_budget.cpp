// The precision choice from measured GEMM rates (injected, so the test does not
// depend on the machine) and the sizing of a schedule from a budget.
#include <gtest/gtest.h>

#include <cstdlib>

#include "trainer/budget.h"
#include "trainer/precision.h"

namespace {

using namespace fmoe::trainer;
using namespace fmoe::config;

const GemmRates kAvx2{1.3, 121};     // AMD EPYC, AVX2 only: BF16 falls back to a generic loop
const GemmRates kAmx{690, 190};      // Xeon with AMX / AVX512-BF16
const GemmRates kAvx512Bf16{80, 126};  // a Xeon with AVX512-BF16 but no AMX, as measured here

TEST(Precision, AutoPicksFp32WhereBf16IsSlower) {
  const PrecisionChoice c = choose_precision("auto", kAvx2);
  EXPECT_EQ(c.name, "fp32");
  EXPECT_EQ(c.dtype, at::kFloat);
  EXPECT_FALSE(c.warning);
  EXPECT_EQ(c.message, "precision auto -> fp32 (bf16 GEMM 1.3 GFLOP/s, fp32 121 GFLOP/s)");
  EXPECT_EQ(choose_precision("auto", kAvx512Bf16).name, "fp32");
}

TEST(Precision, AutoPicksBf16WhereItIsFaster) {
  const PrecisionChoice c = choose_precision("auto", kAmx);
  EXPECT_EQ(c.name, "bf16");
  EXPECT_EQ(c.dtype, at::kBFloat16);
  EXPECT_EQ(c.message, "precision auto -> bf16 (bf16 GEMM 690 GFLOP/s, fp32 190 GFLOP/s)");
}

TEST(Precision, ExplicitBf16OnASlowMachineRunsButWarns) {
  const PrecisionChoice c = choose_precision("bf16", kAvx2);
  EXPECT_EQ(c.dtype, at::kBFloat16);
  EXPECT_TRUE(c.warning);
  EXPECT_EQ(c.message,
            "warning: training.precision bf16 is slower than fp32 on this machine (bf16 GEMM 1.3 GFLOP/s, fp32 121 "
            "GFLOP/s); set training.precision: auto or fp32 to train faster");
  EXPECT_FALSE(choose_precision("bf16", kAmx).warning);
  const PrecisionChoice f = choose_precision("fp32", kAmx);
  EXPECT_EQ(f.dtype, at::kFloat);
  EXPECT_FALSE(f.warning);
}

TEST(Precision, InjectedRatesParseAndBadOnesAreNamed) {
  const auto rates = injected_gemm_rates("bf16=1.3,fp32=121");
  ASSERT_TRUE(rates.has_value());
  EXPECT_DOUBLE_EQ(rates->bf16_gflops, 1.3);
  EXPECT_DOUBLE_EQ(rates->fp32_gflops, 121);
  EXPECT_TRUE(rates->injected);
  try {
    injected_gemm_rates("fast");
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "FMOE_GEMM_GFLOPS: expected 'bf16=RATE,fp32=RATE' in GFLOP/s, got 'fast'");
  }
  EXPECT_FALSE(injected_gemm_rates("").has_value());
}

TEST(Precision, InjectedRatesAreNamedWhereTheyArePrinted) {
  const PrecisionChoice c = choose_precision("auto", *injected_gemm_rates("bf16=1.3,fp32=121"));
  EXPECT_EQ(c.message, "precision auto -> fp32 (bf16 GEMM 1.3 GFLOP/s, fp32 121 GFLOP/s, injected by FMOE_GEMM_GFLOPS, not measured)");
}

TEST(Precision, MeasuredRatesArePositive) {
  // Not a speed assertion: the measurement returns a rate for both dtypes at a small shape.
  const GemmRates r = measure_gemm_rates({256, 64, 128}, 0.05);
  EXPECT_GT(r.bf16_gflops, 0);
  EXPECT_GT(r.fp32_gflops, 0);
  EXPECT_GT(measure_peak_gflops(at::kFloat, 0.05), 0);
}

TEST(Budget, SecondsAreTheTightestLimit) {
  BudgetConfig b;
  EXPECT_EQ(budget_seconds(b, 2), 0);
  b.max_minutes = 8;
  EXPECT_DOUBLE_EQ(budget_seconds(b, 2), 480);
  b.max_gpu_hours = 0.1;  // 2 ranks: 180 s of wall clock
  EXPECT_DOUBLE_EQ(budget_seconds(b, 2), 180);
  b.usd_per_gpu_hour = 2;
  b.max_usd = 0.1;  // 0.05 GPU-hours over 2 ranks: 90 s
  EXPECT_DOUBLE_EQ(budget_seconds(b, 2), 90);
}

// A 480 s budget with a 2 s validation pass every 100 steps, at the given point.
ScheduleInputs schedule_at(double elapsed, int64_t step, double step_seconds) {
  ScheduleInputs in;
  in.limit_seconds = 480;
  in.elapsed_seconds = elapsed;
  in.decided_at_step = step;
  in.step_seconds = step_seconds;
  in.eval_seconds = 2.0;
  in.eval_interval = 100;
  return in;
}

TEST(Budget, ScheduleFillsThePlannedFraction) {
  ScheduleInputs in = schedule_at(10, 10, 1.0);
  // 0.9 * 480 - 10 spent - 2 for the final pass = 420 s at 1.02 s per step (eval amortised): 411 more.
  EXPECT_EQ(size_schedule(in), 421);
  in.eval_interval = 0;  // only the final pass: 420 more
  EXPECT_EQ(size_schedule(in), 430);
  in.token_limit_steps = 300;  // a token limit caps it
  EXPECT_EQ(size_schedule(in), 300);
  in.token_limit_steps = 0;
  in.elapsed_seconds = 1000;  // already over: one more step, never none
  EXPECT_EQ(size_schedule(in), 11);
  ScheduleInputs tokens_only;
  tokens_only.token_limit_steps = 123;
  EXPECT_EQ(size_schedule(tokens_only), 123);
  // A token limit in steps: whole steps, at least one; none without a limit.
  BudgetConfig b;
  EXPECT_EQ(token_limit_steps(b, 1024), 0);
  b.max_tokens = 126'000;
  EXPECT_EQ(token_limit_steps(b, 1024), 123);
  b.max_tokens = 100;
  EXPECT_EQ(token_limit_steps(b, 1024), 1);
}

TEST(Budget, AScheduleThatSlowsDownIsShortenedToFitItsLimit) {
  // Fixed at 421 steps of 1 s (eval every 100 steps, 2 s a pass) in a 480 s budget;
  // now at step 200, 250 s spent, steps take 1.2 s.
  ScheduleInputs now = schedule_at(250, 200, 1.2);
  // 221 steps x 1.2 s + passes at 300 and 400 and the final one x 2 s.
  EXPECT_DOUBLE_EQ(projected_seconds(now, 421), 250 + 221 * 1.2 + 3 * 2.0);
  // 0.9 x (480 - 250) - 2 = 205 s at 1.22 s per step: 168 more steps.
  EXPECT_EQ(shortened_schedule(now, 421), 368);
  EXPECT_LE(projected_seconds(now, 368), now.limit_seconds);
  // Within the limit it stays as it is, even past the planned fraction; shortening never lengthens.
  now.step_seconds = 0.95;
  EXPECT_LE(projected_seconds(now, 421), 480);
  EXPECT_EQ(shortened_schedule(now, 421), 421);
  // Past the limit already: the next step ends it; a step at the end stays the end.
  now.step_seconds = 1.2;
  now.elapsed_seconds = 500;
  EXPECT_EQ(shortened_schedule(now, 421), 201);
  EXPECT_EQ(shortened_schedule(now, 200), 200);
  // Without a time limit nothing changes.
  now.limit_seconds = 0;
  EXPECT_EQ(shortened_schedule(now, 421), 421);
}

TEST(Budget, AShortenedScheduleWhoseStepsGetFasterIsLengthenedBack) {
  // Shortened to 368 at step 200; now at step 260, 310 s spent, steps take 0.6 s again.
  ScheduleInputs now = schedule_at(310, 260, 0.6);
  // 108 steps x 0.6 s + the pass at 300 and the final one: 378.8 s, under 0.8 x 480 = 384 s.
  EXPECT_DOUBLE_EQ(projected_seconds(now, 368), 310 + 108 * 0.6 + 2 * 2.0);
  // 0.9 x 480 - 310 - 2 = 120 s (a tenth of the whole limit stays free) at 0.62 s per step: 193 more.
  EXPECT_EQ(lengthened_schedule(now, 368), 453);
  EXPECT_EQ(resized_schedule(now, 368), 453);
  EXPECT_DOUBLE_EQ(projected_seconds(now, 453), 310 + 193 * 0.6 + 3 * 2.0);
  // At a steady step time the lengthened schedule stays as it is (projected between 80% and 100% of the limit).
  EXPECT_GE(projected_seconds(now, 453), kBudgetGrowBelowFraction * now.limit_seconds);
  EXPECT_EQ(resized_schedule(now, 453), 453);
  // A token limit caps it; it never makes a schedule shorter.
  now.token_limit_steps = 400;
  EXPECT_EQ(lengthened_schedule(now, 368), 400);
  now.token_limit_steps = 300;
  EXPECT_EQ(lengthened_schedule(now, 368), 368);
  now.token_limit_steps = 0;
  // Between 80% and 100% of the limit nothing changes: 310 + 108 x 0.8 + 4 = 400.4 s.
  now.step_seconds = 0.8;
  EXPECT_EQ(lengthened_schedule(now, 368), 368);
  EXPECT_EQ(resized_schedule(now, 368), 368);
  // Slower again past the limit: resized_schedule shortens (as shortened_schedule).
  ScheduleInputs slow = schedule_at(250, 200, 1.2);
  EXPECT_EQ(resized_schedule(slow, 421), 368);
  EXPECT_EQ(lengthened_schedule(slow, 421), 421);
  // Without a time limit nothing changes.
  now.step_seconds = 0.6;
  now.limit_seconds = 0;
  EXPECT_EQ(resized_schedule(now, 368), 368);
}

TEST(Budget, TheRecentStepTimeIsTheWindowsMedian) {
  // One step of a busy second among ten: the median stays at the typical step.
  EXPECT_DOUBLE_EQ(recent_step_seconds({0.38, 0.39, 0.94, 0.39, 0.38, 0.40, 0.39, 0.41, 0.38, 0.39}), 0.39);
  // A slowdown over more than half the window moves it.
  EXPECT_DOUBLE_EQ(recent_step_seconds({0.4, 0.4, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9}), 0.9);
  EXPECT_DOUBLE_EQ(recent_step_seconds({0.3, 0.1, 0.2}), 0.2);
  EXPECT_DOUBLE_EQ(recent_step_seconds({0.4, 0.2, 0.1, 0.3}), 0.25);
  EXPECT_DOUBLE_EQ(recent_step_seconds({}), 0.0);
}

TEST(Budget, InjectedCalibration) {
  double step = 0, eval = 0;
  EXPECT_FALSE(injected_calibration("", step, eval));
  EXPECT_TRUE(injected_calibration("step=0.25,eval=0.5", step, eval));
  EXPECT_DOUBLE_EQ(step, 0.25);
  EXPECT_DOUBLE_EQ(eval, 0.5);
  EXPECT_THROW(injected_calibration("step=fast", step, eval), std::runtime_error);
}

}  // namespace

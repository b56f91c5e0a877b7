// Step-time breakdown of a config's training step on this machine: forward,
// backward, optimizer, data, with tokens/s and MFU. Not a test: run by scripts/bench.sh.
//
//   bench_step --config configs/tiny.yaml [--steps N] [--set k=v]...
//
// FMOE_PROFILE=trace.json records the timed steps with LibTorch's profiler
// (a Chrome trace; tests/bench/profile_summary.py totals self time per op).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>

#include "common/test_hooks.h"
#include "data/loader.h"
#include "launch/cli.h"
#include "moe/model.h"
#include "config/config.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/precision.h"

using namespace fmoe;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  launch::configure_allocator();
  try {
    const auto args = launch::parse_args(argc, argv, 1, {});
    const config::Config cfg = config::load_config(args.get("config", "configs/tiny.yaml"), args.all("set"));
    const int64_t steps = std::stoll(args.get("steps", "12"));
    const int64_t warmup = 2;
    const auto& tc = cfg.training;
    if (tc.threads > 0) at::set_num_threads(static_cast<int>(tc.threads));
    const trainer::GemmRates rates = trainer::measure_gemm_rates(trainer::run_gemm_shape(cfg));
    const trainer::PrecisionChoice choice = trainer::choose_precision(tc.precision, rates);
    std::printf("%s\n", choice.message.c_str());
    const at::ScalarType dtype = choice.dtype;
    torch::manual_seed(static_cast<uint64_t>(tc.seed));
    auto model = std::make_shared<moe::MoEModel>(cfg.model);
    std::vector<trainer::NamedParameter> params;
    for (const auto& p : model->named_parameters()) params.push_back({p.key(), p.value()});
    trainer::Optimizer optimizer(params, cfg.optimizer);
    data::LoaderOptions lo;
    lo.seq_len = tc.seq_len;
    lo.micro_batch_size = tc.micro_batch_size;
    lo.num_micro_batches = tc.grad_accum_steps;
    lo.val_fraction = cfg.data.val_fraction;
    const data::TokenLoader loader(data::IndexedDataset::open(cfg.data.prefix), lo);

    double t_data = 0, t_fwd = 0, t_bwd = 0, t_opt = 0;
    const auto seconds = [](Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); };
    std::unique_ptr<torch::autograd::profiler::RecordProfile> profile;
    for (int64_t step = 0; step < warmup + steps; ++step) {
      const bool timed = step >= warmup;
      if (step == warmup && !fmoe::common::test_hooks().profile.empty()) {
        profile = std::make_unique<torch::autograd::profiler::RecordProfile>(fmoe::common::test_hooks().profile);
      }
      for (int64_t micro = 0; micro < tc.grad_accum_steps; ++micro) {
        auto t = Clock::now();
        const at::Tensor batch = loader.train_batch(step, micro, 0);
        if (timed) t_data += seconds(t);
        t = Clock::now();
        const moe::ModelOutput out = model->forward(batch, dtype, cfg.precision.fp8);
        if (timed) t_fwd += seconds(t);
        t = Clock::now();
        out.loss.backward();
        if (timed) t_bwd += seconds(t);
      }
      auto t = Clock::now();
      optimizer.quantize_gradients();
      std::vector<at::Tensor> grads;
      for (const auto& p : params) grads.push_back(p.tensor.grad());
      trainer::clip_grad_norm(grads, cfg.optimizer.grad_clip);
      optimizer.step(1e-4);
      model->zero_grad(true);
      std::vector<at::Tensor> loads;
      for (const auto& layer : model->moe_layers()) loads.push_back(layer->step_load.clone());
      model->update_expert_biases(loads);
      if (timed) t_opt += seconds(t);
    }
    profile.reset();  // writes the trace
    const double total = t_data + t_fwd + t_bwd + t_opt;
    const double tokens = static_cast<double>(steps * tc.micro_batch_size * tc.seq_len * tc.grad_accum_steps);
    const double flops = moe::training_flops_per_token(cfg.model, tc.seq_len);
    const double peak = trainer::measure_peak_gflops(dtype);
    std::printf("threads %d | %s | %.2fM params | %.1f MFLOP/token | peak %.0f GFLOP/s\n", at::get_num_threads(),
                choice.name.c_str(), moe::count_parameters(cfg.model).total / 1e6, flops / 1e6, peak);
    std::printf("per step: data %.1f ms | forward %.1f ms | backward %.1f ms | optimizer %.1f ms | total %.1f ms\n",
                1e3 * t_data / steps, 1e3 * t_fwd / steps, 1e3 * t_bwd / steps, 1e3 * t_opt / steps, 1e3 * total / steps);
    std::printf("tokens/s %.0f | MFU %.1f%%\n", tokens / total, 100.0 * flops * tokens / total / (peak * 1e9));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step: error: %s\n", e.what());
    return 1;
  }
}

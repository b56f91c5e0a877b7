// The planner's arithmetic on hand-checkable cases, the DeepSeek-V3 plan on
// DeepSeek's cluster, and the search. Runs with the source tree as cwd.
#include <gtest/gtest.h>

#include <fstream>

#include <cmath>

#include "moe/model_config.h"
#include "config/config.h"
#include "plan/measured.h"
#include "plan/plan.h"

namespace {

using namespace fmoe::plan;
using fmoe::config::load_config;

Layout layout(int64_t tp, int64_t pp, int64_t ep, int64_t dp, int64_t mb, int64_t micro, bool zero1) {
  Layout l;
  l.tp = tp, l.pp = pp, l.ep = ep, l.dp = dp, l.micro_batch_size = mb, l.num_micro_batches = micro, l.zero1 = zero1;
  return l;
}

TEST(Plan, MemoryAndCommunicationByHand) {
  const Config mixtral = load_config("configs/presets/mixtral-8x7b.yaml");
  const ClusterSpec h100 = load_cluster("h100-sxm");
  const Plan p = make_plan(mixtral, h100, layout(1, 1, 8, 8, 1, 4, true), 1e12, Assumptions());
  const auto counts = fmoe::moe::count_parameters(mixtral.model);
  const double experts = static_cast<double>(counts.routed_experts), dense = static_cast<double>(counts.total) - experts;
  const double local = dense + experts / 8;
  EXPECT_DOUBLE_EQ(p.memory.weights, 2 * local);
  EXPECT_DOUBLE_EQ(p.memory.grads, 4 * local);
  // ZeRO-1: dense state over dp = 8, expert state over expert-dp = dp / ep = 1.
  EXPECT_DOUBLE_EQ(p.memory.master, 4 * (dense / 8 + experts / 8));
  EXPECT_DOUBLE_EQ(p.memory.optimizer, 8 * (dense / 8 + experts / 8));
  // Muon: one FP32 moment for the matrices, AdamW's two for the embedding, head, norms and router.
  Config muon = mixtral;
  muon.optimizer.name = "muon";
  const double adamw = static_cast<double>(counts.embedding + counts.head + counts.norms + counts.router);
  const Plan pm = make_plan(muon, h100, layout(1, 1, 8, 8, 1, 4, true), 1e12, Assumptions());
  EXPECT_DOUBLE_EQ(pm.memory.optimizer, 4 * (dense / 8 + experts / 8) + 4 * adamw / 8);
  EXPECT_DOUBLE_EQ(pm.memory.master, p.memory.master);
  // Every gradient stored in FP6 (E2M3 with an E8M0 scale per 32 values).
  muon.optimizer.grad_dtype = "fp6";
  EXPECT_DOUBLE_EQ(make_plan(muon, h100, layout(1, 1, 8, 8, 1, 4, true), 1e12, Assumptions()).memory.grads, (0.75 + 1.0 / 32) * local);
  muon.optimizer.exp_avg_dtype = "fp6";  // the momentum too: the second moment stays FP32 here
  EXPECT_DOUBLE_EQ(make_plan(muon, h100, layout(1, 1, 8, 8, 1, 4, true), 1e12, Assumptions()).memory.optimizer,
                   (0.75 + 1.0 / 32) * (dense / 8 + experts / 8) + 4 * adamw / 8);
  // All-to-all: 32 MoE layers x 4 exchanges (dispatch, combine; forward, backward) x 4 micro-batches
  // x 4096 tokens x top-2 x 4096 hidden x 2 bytes x 7/8 leaving the GPU.
  EXPECT_DOUBLE_EQ(p.comm.ep_bytes, 32.0 * 4 * 4 * 4096 * 2 * 4096 * 2 * 7 / 8);
  EXPECT_DOUBLE_EQ(p.comm.tp_bytes, 0);
  EXPECT_DOUBLE_EQ(p.bubble_fraction, 0);
  // What the assumed overlaps leave on the step: half the all-to-all, a tenth of the dp traffic.
  EXPECT_DOUBLE_EQ(p.comm_exposed_seconds, 0.5 * p.comm.ep_seconds + 0.1 * p.comm.dp_seconds);
  // The update: state read and written (12 bytes a parameter of its ZeRO-1 share),
  // FP32 gradients of the share read, the BF16 weights written, through HBM.
  const double share = dense / 8 + experts / 8;
  EXPECT_DOUBLE_EQ(p.optimizer_bytes, 2 * 12 * share + 4 * share + 2 * local);
  EXPECT_DOUBLE_EQ(p.optimizer_seconds, p.optimizer_bytes / (h100.hbm_tb_per_s * 1e12));
  EXPECT_DOUBLE_EQ(p.step_seconds, p.compute_seconds + p.optimizer_seconds + p.comm_exposed_seconds);
  EXPECT_DOUBLE_EQ(p.tokens_per_step, 4096.0 * 4 * 8);
  EXPECT_NEAR(p.gpu_hours, 1e12 / p.tokens_per_step * p.step_seconds * 8 / 3600, 1e-6);
  EXPECT_NEAR(p.usd, p.gpu_hours * 2.5, 1e-6);

  const Plan piped = make_plan(mixtral, h100, layout(2, 4, 1, 1, 1, 12, false), 1e12, Assumptions());
  EXPECT_DOUBLE_EQ(piped.bubble_fraction, 3.0 / 12);
  EXPECT_GT(piped.comm.tp_bytes, 0);
  EXPECT_GT(piped.comm.pp_bytes, 0);
  EXPECT_THROW(make_plan(mixtral, h100, layout(3, 1, 1, 1, 1, 1, false), 1e12, Assumptions()), ConfigError);
  EXPECT_THROW(make_plan(mixtral, h100, layout(1, 1, 3, 6, 1, 1, false), 1e12, Assumptions()), ConfigError);
}

TEST(Plan, MuonsNewtonSchulzFlopsByHand) {
  Config tiny = load_config("configs/tiny.yaml");
  // 4 layers (1 dense), D 256, 4 heads of 64 over 2 KV heads, FFN 1024, 16 experts and 1 shared of 256; 5 iterations.
  const NewtonSchulzFlops f = newton_schulz_flops(tiny.model, 5);
  const double square = 5 * 6 * std::pow(256.0, 3);                                   // 256 x 256: 5 (4 + 2) 256^3
  const double kv = 5 * (4 * 128.0 * 128 * 256 + 2 * std::pow(128.0, 3));               // 128 x 256
  const double wide = 5 * (4 * 256.0 * 256 * 1024 + 2 * std::pow(256.0, 3));            // 256 x 1024
  EXPECT_DOUBLE_EQ(f.experts, 3 * 16 * 3 * square);
  EXPECT_DOUBLE_EQ(f.dense, 4 * (2 * square + 2 * kv) + 3 * wide + 3 * 3 * square);
  // On the step: none under AdamW; under Muon, dp2 + ep2 without ZeRO-1: every dense matrix, half the experts.
  const ClusterSpec cpu = load_cluster("cpu-local");
  const Plan adamw = make_plan(tiny, cpu, layout(1, 1, 2, 2, 4, 1, false), 1e9, Assumptions());
  tiny.optimizer.name = "muon";
  const Plan muon = make_plan(tiny, cpu, layout(1, 1, 2, 2, 4, 1, false), 1e9, Assumptions());
  EXPECT_EQ(adamw.newton_schulz_flops, 0);
  EXPECT_DOUBLE_EQ(muon.newton_schulz_flops, f.dense + f.experts / 2);
  EXPECT_DOUBLE_EQ(muon.step_seconds, adamw.step_seconds - adamw.optimizer_seconds + muon.optimizer_seconds + muon.newton_schulz_seconds);
  EXPECT_LT(muon.optimizer_bytes, adamw.optimizer_bytes);  // one moment for the matrices instead of two
  // ZeRO-1 spreads the dense matrices over dp (the experts' edp group is 1 here).
  const Plan zero = make_plan(tiny, cpu, layout(1, 1, 2, 2, 4, 1, true), 1e9, Assumptions());
  EXPECT_DOUBLE_EQ(zero.newton_schulz_flops, f.dense / 2 + f.experts / 2);
}

TEST(Plan, DeepSeekV3OnDeepSeeksClusterFitsAndPricesTheRun) {
  // pp16, ep64, ZeRO-1 data parallelism, no tp, on 2048 H800; 15360 sequences of 4096 per step.
  Config v3 = load_config("configs/presets/deepseek-v3.yaml");
  Layout deepseek = layout(1, 16, 64, 128, 1, 120, true);
  deepseek.recompute = "selective";  // RMSNorm and MLA up-projections recomputed, as the report describes
  const Plan p = make_plan(v3, load_cluster("h800"), deepseek, 14.8e12, Assumptions());
  EXPECT_TRUE(p.fits) << p.memory.total() / (1 << 30) << " GiB";
  deepseek.recompute = "none";  // keeping every activation does not fit in 80 GB
  EXPECT_FALSE(make_plan(v3, load_cluster("h800"), deepseek, 14.8e12, Assumptions()).fits);
  EXPECT_DOUBLE_EQ(p.tokens_per_step, 15360.0 * 4096);
  EXPECT_NEAR(p.bubble_fraction, 15.0 / 120, 1e-12);
  // DeepSeek's 2.664M H800 GPU-hours for 14.8T tokens imply ~20% of the FP8 peak
  // (~40% of the BF16 peak) with these FLOPs per token.
  const double implied_mfu = p.flops_per_token * 14.8e12 / (2.664e6 * 3600.0) / 1979e12;
  EXPECT_GT(implied_mfu, 0.18);
  EXPECT_LT(implied_mfu, 0.21);
}

TEST(Plan, SearchRanksFittingLayoutsByCost) {
  const Config mixtral = load_config("configs/presets/mixtral-8x7b.yaml");
  const auto plans = search_plans(mixtral, load_cluster("h100-sxm"), 64, 2048, 1e12, Assumptions());
  ASSERT_FALSE(plans.empty());
  for (size_t i = 0; i < plans.size(); ++i) {
    EXPECT_TRUE(plans[i].fits);
    EXPECT_EQ(plans[i].layout.gpus(), 64);
    EXPECT_DOUBLE_EQ(plans[i].tokens_per_step, 2048.0 * 4096);
    if (i > 0) {
      EXPECT_LE(plans[i - 1].usd, plans[i].usd);
    }
  }
}

TEST(Plan, CpuRanksShareTheirNodesCores) {
  // cpu-local: 2 ranks per node share its peak. Two data-parallel ranks each
  // compute half the tokens at half the rate: as long as one rank alone, with
  // the flat FP32 gradient buckets (4 bytes per parameter) on top of its memory.
  Config tiny = load_config("configs/tiny.yaml");
  tiny.training.precision = "bf16";
  const ClusterSpec cpu = load_cluster("cpu-local");
  const Plan one = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  const Plan two = make_plan(tiny, cpu, layout(1, 1, 1, 2, 8, 1, false), 1e9, Assumptions());
  EXPECT_DOUBLE_EQ(two.compute_seconds, one.compute_seconds);
  EXPECT_NEAR(two.mfu * two.step_seconds, one.mfu * one.step_seconds, 1e-12);
  const double params = static_cast<double>(fmoe::moe::count_parameters(tiny.model).total);
  EXPECT_DOUBLE_EQ(two.memory.grads - one.memory.grads, 4 * params);
  // Each of the two updates the whole replicated model at half the node's memory bandwidth.
  EXPECT_DOUBLE_EQ(two.optimizer_bytes, one.optimizer_bytes);
  EXPECT_DOUBLE_EQ(two.optimizer_seconds, 2 * one.optimizer_seconds);
  // A GPU is its own: the same two ranks on H100s halve the compute time.
  const ClusterSpec h100 = load_cluster("h100-sxm");
  EXPECT_DOUBLE_EQ(make_plan(tiny, h100, layout(1, 1, 1, 2, 8, 1, false), 1e9, Assumptions()).compute_seconds,
                   make_plan(tiny, h100, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions()).compute_seconds / 2);
}

TEST(Plan, ACpuRankOfSeveralThreadsComputesAtTheThreadEfficiency) {
  // cpu-local: 2 cores a node. One rank runs 2 threads (at thread_efficiency of
  // two cores); two ranks run one thread each (unaffected).
  Config tiny = load_config("configs/tiny.yaml");
  tiny.training.precision = "fp32";
  const ClusterSpec cpu = load_cluster("cpu-local");
  Assumptions slow;
  set_assumption(slow, "thread_efficiency=0.8");
  const Plan one = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  const Plan one_slow = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, slow);
  EXPECT_NEAR(one_slow.gemm_seconds, one.gemm_seconds / 0.8, 1e-12);
  EXPECT_NEAR(one_slow.elementwise_seconds, one.elementwise_seconds / 0.8, 1e-12);
  EXPECT_DOUBLE_EQ(make_plan(tiny, cpu, layout(1, 1, 1, 2, 8, 1, false), 1e9, slow).compute_seconds,
                   make_plan(tiny, cpu, layout(1, 1, 1, 2, 8, 1, false), 1e9, Assumptions()).compute_seconds);
  // A GPU has no threads to lose.
  const ClusterSpec h100 = load_cluster("h100-sxm");
  EXPECT_DOUBLE_EQ(make_plan(tiny, h100, layout(1, 1, 1, 1, 16, 1, false), 1e9, slow).compute_seconds,
                   make_plan(tiny, h100, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions()).compute_seconds);
}

TEST(Plan, ExpertParallelRanksWaitForTheBusiestExpertRank) {
  // tiny: 3 MoE layers, top-4 experts of width 256, d 256. Under ep the routed
  // experts' GEMMs take moe_imbalance (1.2) times the mean; without ep, no wait.
  const Config tiny = load_config("configs/tiny.yaml");
  const ClusterSpec h100 = load_cluster("h100-sxm");
  const Plan dp2 = make_plan(tiny, h100, layout(1, 1, 1, 2, 8, 1, false), 1e9, Assumptions());
  const Plan ep2 = make_plan(tiny, h100, layout(1, 1, 2, 2, 8, 1, false), 1e9, Assumptions());
  const double routed = 6.0 * 3 * 4 * 3 * 256 * 256;  // FLOPs per token
  EXPECT_NEAR(ep2.gemm_seconds - dp2.gemm_seconds, 0.2 * routed * 16 * 256 / 2 / (h100.peak_bf16_tflops * 1e12 * 0.55), 1e-15);
}

TEST(Plan, AssumptionsSetByNameAndRange) {
  Assumptions a;
  set_assumption(a, "gemm_efficiency=0.25");
  set_assumption(a, "ep_overlap=0");
  set_assumption(a, "moe_imbalance=1.5");
  EXPECT_DOUBLE_EQ(a.gemm_efficiency, 0.25);
  EXPECT_DOUBLE_EQ(a.ep_overlap, 0);
  EXPECT_DOUBLE_EQ(a.moe_imbalance, 1.5);
  const auto refused = [&](const std::string& text, const std::string& why) {
    try {
      set_assumption(a, text);
      ADD_FAILURE() << text << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  refused("gemm_efficiency=0", "--assume gemm_efficiency: 0 is out of range ((0, 1])");
  refused("dp_overlap=1.5", "--assume dp_overlap: 1.5 is out of range ([0, 1])");
  refused("moe_imbalance=0.5", "out of range (>= 1)");
  refused("ep_overlap=half", "--assume ep_overlap: 'half' is not a number");
  refused("mfu=0.5", "--assume mfu=0.5: expected KEY=VALUE with KEY one of gemm_efficiency");
  // Halving the efficiency doubles the GEMMs' time, not the element-wise work's.
  const Config tiny = load_config("configs/tiny.yaml");
  Assumptions half;
  set_assumption(half, "gemm_efficiency=0.275");
  const ClusterSpec cpu = load_cluster("cpu-local");
  const Plan base = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  const Plan slow = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, half);
  EXPECT_NEAR(slow.gemm_seconds, 2 * base.gemm_seconds, 1e-12 * base.gemm_seconds);
  EXPECT_DOUBLE_EQ(slow.elementwise_seconds, base.elementwise_seconds);
  EXPECT_DOUBLE_EQ(slow.compute_seconds, slow.gemm_seconds + slow.elementwise_seconds);
}

TEST(Plan, ElementwiseWorkByHandAndWhatTensorParallelismDivides) {
  // tiny: d 256, 4 layers (1 dense of width 1024, 3 MoE: 16 experts, top-4 of
  // width 256, one shared). Per token per layer, elements read and written:
  // residual stream 2 norms x 5 d + 2 adds x 6 d (+ MoE: 4 E router, 8 k d
  // dispatch and combine); sharded: 8 x the SwiGLU widths.
  Config tiny = load_config("configs/tiny.yaml");
  tiny.training.precision = "fp32";
  const ClusterSpec cpu = load_cluster("cpu-local");
  const double d = 256, residual_dense = 22 * d, residual_moe = 22 * d + 4 * 16 + 8 * 4 * d;
  const double sharded_dense = 8 * 1024, sharded_moe = 8 * (4 + 1) * 256.0;
  const double tokens = 16 * 256;
  const Plan one = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  const double whole = residual_dense + sharded_dense + 3 * (residual_moe + sharded_moe);
  EXPECT_DOUBLE_EQ(one.elementwise_bytes, 4 * tokens * whole);  // FP32 on a CPU rank
  EXPECT_DOUBLE_EQ(one.elementwise_seconds, one.elementwise_bytes / (cpu.hbm_tb_per_s * 1e12));
  // tp 2 halves the sharded widths' work only; each rank has half the node's bandwidth.
  const Plan tp2 = make_plan(tiny, cpu, layout(2, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  const double per_rank = residual_dense + sharded_dense / 2 + 3 * (residual_moe + sharded_moe / 2);
  EXPECT_DOUBLE_EQ(tp2.elementwise_bytes, 4 * tokens * per_rank);
  EXPECT_DOUBLE_EQ(tp2.elementwise_seconds, tp2.elementwise_bytes / (cpu.hbm_tb_per_s * 1e12 / 2));
  EXPECT_DOUBLE_EQ(tp2.gemm_seconds, one.gemm_seconds);  // half the FLOPs at half the peak
  // Sequence parallelism splits the residual stream's work by tokens as well.
  tiny.parallel.sequence_parallel = true;
  const Plan sp = make_plan(tiny, cpu, layout(2, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  EXPECT_DOUBLE_EQ(sp.elementwise_bytes, one.elementwise_bytes / 2);
  // A GPU keeps it in BF16 at its HBM's bandwidth.
  const ClusterSpec h100 = load_cluster("h100-sxm");
  tiny.parallel.sequence_parallel = false;
  const Plan gpu = make_plan(tiny, h100, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions());
  EXPECT_DOUBLE_EQ(gpu.elementwise_bytes, 2 * tokens * whole);
  EXPECT_DOUBLE_EQ(gpu.elementwise_seconds, gpu.elementwise_bytes / (h100.hbm_tb_per_s * 1e12));
}

TEST(Plan, EachBlockingCollectiveCostsItsLatencyAndMoreOnAnOversubscribedNode) {
  Config tiny = load_config("configs/tiny.yaml");
  tiny.training.precision = "fp32";
  ClusterSpec cpu = load_cluster("cpu-local");
  cpu.gpus_per_node = 8;  // one node holding every rank
  cpu.collective_latency_us = 0;
  cpu.oversubscribed_latency_us = 0;
  const Layout l = layout(2, 1, 2, 2, 8, 1, false);  // dp2 x tp2 + ep2: 4 ranks
  Assumptions none;  // cpu-local's own: no communication hidden
  for (const std::string& setting : cpu.assume) set_assumption(none, setting);
  const Plan free = make_plan(tiny, cpu, l, 1e9, none);
  EXPECT_DOUBLE_EQ(free.latency_seconds, 0);
  // tp: 4 all-reduces a layer and micro-batch (4 layers); ep: 5 exchanges a MoE layer (3).
  EXPECT_DOUBLE_EQ(free.collectives, 4.0 * 4 + 5.0 * 3);
  cpu.collective_latency_us = 100;
  cpu.oversubscribed_latency_us = 3000;
  cpu.cores_per_node = 4;  // four ranks on four cores: not oversubscribed
  const Plan fits = make_plan(tiny, cpu, l, 1e9, none);
  EXPECT_NEAR(fits.latency_seconds, 31 * 100e-6, 1e-15);
  EXPECT_NEAR(fits.comm.tp_seconds - free.comm.tp_seconds, 16 * 100e-6, 1e-15);
  EXPECT_NEAR(fits.comm.ep_seconds - free.comm.ep_seconds, 15 * 100e-6, 1e-15);
  EXPECT_NEAR(fits.step_seconds - free.step_seconds, 31 * 100e-6, 1e-12);  // cpu-local hides none of it
  cpu.cores_per_node = 2;  // four ranks on two cores
  const Plan over = make_plan(tiny, cpu, l, 1e9, none);
  EXPECT_NEAR(over.latency_seconds, 31 * 3100e-6, 1e-12);
  EXPECT_NEAR(over.step_seconds - free.step_seconds, 31 * 3100e-6, 1e-12);
  // Two token chunks under parallel.ep_overlap: each exchange twice.
  tiny.parallel.ep_overlap = true;
  EXPECT_DOUBLE_EQ(make_plan(tiny, cpu, l, 1e9, none).collectives, 4.0 * 4 + 2 * 5.0 * 3);
}

TEST(Plan, ClusterSpecsLoadAndRefuseBadFiles) {
  for (const char* name : {"h800", "h100-sxm", "h200", "a100-80gb", "cpu-local"}) {
    const ClusterSpec c = load_cluster(name);
    EXPECT_GT(c.peak_bf16_tflops, 0) << name;
    EXPECT_GT(c.usd_per_gpu_hour, 0) << name;
  }
  EXPECT_EQ(load_cluster("h200").hbm_gib, 131);
  try {
    load_cluster("tpu-v9");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("tpu-v9: no such cluster spec"), std::string::npos);
  }
  // A cluster's own assumptions: cpu-local's ranks hide no communication; GPU specs keep the defaults.
  const std::vector<std::string> local_assume = load_cluster("cpu-local").assume;
  ASSERT_EQ(local_assume.size(), 3u);
  EXPECT_EQ(local_assume[0], "dp_overlap=0");
  EXPECT_EQ(local_assume[1], "ep_overlap=0");
  EXPECT_EQ(local_assume[2].rfind("thread_efficiency=", 0), 0u) << local_assume[2];
  EXPECT_TRUE(load_cluster("h800").assume.empty());
  const std::string bad = ::testing::TempDir() + "bad_cluster.yaml";
  std::ofstream(bad) << "name: x\npeak_bf16_tflops: 1\npeak_fp8_tflops: 1\nhbm_gib: 1\nhbm_tb_per_s: 1\nintra_node_gb_per_s: 1\n"
                        "inter_node_gb_per_s: 1\nusd_per_gpu_hour: 1\nassume:\n  dp_overlap: 2\n";
  try {
    load_cluster(bad);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), bad + ":9: assume: dp_overlap: 2 is out of range ([0, 1])");
  }
  const std::string base = "name: x\npeak_bf16_tflops: 1\npeak_fp8_tflops: 1\nhbm_gib: 1\nhbm_tb_per_s: 1\nintra_node_gb_per_s: 1\n"
                           "inter_node_gb_per_s: 1\nusd_per_gpu_hour: 1\n";
  const auto refused = [&](const std::string& extra, const std::string& why) {
    std::ofstream(bad) << base << extra;
    try {
      load_cluster(bad);
      ADD_FAILURE() << extra << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(std::string(e.what()), bad + why);
    }
  };
  refused("collective_latency_us: -1\n", ":9: collective_latency_us: must be >= 0");
  refused("device: cpu\ncores_per_node: 0\n", ":10: cores_per_node: must be >= 1");
  refused("cores_per_node: 2\n", ": cores_per_node and oversubscribed_latency_us describe CPU nodes (device: cpu)");
  const ClusterSpec local = load_cluster("cpu-local");
  EXPECT_EQ(local.cores_per_node, 2);
  EXPECT_GT(local.oversubscribed_latency_us, local.collective_latency_us);
}

}  // namespace

namespace {

using namespace fmoe::plan;

TEST(Plan, PipelineFiguresComeFromTheSimulatedScheduleAndTheStageSplit) {
  fmoe::config::Config c = fmoe::config::load_config("configs/presets/deepseek-v3.yaml");
  const ClusterSpec h800 = load_cluster("h800");
  Layout l = layout_from_config(c, 2048);
  l.num_micro_batches = 20;
  // 1F1B: (pp - 1) / micro-batches idle per unit of compute; the first stage holds pp micro-batches.
  const Plan one = make_plan(c, h800, l, 1e12, Assumptions());
  EXPECT_EQ(one.pipeline_schedule, "1f1b");
  EXPECT_NEAR(one.bubble_fraction, 15.0 / 20, 1e-12);
  EXPECT_EQ(one.peak_in_flight, 16);
  EXPECT_EQ(one.stage_layout, "E t*4 | t*3 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*2 L");
  EXPECT_GT(one.stage_imbalance, 1.0);
  // ZB-H1 on the same layout: (pp - 1)(F + B - 2W) over 3 units of work per micro-batch.
  l.pipeline_schedule = "zbh1";
  const Plan zero = make_plan(c, h800, l, 1e12, Assumptions());
  EXPECT_NEAR(zero.bubble_fraction, 15.0 / 60, 1e-12);
  EXPECT_LT(zero.step_seconds, one.step_seconds);
  // A written layout replaces the balanced split; one that drops a layer is refused by name.
  l.pipeline_schedule = "auto";
  l.pipeline_layout = "E t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t L";
  const Plan written = make_plan(c, h800, l, 1e12, Assumptions());
  EXPECT_EQ(written.stage_layout, l.pipeline_layout);  // printed back as written
  l.pipeline_layout = "E t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | t*4 | L";
  try {
    make_plan(c, h800, l, 1e12, Assumptions());
    FAIL() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("places 60 of the 61 layers: layer 60 is missing"), std::string::npos) << e.what();
  }
  // An interleaved schedule needs whole groups of pp micro-batches.
  l.pipeline_layout.clear();
  l.virtual_pp = 2;
  EXPECT_THROW(make_plan(c, h800, l, 1e12, Assumptions()), ConfigError);
}

}  // namespace

namespace {

using namespace fmoe::plan;

// A run's metrics with injected per-step times: what moe-plan --measured sets
// beside the plan is exactly these numbers' means after the skipped steps.
TEST(Plan, MeasuredStepAgainstThePlanOnInjectedTimes) {
  const std::string path = ::testing::TempDir() + "injected_metrics.jsonl";
  {
    std::ofstream out(path);
    out << R"({"schedule": "steps 4"})" << "\n";  // not a step line: ignored
    // A warm-up step (skipped), then three steps: compute 0.3/0.5/0.4, communication 0.1/0.2/0.3,
    // optimizer 0.05 each, data 0.01 each; two pipeline ranks.
    const char* lines[] = {
        R"({"step": 1, "step_seconds": 9.0, "time": {"compute": 8, "communication": 0.5, "optimizer": 0.4, "data": 0.1}, )"
        R"("pipeline": {"wait_seconds": [9, 9], "forward_seconds": [1, 1], "backward_seconds": [1, 1], "weight_seconds": [0, 0], "overlapped_seconds": [0, 0]}})",
        R"({"step": 2, "step_seconds": 0.46, "time": {"compute": 0.3, "communication": 0.1, "optimizer": 0.05, "data": 0.01}, )"
        R"("pipeline": {"wait_seconds": [0.1, 0.05], "forward_seconds": [0.1, 0.1], "backward_seconds": [0.15, 0.2], "weight_seconds": [0.05, 0], "overlapped_seconds": [0, 0]}})",
        R"({"step": 3, "step_seconds": 0.76, "time": {"compute": 0.5, "communication": 0.2, "optimizer": 0.05, "data": 0.01}, )"
        R"("pipeline": {"wait_seconds": [0.1, 0.05], "forward_seconds": [0.1, 0.1], "backward_seconds": [0.15, 0.2], "weight_seconds": [0.05, 0], "overlapped_seconds": [0, 0]}})",
        R"({"step": 4, "step_seconds": 0.76, "time": {"compute": 0.4, "communication": 0.3, "optimizer": 0.05, "data": 0.01}, )"
        R"("pipeline": {"wait_seconds": [0.1, 0.05], "forward_seconds": [0.1, 0.1], "backward_seconds": [0.15, 0.2], "weight_seconds": [0.05, 0], "overlapped_seconds": [0, 0]}})",
    };
    for (const char* line : lines) out << line << "\n";
    out << R"({"step": 4, "val_loss": 5.0})" << "\n";  // a validation line: ignored
  }
  const MeasuredStep m = read_measured_step(path, 1);
  EXPECT_EQ(m.steps, 3);
  EXPECT_NEAR(m.step, (0.46 + 0.76 + 0.76) / 3, 1e-15);
  EXPECT_NEAR(m.compute, 0.4, 1e-15);
  EXPECT_NEAR(m.communication, 0.2, 1e-15);
  EXPECT_NEAR(m.optimizer, 0.05, 1e-15);
  EXPECT_NEAR(m.data, 0.01, 1e-15);
  ASSERT_EQ(m.pipeline_wait.size(), 2u);
  EXPECT_NEAR(m.pipeline_wait[1], 0.05, 1e-15);
  EXPECT_NEAR(m.pipeline_busy[0], 0.3, 1e-15);

  // The plan: a pipelined layout of the tiny config on cpu-local.
  Config tiny = fmoe::config::load_config("configs/tiny.yaml");
  tiny.training.precision = "fp32";
  ClusterSpec cpu = load_cluster("cpu-local");
  Assumptions none;
  for (const std::string& setting : cpu.assume) set_assumption(none, setting);
  Layout l = layout(1, 2, 1, 1, 4, 4, false);
  const Plan p = make_plan(tiny, cpu, l, 1e9, none);
  const std::vector<TermComparison> terms = compare(p, m);
  ASSERT_EQ(terms.size(), 6u);
  EXPECT_EQ(terms[0].term, "compute");
  EXPECT_DOUBLE_EQ(terms[0].planned, p.compute_seconds);
  EXPECT_DOUBLE_EQ(terms[0].error(), p.compute_seconds / 0.4 - 1);
  // The pipeline's idle time is spent blocked on its receives: it counts with the communication.
  EXPECT_DOUBLE_EQ(terms[1].planned, p.comm_exposed_seconds + p.compute_seconds * p.bubble_fraction);
  EXPECT_GT(p.bubble_fraction, 0);
  EXPECT_DOUBLE_EQ(terms[2].planned, p.optimizer_seconds);
  EXPECT_FALSE(terms[3].priced);
  EXPECT_EQ(terms[4].term, "step");
  EXPECT_DOUBLE_EQ(terms[4].planned, p.step_seconds);
  EXPECT_NEAR(terms[5].measured, 0.15 / 0.6, 1e-15);  // blocked 0.1 + 0.05 over busy 0.3 + 0.3
  EXPECT_DOUBLE_EQ(terms[5].planned, p.bubble_fraction);
  // Within the tolerance or not, by the step's error.
  const double error = p.step_seconds / m.step - 1;
  const std::string table = format_comparison(p, m, std::abs(error) + 1e-9);
  EXPECT_NE(table.find("mean of 3 steps"), std::string::npos) << table;
  EXPECT_NE(table.find("within"), std::string::npos);
  EXPECT_NE(table.find(": yes"), std::string::npos) << table;
  EXPECT_NE(format_comparison(p, m, std::abs(error) / 2).find(": no"), std::string::npos);

  // An expert-parallel run: its routing's busiest expert rank against the assumed moe_imbalance.
  {
    std::ofstream out(path);
    out << R"({"step_seconds": 1.0, "time": {"compute": 0.8, "communication": 0.1, "optimizer": 0.05, "data": 0.05}, "expert_rank_imbalance": [1.5, 2.5]})"
        << "\n"
        << R"({"step_seconds": 1.0, "time": {"compute": 0.8, "communication": 0.1, "optimizer": 0.05, "data": 0.05}, "expert_rank_imbalance": [1.25, 1.75]})"
        << "\n";
  }
  const MeasuredStep ep_run = read_measured_step(path, 0);
  EXPECT_DOUBLE_EQ(ep_run.expert_rank_imbalance, 1.75);  // (2 + 1.5) / 2
  const Plan ep_plan = make_plan(tiny, cpu, layout(1, 1, 2, 2, 8, 1, false), 1e9, none);
  EXPECT_DOUBLE_EQ(ep_plan.expert_rank_imbalance, none.moe_imbalance);
  const std::vector<TermComparison> ep_terms = compare(ep_plan, ep_run);
  ASSERT_EQ(ep_terms.size(), 6u);
  EXPECT_EQ(ep_terms[5].term, "busiest expert rank / mean");
  EXPECT_DOUBLE_EQ(ep_terms[5].planned, 1.2);
  EXPECT_DOUBLE_EQ(ep_terms[5].measured, 1.75);
  EXPECT_NE(format_comparison(ep_plan, ep_run, 0.15).find("1.20x        1.75x"), std::string::npos) << format_comparison(ep_plan, ep_run, 0.15);
  // Without expert parallelism the plan assumes no rank imbalance, and the term is left out.
  EXPECT_EQ(p.expert_rank_imbalance, 0);
  EXPECT_EQ(compare(p, ep_run).size(), 5u);

  // Bad input: each a ConfigError naming the file and line.
  const auto refused = [&](const std::string& text, int64_t skip, const std::string& why) {
    std::ofstream(path) << text;
    try {
      read_measured_step(path, skip);
      ADD_FAILURE() << text << " accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(std::string(e.what()), path + why);
    }
  };
  refused("{\"step_seconds\": 1, \"time\": {\"compute\": 1}}\n", 0,
          ":1: a step line without numeric step_seconds and time.{compute, communication, optimizer, data}");
  refused("{\"step_seconds\": 1,\n", 0, ":1: not a JSON line");
  refused("{\"step_seconds\": 1, \"time\": {\"compute\": 1, \"communication\": 0, \"optimizer\": 0, \"data\": 0}, "
          "\"expert_rank_imbalance\": [1.5, \"x\"]}\n",
          0, ":1: expert_rank_imbalance: expected one number per MoE layer");
  refused("{\"step_seconds\": 1, \"time\": {\"compute\": 1, \"communication\": 0, \"optimizer\": 0, \"data\": 0}}\n", 1,
          ": 1 step lines, none left after skipping the first 1");
  try {
    read_measured_step(path + ".missing", 0);
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), path + ".missing: cannot read the run's metrics");
  }
}

}  // namespace

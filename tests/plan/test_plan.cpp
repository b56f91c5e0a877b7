// The planner's arithmetic on hand-checkable cases, the DeepSeek-V3 plan on
// DeepSeek's cluster, and the search. Runs with the source tree as cwd.
#include <gtest/gtest.h>

#include <fstream>

#include <cmath>

#include "moe/model_config.h"
#include "config/config.h"
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
  // Halving the efficiency doubles the compute time.
  const Config tiny = load_config("configs/tiny.yaml");
  Assumptions half;
  set_assumption(half, "gemm_efficiency=0.275");
  const ClusterSpec cpu = load_cluster("cpu-local");
  const double base = make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, Assumptions()).compute_seconds;
  EXPECT_NEAR(make_plan(tiny, cpu, layout(1, 1, 1, 1, 16, 1, false), 1e9, half).compute_seconds, 2 * base, 1e-12 * base);
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
  EXPECT_EQ(load_cluster("cpu-local").assume, (std::vector<std::string>{"dp_overlap=0", "ep_overlap=0"}));
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

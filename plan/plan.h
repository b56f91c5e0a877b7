// Pricing a run before it starts: from a config (model, layout, precisions) and
// a cluster spec, the memory per GPU, communication per step by mesh axis, the
// pipeline bubble, an estimated step time and MFU from a stated roofline, and
// the GPU-hours and dollars for a token budget. Pure arithmetic, no LibTorch.
#pragma once

#include <string>
#include <vector>

#include "plan/pipeline_sim.h"
#include "config/config.h"

namespace fmoe::plan {

using config::Config;
using config::ConfigError;

struct ClusterSpec {
  std::string name;
  double peak_bf16_tflops = 0;
  double peak_fp8_tflops = 0;
  double hbm_gib = 0;
  double hbm_tb_per_s = 0;
  double intra_node_gb_per_s = 0;  // per GPU, one direction
  double inter_node_gb_per_s = 0;  // per GPU, one direction
  int64_t gpus_per_node = 8;
  double usd_per_gpu_hour = 0;
  // The fixed cost of one blocking collective beyond its bytes (the alpha of an
  // alpha-beta model): launch, synchronisation, the partners' skew. 0: not priced.
  double collective_latency_us = 0;
  // device: cpu. Cores per node (0: unknown), and what each blocking collective
  // costs on top when the ranks on a node outnumber its cores (the wait for a
  // partner the OS has descheduled; measured by bench_collectives).
  int64_t cores_per_node = 0;
  double oversubscribed_latency_us = 0;
  // "gpu", or "cpu": ranks are processes running this project's CPU implementation,
  // whose memory is modelled as that implementation holds it (see make_plan).
  std::string device = "gpu";
  double runtime_gib = 0;           // per-process memory before the model: libraries, context, communicator
  double activation_overhead = 1;   // measured resident / counted activation bytes (allocator, kernel caches), BF16 runs
  double activation_overhead_fp32 = 0;  // the same for FP32 runs; 0: as activation_overhead
  // The cluster's own defaults for the roofline's assumptions ("KEY=VALUE", as
  // --assume takes them, which overrides them): e.g. how much communication its
  // ranks hide. YAML: a map under `assume`.
  std::vector<std::string> assume;
};

// Loads configs/clusters/<name>.yaml (or a path); unknown keys and bad values are ConfigErrors.
ClusterSpec load_cluster(const std::string& name_or_path);

struct Layout {
  int64_t tp = 1, pp = 1, ep = 1, dp = 1;
  int64_t virtual_pp = 1;
  int64_t micro_batch_size = 1;  // sequences per micro-batch
  int64_t num_micro_batches = 1; // per optimizer step, per pipeline
  bool zero1 = false;
  // none | selective (norms, MLA up-projections and SwiGLU activations recomputed,
  // as DeepSeek-V3 does) | full (only each layer's input is kept)
  std::string recompute = "none";
  // gpipe | 1f1b | interleaved | zbh1 | dualpipev, or auto: 1f1b, interleaved when virtual_pp > 1
  std::string pipeline_schedule = "auto";
  std::string pipeline_layout;  // written stages, or empty: balanced by cost
  int64_t gpus() const { return tp * pp * dp; }
  std::string describe() const;
};

// The roofline's assumptions, printed with every plan.
struct Assumptions {
  double gemm_efficiency = 0.55;      // achieved / peak tensor-core throughput on the model's GEMMs
  double ep_overlap = 0.5;            // fraction of expert all-to-all hidden behind compute
  double dp_overlap = 0.9;            // fraction of gradient reduce-scatter / all-gather hidden
  double tp_overlap = 0.0;            // tensor-parallel all-reduces sit on the critical path
  double moe_imbalance = 1.2;         // the busiest expert rank's tokens over the mean: its activations, and under ep its expert GEMMs' time
  double memory_headroom = 0.92;      // usable fraction of HBM (allocator, workspaces, fragmentation)
  // CPU ranks: the fraction of its cores' throughput a rank running several
  // threads (cores_per_node / ranks on the node) gets, against one thread per
  // core: the work too small to split over threads runs on one.
  double thread_efficiency = 1.0;
};

// The Newton-Schulz FLOPs of one Muon step over the model's matrices (dense
// and shared, and routed experts apart): per m x n matrix (m <= n) and
// iteration, X X^T, A A and B X: 4 m^2 n + 2 m^3.
struct NewtonSchulzFlops {
  double dense = 0, experts = 0;
};
NewtonSchulzFlops newton_schulz_flops(const moe::ModelConfig& model, int64_t steps);

// Sets one assumption from "key=value" (moe-plan --assume): gemm_efficiency and
// memory_headroom in (0, 1], the overlaps in [0, 1], moe_imbalance >= 1.
// Throws ConfigError naming the key for an unknown key or a value out of range.
void set_assumption(Assumptions& assumptions, const std::string& key_value);

struct MemoryEstimate {  // bytes per GPU
  double weights = 0, master = 0, grads = 0, optimizer = 0, activations = 0;
  double comm_buffers = 0, runtime = 0;
  double total() const { return weights + master + grads + optimizer + activations + comm_buffers + runtime; }
};

struct CommEstimate {  // bytes moved per GPU per optimizer step, and seconds on its links
  double tp_bytes = 0, ep_bytes = 0, pp_bytes = 0, dp_bytes = 0;
  double tp_seconds = 0, ep_seconds = 0, pp_seconds = 0, dp_seconds = 0;
};

struct Plan {
  Layout layout;
  double params_total = 0, params_activated = 0;
  double flops_per_token = 0;
  double tokens_per_step = 0;
  MemoryEstimate memory;
  bool fits = false;
  CommEstimate comm;
  std::string pipeline_schedule;  // the one simulated ("" without pipelining)
  std::string stage_layout;       // the stage split ("E t*4 | ... | t*3 L")
  double stage_imbalance = 1;     // the costliest stage over the mean: the pipeline runs at its pace
  double bubble_fraction = 0;     // pipeline idle time over compute time, simulated (parallel/pipeline_sim.h)
  int64_t peak_in_flight = 0;     // most micro-batch stages whose activations the busiest rank holds
  // GEMMs at the assumed efficiency, and the memory-bound element-wise work
  // (norms, residual adds, routing, dispatch copies, activations) at the rank's
  // memory bandwidth: compute_seconds is their sum (times recompute and the
  // stage imbalance). Tensor parallelism divides the element-wise work on
  // sharded widths only; the residual stream's it repeats on every tp rank
  // unless sequence parallelism splits it.
  double gemm_seconds = 0, elementwise_seconds = 0, elementwise_bytes = 0;
  double compute_seconds = 0;
  // Under ep: the busiest expert rank's routed tokens over the mean rank's that
  // the expert GEMMs are priced at (Assumptions::moe_imbalance); 0 without ep.
  double expert_rank_imbalance = 0;
  // Blocking tp and ep collectives per step on a rank, and their latency (part of comm.tp/ep_seconds).
  double collectives = 0, latency_seconds = 0;
  // optimizer.name: muon: the Newton-Schulz FLOPs this rank runs per step, and their time (on the step).
  double newton_schulz_flops = 0, newton_schulz_seconds = 0;
  // The optimizer's update: memory-bound, each byte of its state read and written
  // once, the gradients read and the compute copy of the weights written, at the
  // rank's share of its device's (node's, on a CPU) memory bandwidth.
  double optimizer_bytes = 0, optimizer_seconds = 0;
  double step_seconds = 0;
  double comm_seconds = 0, comm_exposed_seconds = 0;  // all communication, and what the assumed overlaps leave on the step
  double mfu = 0;                // against the peak of the run's GEMM precision
  double tokens = 0;
  double gpu_hours = 0;
  double usd = 0;
};

// layout.dp == 0 takes gpus / (tp * pp). Throws ConfigError on an impossible layout.
Plan make_plan(const Config& config, const ClusterSpec& cluster, Layout layout, double tokens, const Assumptions& assumptions);
// Layout from the config's parallel section and batch sizes for a given number of GPUs.
Layout layout_from_config(const Config& config, int64_t gpus);
// Every layout of gpus that fits, for a global batch of global_batch sequences, cheapest first.
std::vector<Plan> search_plans(const Config& config, const ClusterSpec& cluster, int64_t gpus, int64_t global_batch,
                               double tokens, const Assumptions& assumptions);

// The schedule a layout runs (auto resolved), its action costs per chunk in
// seconds for this plan (F : I : W = 1 : 1 : 1, a backward twice a forward),
// for moe-plan --schedule. Throws ConfigError for a combination no schedule takes.
std::string resolved_schedule(const Layout& layout);
plan::PipeCosts chunk_costs(const Plan& plan);

std::string format_plan(const Plan& plan, const ClusterSpec& cluster, const Assumptions& assumptions);
std::string plan_json(const Plan& plan, const ClusterSpec& cluster, const Assumptions& assumptions);

}  // namespace fmoe::plan

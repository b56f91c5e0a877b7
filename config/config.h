// The typed run configuration: nested structs, one per component, each with
// validate() naming the bad field. Loaded from YAML (unknown keys rejected with
// the nearest valid name, wrong types reported as file:line:column), with
// --set a.b=c overrides applied before parsing. The resolved config is written
// beside every run and checkpoint.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "moe/model_config.h"

namespace fmoe::config {

// A bad config: the message is one line naming the file (or --set) and the key.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DataConfig {
  std::string prefix = "corpus/gcide";          // <prefix>.bin / .idx / .meta.json
  std::string tokenizer = "corpus/tokenizer.model";
  std::vector<std::string> sources = {"gcide"};  // "gcide" or text files, for moe-data prepare
  int64_t tokenizer_training_documents = 60000;
  double val_fraction = 0.01;
  int64_t split_seed = 20240521;
  std::string validate() const;
};

struct OptimizerConfig {
  // adamw | muon: Muon (momentum orthogonalized by Newton-Schulz) for the hidden
  // weight matrices (attention and MLA projections, dense FFNs, each expert's
  // matrices), AdamW for the rest (embedding, head, norms, biases, router).
  std::string name = "adamw";
  double lr = 3e-3;                  // peak learning rate (under muon: the matrices', their updates RMS-matched to AdamW's)
  double min_lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_norms = false;
  bool decay_embedding = false;
  bool decay_router = false;
  double grad_clip = 1.0;            // max global grad norm; 0 disables
  std::string lr_schedule = "cosine";  // cosine | wsd | constant
  int64_t warmup_steps = 100;
  double wsd_decay_fraction = 0.2;   // wsd: last fraction of steps decays linearly to min_lr
  // Storage precision of the training state (fp8/low_precision_tensor.h).
  std::string main_params_dtype = "fp32";  // fp32 | bf16 | fp16 (the master weights)
  bool stochastic_rounding = false;        // BF16 master weights rounded stochastically (seeded by step and parameter)
  bool grad_stochastic_rounding = true;    // fp4 / nvfp4 gradients: stochastically (true) or to nearest
  bool grad_hadamard = false;              // fp4 / nvfp4 gradients: random Hadamard rotation of 16-value tiles first
  std::string exp_avg_dtype = "fp32";      // fp32 | bf16 | fp8 | fp6
  std::string exp_avg_sq_dtype = "fp32";   // fp32 | bf16 | fp16 | fp8 (stored as its square root)
  bool exp_avg_sq_stochastic_rounding = false;  // fp8 second moments: stochastically (true) or to nearest
  std::string grad_dtype = "fp32";         // fp32 | bf16 | fp8 | fp6 (every parameter's) | fp4 | nvfp4 (Muon's matrices, stochastically rounded; the rest fp8)
  int64_t state_block_size = 128;          // FP8 state tiles
  // Muon (name: muon). Its momentum is stored like exp_avg (exp_avg_dtype).
  double adamw_lr = 0;               // peak learning rate of the AdamW-updated parameters; 0: lr
  double muon_momentum = 0.95;
  bool muon_nesterov = true;
  int64_t muon_ns_steps = 5;         // Newton-Schulz iterations (quintic coefficients)
  // rms: update x 0.2 sqrt(max(rows, cols)), so its RMS matches AdamW's (Moonshot);
  // shape: update x sqrt(max(1, fan_out / fan_in)) (the original Muon)
  std::string muon_scale = "rms";
  // QK-clip (MuonClip), either optimizer: after each update, an attention head
  // whose largest logit of the step exceeded this has its query and key weights
  // scaled by threshold / logit. 0: off (no logits recorded).
  double qk_clip_threshold = 0;
  bool muon() const { return name == "muon"; }
  std::string validate() const;
};

struct PrecisionConfig {
  bool fp8 = false;  // E4M3 GEMMs (1x128 / 128x128 scaling) for attention projections, FFNs, experts
  bool tf32 = false; // on CUDA: FP32 GEMMs and convolutions may use TF32 tensor cores (10-bit mantissa)
  std::string validate() const { return ""; }
};

struct TrainingConfig {
  int64_t steps = 1000;              // 0: sized by the budget (see BudgetConfig)
  int64_t seq_len = 256;
  int64_t micro_batch_size = 16;     // rows per micro-batch per data-parallel rank
  int64_t grad_accum_steps = 1;
  int64_t seed = 1234;
  // auto: BF16 GEMMs only where a GEMM at the run's shapes measures faster in BF16
  // than in FP32 on this machine; bf16 (FP32 master weights, BF16 GEMMs) | fp32.
  std::string precision = "auto";
  int64_t threads = 0;               // intra-op threads per rank; 0 = cores / local ranks
  // auto: CUDA when a GPU is visible (rank r takes GPU local_rank % GPUs), else the CPU; cpu | cuda.
  std::string device = "auto";
  // LibTorch's deterministic algorithms (and a fixed cuBLAS workspace): bit-identical
  // repeats and resumes on a GPU, at some speed. The CPU path is deterministic anyway.
  bool deterministic = false;
  int64_t log_interval = 10;
  int64_t eval_interval = 100;       // 0: only at the end
  int64_t eval_sequences = 256;      // held-out windows of seq_len tokens, dealt over data-parallel ranks
  int64_t checkpoint_interval = 200;  // 0: only at the end
  // false: no checkpoint after the last step (benchmarks, throwaway runs); a stop
  // on request or by budget before the end still saves, so --resume can continue.
  bool checkpoint_at_end = true;
  int64_t keep_checkpoints = 2;
  int64_t keep_every = 0;            // checkpoints at multiples of this step are kept for good; 0: none
  // Snapshot the state into host memory at the step boundary and write it on a
  // background thread while training goes on (one save in flight at a time).
  bool async_checkpoint = false;
  std::string run_dir = "runs/tiny";
  // A checkpoint directory, or a run directory (its latest checkpoint), whose
  // model weights and expert biases a fresh run starts from (a fine-tune, or a
  // model imported by moe-convert); step, optimizer and data start anew. Any
  // layout. A run resumed with --resume continues from its own checkpoint instead.
  std::string init_from;
  std::string recompute = "none";    // none | selective | full (priced by moe-plan; moe-train keeps all activations)
  std::string validate() const;
};

struct ParallelConfig {
  int64_t dp = 0;  // 0: the world size
  int64_t tp = 1;
  int64_t pp = 1;
  int64_t ep = 1;
  int64_t virtual_pp = 1;
  bool zero1 = false;
  std::string expert_dispatcher = "alltoall";  // alltoall | allgather (the simple reference)
  bool sequence_parallel = false;               // with tp > 1: split the residual stream over tp by tokens
  double timeout_s = 300;                       // a collective that does not complete by then ends the job
  double bucket_mb = 32;                        // data-parallel gradient bucket size
  // One thread per rank drives MPI's non-blocking operations while the rank
  // computes (parallel/mpi/mpi_communicator.h), so gradient buckets reduce during
  // backward. Off by default: where every core computes, the thread costs about
  // what it hides (docs/benchmarks.md).
  bool mpi_progress_thread = false;
  // With ep > 1 and the all-to-all dispatcher: each MoE layer splits its tokens in
  // two chunks whose expert all-to-alls overlap the other chunk's expert compute
  // (moe/expert_parallel.h). Off by default: on CPU ranks MPI advances the exchanges
  // only inside MPI calls, i.e. with mpi_progress_thread (docs/benchmarks.md).
  bool ep_overlap = false;
  // DualPipeV's overlapped F&B pairs run at once: the forward on a second thread
  // of the rank with its own tp and ep groups (parallel::Mesh::with_second_lane),
  // the backward on the first, so each one's communication waits while the other
  // computes. Needs pipeline_schedule: dualpipev. Off: the pair's halves in turn.
  bool fb_overlap = false;
  // For CUDA tensors: nccl, or mpi through page-locked host buffers (ranks may then
  // share a GPU); auto: nccl when every rank of a node has a GPU of its own. CPU tensors use MPI.
  std::string backend = "auto";
  // gpipe | 1f1b | interleaved | zbh1 (parallel/pipeline_schedule.h); auto: 1f1b,
  // or interleaved when virtual_pp > 1. moe-plan simulates it for the bubble.
  std::string pipeline_schedule = "auto";
  // Stages as a written layout ("E t*2 | t*2 | t*2 L", moe/stage_split.h), pp x
  // virtual_pp of them; empty: split by cost automatically.
  std::string pipeline_layout;
  std::string validate() const;
  // Empty when moe-train can run this layout, else "field: why" (moe-plan takes any).
  std::string trainer_support() const;
};

// A run's spending limits. On CPU a rank counts as one device.
// With training.steps: 0 the limits size the schedule instead of cutting it: the
// total step count is fixed once (from the step time measured over the first
// calibration_steps when a limit is in time or money) so that the learning-rate
// decay ends inside the budget. docs/planning.md states the rule.
struct BudgetConfig {
  double usd_per_gpu_hour = 0;  // 0: no dollar accounting
  double max_usd = 0;           // 0: no limit
  double max_gpu_hours = 0;     // 0: no limit
  int64_t max_tokens = 0;       // 0: no limit
  double max_minutes = 0;       // wall-clock minutes of training (steps, evaluation, checkpoints); 0: no limit
  int64_t calibration_steps = 20;  // steps timed before a time-sized schedule is fixed
  std::string validate() const;
  bool limited() const { return max_usd > 0 || max_gpu_hours > 0 || max_tokens > 0 || max_minutes > 0; }
  bool limited_in_time() const { return max_usd > 0 || max_gpu_hours > 0 || max_minutes > 0; }
};

struct Config {
  moe::ModelConfig model;
  DataConfig data;
  OptimizerConfig optimizer;
  TrainingConfig training;
  ParallelConfig parallel;
  PrecisionConfig precision;
  BudgetConfig budget;
  // "section.field: why" for the first invalid field, or empty.
  std::string validate() const;
};

// Loads path, applies overrides ("a.b=c"), parses and validates. Throws ConfigError.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Parses YAML text (source names it in messages).
Config parse_config(const std::string& yaml_text, const std::string& source, const std::vector<std::string>& overrides = {});
// The resolved config as YAML, every field present.
std::string to_yaml(const Config& config);

// Levenshtein distance, for "did you mean" suggestions.
size_t edit_distance(const std::string& a, const std::string& b);

}  // namespace fmoe::config

// One optimizer step's forwards and backwards, run as this rank's action list
// of a pipeline schedule (parallel/pipeline_schedule.h). Without pipelining the
// list is the one-stage 1F1B schedule — forward a micro-batch, then its
// backward — so gradient accumulation is the schedule's micro-batch loop. With
// pipelining the list is lowered: a stage's output goes to the next stage's rank
// by a non-blocking send (or, when this rank holds the next stage too, is handed
// over in memory), its gradient comes back the same way; receives are posted
// when the compute action before them starts and waited for where the schedule
// puts them, or (over NCCL) the sends and receives between two computes go out
// as one group. A stage's MoE aux and z losses are
// backpropagated on that stage beside the gradient of its output.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>

#include "moe/model.h"
#include "moe/stage_split.h"
#include "parallel/communicator.h"
#include "parallel/pipeline_schedule.h"

namespace fmoe::trainer {

struct StepHooks {
  // The tokens of micro-batch `micro` ([B, T + 1], on the model's device).
  std::function<at::Tensor(int64_t micro)> batch;
  // Called before each backward, input-gradient or weight-gradient action; `last`
  // when it is the last of its kind on its stage this step
  // (parallel::last_gradient_actions): the gradients it produces are final, and
  // the buckets they complete launch their reductions during it.
  std::function<void(bool last)> before_backward;
};

struct StepTotals {
  // FP64 [3 + mtp_depth] on the device: cross-entropy, aux and z losses and each
  // MTP depth's cross-entropy, summed over micro-batches, of this rank's stages
  // (the cross-entropies on the head's rank).
  at::Tensor losses;
  double data_seconds = 0;  // spent making batches
  // Host time in this rank's forwards and backwards (on a GPU: to queue them);
  // backward_seconds counts whole backwards and input-gradient halves, weight_seconds
  // the deferred weight-gradient halves of a split schedule.
  double forward_seconds = 0, backward_seconds = 0, weight_seconds = 0;
  // With fb_overlap: how long the halves of the F&B pairs ran at once (the sum of
  // each pair's forward and backward time less the pair's wall time).
  double overlapped_seconds = 0;
};

// What a pipelined step needs beyond the model.
struct PipelineContext {
  parallel::Communicator* pp = nullptr;       // the pipeline group: rank r holds stages c x pp + r
  std::vector<moe::PipelineStage> stages;     // every stage of the split, pp x v of them
  int64_t hidden_rows = 0, hidden_dim = 0;    // what crosses between stages: FP32 [rows, dim]
  int64_t rows_divisor = 1;                   // tokens per row of what crosses: tp under sequence parallelism, else 1
  c10::Device device{c10::kCPU};
  // Sends and receives go out in groups (parallel::p2p_groups), each waited for
  // whole: NCCL's rules (one stream per communicator, sends that complete once
  // received, messages matched in issue order). Otherwise receives are posted
  // ahead and sends left in flight, as MPI allows.
  bool grouped_p2p = false;
  // DualPipeV's overlapped F&B pairs at once: the forward on a second thread
  // (communicating on lane 1 of a mesh made by with_second_lane), the backward on
  // this one.
  bool fb_overlap = false;
};

// A thread that runs one job at a time for the step (the overlapped forwards).
class OverlapThread;

class StepRuntime {
 public:
  // schedule: this step's actions (its micro-batches are the gradient-accumulation steps).
  // Without a pipeline context the schedule has one rank. Throws std::invalid_argument
  // for a schedule that does not validate. Split backwards (ZB-H1, DualPipeV) run
  // their I under moe::DeferWeightGrads and their W from its queue.
  StepRuntime(moe::MoEModel& model, parallel::PipelineSchedule schedule, PipelineContext pipeline = {});
  StepTotals run(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8);
  // Validation: the batches' forwards only, through this rank's stages in
  // order (receiving from the previous stage, sending to the next). Returns each
  // batch's mean cross-entropy, attached to nothing, on the rank holding the
  // head; undefined tensors elsewhere. Without pipelining, the whole model.
  std::vector<at::Tensor> forward_only(const std::vector<at::Tensor>& batches, at::ScalarType compute_dtype, bool fp8);
  // Whether this rank holds the head (and so the losses forward_only returns).
  bool holds_head() const;
  const parallel::PipelineSchedule& schedule() const { return schedule_; }

 private:
  StepTotals run_pipelined(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8);
  moe::MoEModel& model_;
  parallel::PipelineSchedule schedule_;
  PipelineContext pipeline_;
  std::vector<std::vector<size_t>> post_at_;  // per action of this rank: the receives to post as it starts
  // Per receive action: the sending rank, and its place among that rank's messages to this one;
  // per sending rank: this rank's receives from it in that order (they are posted so).
  std::vector<int> recv_peer_;
  std::vector<size_t> recv_place_;
  std::vector<std::vector<size_t>> recv_order_;
  // Grouped point-to-point: this rank's groups, and per action index where one goes out, its group.
  std::vector<parallel::P2PGroup> groups_;
  std::map<size_t, size_t> group_at_;
  std::shared_ptr<OverlapThread> overlap_;  // with fb_overlap
};

}  // namespace fmoe::trainer

// Data-parallel gradient averaging. Dense parameters are replicated over dp and
// average over it; routed-expert shards are replicated only over the
// expert-data-parallel group (dp / ep ranks), and their gradient is the sum over
// that group divided by dp (every dp rank's loss carries weight 1 / dp).
//
// Gradients travel in flat FP32 buckets of about bucket_bytes, filled in reverse
// parameter order (the order backward produces them). With overlap on, a hook
// on every parameter copies its gradient into its bucket as soon as backward
// produces it during the last micro-batch, and a full bucket's all-reduce starts
// at once, while backward goes on with earlier layers; sync() then waits and
// writes the averages back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "parallel/mesh.h"

namespace fmoe::parallel {

class GradientSync {
 public:
  GradientSync(std::vector<at::Tensor> dense, std::vector<at::Tensor> experts, const Mesh& mesh,
               int64_t bucket_bytes = 32 << 20);
  ~GradientSync();
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // Registers the gradient hooks (once). Then call arm(true) before a backward
  // whose gradients are the parameters' last contributions of the step (the last
  // micro-batch's; in a pipeline each stage's last B, I or W), arm(false) before
  // the others, so buckets launch as they fill. Parameters in deferred get no hook
  // (their gradient is still changed after backward, as
  // sum_partial_gradients_over_tp does): their buckets launch in sync().
  void enable_overlap(const std::vector<at::Tensor>& deferred = {});
  void arm(bool final_contributions) { armed_ = final_contributions && overlap_; }
  // Averages the parameters' .grad() in place (every rank of the mesh calls it):
  // launches what backward has not, waits for every bucket, writes the results.
  void sync();
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Of the last sync()'s step: the buckets whose all-reduce started during backward (overlap).
  int64_t launched_in_backward() const { return launched_in_backward_; }

 private:
  struct Bucket {
    std::vector<at::Tensor> params;
    std::vector<int64_t> offsets;
    int64_t numel = 0;
    bool expert = false;
    at::Tensor flat;
    std::vector<bool> filled;
    int64_t ready = 0;
    std::unique_ptr<Work> work;
  };
  void on_gradient(size_t bucket, size_t index, const at::Tensor& grad);
  void launch(Bucket& bucket);
  std::vector<Bucket> buckets_;
  const Mesh* mesh_;
  bool overlap_ = false, armed_ = false;
  int64_t launched_in_backward_ = 0, launching_ = 0;
  std::vector<std::pair<at::Tensor, unsigned>> hooks_;
};

// Sums over tp the gradients of tensors marked tp_partial_grad (norm weights under
// sequence parallelism); call before the data-parallel reduction.
void sum_partial_gradients_over_tp(const std::vector<at::Tensor>& params, const Mesh& mesh);

// Sum of squared gradient entries over every shard of the model, counted once:
// tensor-parallel shards summed over tp, expert shards over tp and ep, replicated
// tensors taken as they are. sharded_over_tp[i] says whether tensor i is split over tp.
// With owned (ZeRO-1), only owned gradients count, first summed over dp (dense)
// or the expert-data-parallel group (experts). Pipeline stages' sums add over pp.
// An FP64 scalar on the gradients' device.
at::Tensor global_grad_square_sum(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                              const std::vector<bool>& expert, const Mesh& mesh, const std::vector<bool>* owned = nullptr);

}  // namespace fmoe::parallel

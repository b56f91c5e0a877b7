// Data-parallel gradient averaging. Dense parameters are replicated over dp and
// average over it; routed-expert shards are replicated only over the
// expert-data-parallel group (dp / ep ranks), and their gradient is the sum over
// that group divided by dp (every dp rank's loss carries weight 1 / dp).
//
// Gradients travel in flat FP32 buckets of about bucket_bytes, all issued
// before any is waited on, so several reductions are in flight at once.
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
  // Averages the parameters' .grad() in place (every rank of the mesh calls it).
  void sync();
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  struct Bucket {
    std::vector<at::Tensor> params;
    int64_t numel = 0;
    bool expert = false;
  };
  std::vector<Bucket> buckets_;
  const Mesh* mesh_;
};

// Sums over tp the gradients of tensors marked tp_partial_grad (norm weights under
// sequence parallelism); call before the data-parallel reduction.
void sum_partial_gradients_over_tp(const std::vector<at::Tensor>& params, const Mesh& mesh);

// Sum of squared gradient entries over every shard of the model, counted once:
// tensor-parallel shards summed over tp, expert shards over tp and ep, replicated
// tensors taken as they are. sharded_over_tp[i] says whether tensor i is split over tp.
double global_grad_square_sum(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                              const std::vector<bool>& expert, const Mesh& mesh);

}  // namespace fmoe::parallel

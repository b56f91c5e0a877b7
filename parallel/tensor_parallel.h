// Tensor- and expert-parallel sharding of parameters, and the vocabulary-parallel
// embedding and cross-entropy.
//
// A ShardSpec says how a full (single-process) parameter maps to this rank's
// shard: split along tp_dim over the tensor-parallel group, where that dim may
// hold several fused blocks (Q|K|V, gate|up) each split evenly, and/or along
// ep_dim over the expert-parallel group (routed experts). Full parameters are
// drawn from one seed on every rank and cut with local_shard, so a sharded model
// starts exactly where the single-process one does; gather_full reverses it
// (checkpoints hold full tensors and load under any layout).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "parallel/mesh.h"

namespace fmoe::parallel {

struct ShardSpec {
  int64_t tp_dim = -1;              // -1: replicated over tp
  std::vector<int64_t> tp_blocks;   // full sizes of the fused blocks along tp_dim (empty: one block)
  int64_t ep_dim = -1;              // -1: replicated over ep (dense); else a routed-expert tensor
  // Replicated over tp but applied to a different slice of the tokens on each tp
  // rank (norms under sequence parallelism): its gradient is summed over tp.
  bool tp_partial_grad = false;
  bool is_expert() const { return ep_dim >= 0; }
};

at::Tensor local_shard(const at::Tensor& full, const ShardSpec& spec, const MeshShape& shape, const MeshCoords& coords);
// Collective over the tp and ep groups of the mesh (every rank of them calls it).
at::Tensor gather_full(const at::Tensor& local, const ShardSpec& spec, const Mesh& mesh);

// Embedding rows of a vocabulary split over tp: this rank holds rows
// [vocab_start, vocab_start + weight.size(0)); others contribute zeros, and one
// all-reduce over tp assembles the rows (a reduce-scatter over the tokens with
// scatter_tokens, for sequence parallelism). Differentiable.
at::Tensor vocab_parallel_embedding(const at::Tensor& tokens, const at::Tensor& weight_local, int64_t vocab_start, Communicator& tp,
                                    bool scatter_tokens = false);

// Mean cross-entropy of logits whose vocabulary is split over tp (this rank:
// columns [vocab_start, vocab_start + logits.size(1))), without gathering the
// vocabulary: the max, the sum of exponentials and the target logit are
// all-reduced as [N] vectors. Differentiable in logits; FP32 arithmetic.
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits_local, const at::Tensor& targets, int64_t vocab_start, Communicator& tp);

}  // namespace fmoe::parallel

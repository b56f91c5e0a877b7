// The model's hidden weight matrices as linear maps, by parameter name and
// shape: which parameters are matrices (the attention and MLA projections, the
// dense and shared-expert FFNs, every routed expert's, the MTP projection) and
// which are not (the embedding and head tables, norms, biases, the router, the
// shared-expert gate: a vector in matrix form); how a fused tensor splits into
// the maps it packs. Optimizers that act on whole matrices (Muon) read it.
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe/model_config.h"

namespace fmoe::moe {

struct WeightMatrices {
  bool matrix = false;
  // A 2-D weight [out, in] is one map; a 3-D one [experts, in, out] (grouped
  // experts, dense FFNs) one per expert: in_major says which.
  bool in_major = false;
  // The maps packed along split_dim, by size (the fused q/k/v rows, SwiGLU's
  // gate and up columns); empty: the whole tensor is one map per expert.
  int64_t split_dim = -1;
  std::vector<int64_t> blocks;
};

// model (optional) gives the q/k/v split of a fused projection; without it the
// projection is one map.
WeightMatrices weight_matrices(const std::string& name, c10::IntArrayRef shape, const ModelConfig* model = nullptr);

}  // namespace fmoe::moe

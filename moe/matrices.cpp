#include "moe/matrices.h"

namespace fmoe::moe {

WeightMatrices weight_matrices(const std::string& name, c10::IntArrayRef shape, const ModelConfig* model) {
  WeightMatrices m;
  const auto contains = [&](const char* part) { return name.find(part) != std::string::npos; };
  const auto ends_with = [&](const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (name.rfind("embedding.", 0) == 0 || name.rfind("head.", 0) == 0 || contains("norm") || contains("router") ||
      contains("shared_gate")) {
    return m;
  }
  if (shape.size() < 2 || shape.size() > 3 || shape[shape.size() - 1] < 2 || shape[shape.size() - 2] < 2) return m;
  m.matrix = true;
  m.in_major = shape.size() == 3;
  if (ends_with(".w13") && shape.size() == 3 && shape[2] % 2 == 0) {  // [.., in, gate | up]
    m.split_dim = 2;
    m.blocks = {shape[2] / 2, shape[2] / 2};
  } else if (ends_with("attention.wqkv") && model != nullptr) {  // rows [q | k | v]
    const int64_t q = model->num_heads * model->head_dim, kv = model->num_kv_heads * model->head_dim;
    if (q + 2 * kv == shape[0]) {
      m.split_dim = 0;
      m.blocks = {q, kv, kv};
    }
  }
  return m;
}

}  // namespace fmoe::moe

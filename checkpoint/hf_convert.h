// Hugging Face model folders in and out: config.json plus model.safetensors, or
// shards listed by model.safetensors.index.json, with the tensor names that
// transformers' save_pretrained writes (one tensor per expert).
//
// Architectures: DeepseekV3 (multi-head latent attention, YaRN, sigmoid routing
// with the correction bias, shared experts), DeepseekV2 (MLA, softmax routing,
// greedy or group-limited, unnormalised weights), Mixtral (grouped-query
// attention, softmax top-k routing over every expert) and Qwen2-MoE (GQA with
// QKV biases, softmax routing, a sigmoid-gated shared expert). DeepSeek lays each
// rotary head out in interleaved pairs (rope_interleave); FrugalMoE rotates
// half-split pairs, so the rotary rows of q and of the shared rotary key are
// permuted on the way in and back on the way out (attention scores unchanged).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/model_config.h"
#include "checkpoint/safetensors.h"

namespace fmoe::checkpoint {

struct HfModel {
  std::string model_type;          // deepseek_v3 | deepseek_v2 | mixtral | qwen2_moe
  moe::ModelConfig config;         // the equivalent FrugalMoE model section
  TensorMap tensors;               // FrugalMoE names, FP32, whole
  std::vector<std::string> notes;  // what was dropped or assumed, for the user
};

// Reads a folder. Throws std::runtime_error with one line naming the file and
// the key or tensor: an unsupported model_type or feature, a missing or
// unexpected tensor, a shape that disagrees with config.json.
HfModel import_hf(const std::string& dir);

// The Hugging Face model_type a FrugalMoE model exports as, or throws naming
// the model key that no supported architecture has.
std::string hf_model_type(const moe::ModelConfig& config);

// Writes config.json and the weights (FP32) into dir: one model.safetensors, or
// shards of about shard_bytes with model.safetensors.index.json.
void export_hf(const moe::ModelConfig& config, const TensorMap& tensors, const std::string& dir, int64_t shard_bytes);

}  // namespace fmoe::checkpoint

// Helpers shared by the unit tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>

#include "moe/model_config.h"

namespace fmoe::testing {

// fn must throw; its message must contain needle and be a single line.
inline void expect_error_mentions(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "expected an error mentioning " << needle;
  } catch (const std::exception& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(needle), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << "error must be one line: " << message;
  }
}

// The shape of a small test model; every other field of moe::ModelConfig keeps
// its default (first_k_dense 1, one shared expert, one expert group).
struct TestModelShape {
  int64_t vocab, hidden, layers, heads, kv_heads, head_dim, ffn, experts, top_k, moe_ffn;
  int64_t max_seq_len = 16;
};

inline moe::ModelConfig test_model(const TestModelShape& s) {
  moe::ModelConfig c;
  c.vocab_size = s.vocab;
  c.hidden_size = s.hidden;
  c.num_layers = s.layers;
  c.num_heads = s.heads;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.ffn_hidden_size = s.ffn;
  c.num_experts = s.experts;
  c.top_k = s.top_k;
  c.moe_ffn_hidden_size = s.moe_ffn;
  c.max_seq_len = s.max_seq_len;
  return c;
}

// Multi-head latent attention of the given ranks (q_lora_rank 0: full-rank
// queries) and per-head dims.
struct TestMlaShape {
  int64_t q_lora_rank, kv_lora_rank, nope, rope, v;
};

inline void use_mla(moe::ModelConfig& c, const TestMlaShape& s) {
  c.attention = "mla";
  c.q_lora_rank = s.q_lora_rank;
  c.kv_lora_rank = s.kv_lora_rank;
  c.qk_nope_head_dim = s.nope;
  c.qk_rope_head_dim = s.rope;
  c.v_head_dim = s.v;
}

}  // namespace fmoe::testing

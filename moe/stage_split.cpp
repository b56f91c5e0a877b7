#include "moe/stage_split.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <stdexcept>

namespace fmoe::moe {
namespace {

// Builds the stages of a split given how many items (E, layers, L in order) each holds.
StageSplit from_counts(const std::vector<double>& costs, const std::vector<int64_t>& items_per_stage) {
  StageSplit split;
  const int64_t last_item = static_cast<int64_t>(costs.size()) - 1;  // the head
  int64_t item = 0;
  for (int64_t n : items_per_stage) {
    PipelineStage stage;
    for (int64_t k = 0; k < n; ++k, ++item) {
      stage.cost += costs[static_cast<size_t>(item)];
      if (item == 0) {
        stage.embedding = true;
      } else if (item == last_item) {
        stage.head = true;
      } else {
        if (stage.num_layers == 0) stage.first_layer = item - 1;
        ++stage.num_layers;
      }
    }
    if (stage.num_layers == 0) stage.first_layer = std::max<int64_t>(0, std::min(item - 1, last_item - 1));
    split.stages.push_back(stage);
  }
  return split;
}

}  // namespace

std::string StageSplit::describe() const {
  std::string out;
  for (size_t s = 0; s < stages.size(); ++s) {
    const PipelineStage& st = stages[s];
    std::string stage;
    const auto add = [&](const std::string& token) { stage += (stage.empty() ? "" : " ") + token; };
    if (st.embedding) add("E");
    if (st.num_layers == 1) add("t");
    if (st.num_layers > 1) add("t*" + std::to_string(st.num_layers));
    if (st.head) add("L");
    out += (s == 0 ? "" : " | ") + stage;
  }
  return out;
}

double StageSplit::imbalance() const {
  double total = 0, worst = 0;
  for (const PipelineStage& s : stages) total += s.cost, worst = std::max(worst, s.cost);
  return total > 0 ? worst * static_cast<double>(stages.size()) / total : 1.0;
}

std::vector<double> stage_item_costs(const ModelConfig& c, int64_t seq_len) {
  const double d = static_cast<double>(c.hidden_size);
  const double attention_core = 3.0 * 2.0 * static_cast<double>(seq_len) *
                                static_cast<double>(c.num_heads * (c.qk_head_dim() + c.value_head_dim())) / 2.0;
  const double attention = 6.0 * static_cast<double>(attention_parameters(c)) + attention_core;
  const double expert = 3.0 * d * static_cast<double>(c.moe_ffn_hidden_size);
  std::vector<double> costs;
  costs.push_back(2.0 * d);  // the embedding: its gradient's scatter-add
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const double ffn = c.is_moe_layer(layer)
                           ? static_cast<double>(c.num_experts) * d + static_cast<double>(c.top_k + c.num_shared_experts) * expert
                           : 3.0 * d * static_cast<double>(c.ffn_hidden_size);
    costs.push_back(attention + 6.0 * ffn);
  }
  // The head's GEMM three times and the loss's softmax forward and backward.
  costs.push_back(6.0 * static_cast<double>(c.vocab_size) * d + 4.0 * static_cast<double>(c.vocab_size));
  return costs;
}

StageSplit balance_stages(const ModelConfig& c, int64_t seq_len, int64_t stages) {
  const std::vector<double> costs = stage_item_costs(c, seq_len);
  const int64_t n = static_cast<int64_t>(costs.size());
  if (stages < 1) throw std::invalid_argument("pipeline stages must be >= 1");
  const bool nonempty = n >= stages;
  std::vector<double> prefix(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + costs[static_cast<size_t>(i)];
  const double inf = std::numeric_limits<double>::infinity();
  // best[s][i]: the cheapest costliest stage of a split of the first i items into s stages.
  std::vector<std::vector<double>> best(static_cast<size_t>(stages) + 1, std::vector<double>(static_cast<size_t>(n) + 1, inf));
  std::vector<std::vector<int64_t>> cut(best.size(), std::vector<int64_t>(static_cast<size_t>(n) + 1, 0));
  best[0][0] = 0;
  for (int64_t s = 1; s <= stages; ++s) {
    for (int64_t i = 0; i <= n; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        // Empty stages only where there are too few items, and never the first or
        // the last: the embedding takes the tokens, the head ends the pipeline.
        if (j == i && (nonempty || s == 1 || s == stages)) continue;
        const double previous = best[static_cast<size_t>(s) - 1][static_cast<size_t>(j)];
        if (previous == inf) continue;
        const double worst = std::max(previous, prefix[static_cast<size_t>(i)] - prefix[static_cast<size_t>(j)]);
        if (worst < best[static_cast<size_t>(s)][static_cast<size_t>(i)] - 1e-9 * worst) {
          best[static_cast<size_t>(s)][static_cast<size_t>(i)] = worst;
          cut[static_cast<size_t>(s)][static_cast<size_t>(i)] = j;
        }
      }
    }
  }
  std::vector<int64_t> counts(static_cast<size_t>(stages));
  for (int64_t s = stages, i = n; s > 0; --s) {
    const int64_t j = cut[static_cast<size_t>(s)][static_cast<size_t>(i)];
    counts[static_cast<size_t>(s) - 1] = i - j;
    i = j;
  }
  return from_counts(costs, counts);
}

StageSplit parse_stage_layout(const std::string& layout, const ModelConfig& c, int64_t seq_len, int64_t stages) {
  const auto bad = [&](const std::string& why) { return std::invalid_argument("pipeline layout '" + layout + "': " + why); };
  std::vector<std::vector<char>> parsed(1);  // per stage, its items: 'E', 't', 'L'
  for (size_t i = 0; i < layout.size();) {
    const char ch = layout[i];
    if (std::isspace(static_cast<unsigned char>(ch))) {
      ++i;
    } else if (ch == '|') {
      parsed.emplace_back();
      ++i;
    } else if (ch == 'E' || ch == 'L' || ch == 't') {
      ++i;
      int64_t repeat = 1;
      if (i < layout.size() && layout[i] == '*') {
        size_t end = ++i;
        while (end < layout.size() && std::isdigit(static_cast<unsigned char>(layout[end]))) ++end;
        if (end == i || end - i > 6) throw bad("'*' must be followed by a count");
        repeat = std::stoll(layout.substr(i, end - i));
        i = end;
      }
      for (int64_t k = 0; k < repeat; ++k) parsed.back().push_back(ch);
    } else {
      throw bad(std::string("unknown token '") + ch + "' (E embedding, t layer, L head and loss, | between stages, t*N for N layers)");
    }
  }
  if (static_cast<int64_t>(parsed.size()) != stages) {
    throw bad("has " + std::to_string(parsed.size()) + " stages; pp x virtual_pp is " + std::to_string(stages));
  }
  std::vector<int64_t> counts;
  int64_t layers = 0, embeddings = 0, heads = 0;
  for (size_t s = 0; s < parsed.size(); ++s) {
    for (size_t k = 0; k < parsed[s].size(); ++k) {
      const char item = parsed[s][k];
      if (item == 'E') {
        if (++embeddings > 1) throw bad("E (the embedding) appears twice");
        if (s != 0 || k != 0) throw bad("E (the embedding) must open the first stage");
      } else if (item == 'L') {
        if (++heads > 1) throw bad("L (the head and loss) appears twice");
        if (s + 1 != parsed.size() || k + 1 != parsed[s].size()) throw bad("L (the head and loss) must close the last stage");
      } else if (++layers > c.num_layers) {
        throw bad("layer " + std::to_string(layers - 1) + " is placed but the model has " + std::to_string(c.num_layers) +
                  " layers (0 to " + std::to_string(c.num_layers - 1) + ")");
      }
    }
    counts.push_back(static_cast<int64_t>(parsed[s].size()));
  }
  if (embeddings == 0) throw bad("E (the embedding) is missing");
  if (heads == 0) throw bad("L (the head and loss) is missing");
  if (layers < c.num_layers) {
    throw bad("places " + std::to_string(layers) + " of the " + std::to_string(c.num_layers) + " layers: layer " + std::to_string(layers) +
              " is missing");
  }
  return from_counts(stage_item_costs(c, seq_len), counts);
}

}  // namespace fmoe::moe

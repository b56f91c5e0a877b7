#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <set>
#include <stdexcept>
#include <tuple>

namespace fmoe::parallel {
namespace {

const char* code(PipeOp op) {
  switch (op) {
    case PipeOp::kForward: return "F";
    case PipeOp::kBackward: return "B";
    case PipeOp::kInputGrad: return "I";
    case PipeOp::kWeightGrad: return "W";
    case PipeOp::kSendForward: return "SF";
    case PipeOp::kRecvForward: return "RF";
    case PipeOp::kSendBackward: return "SB";
    case PipeOp::kRecvBackward: return "RB";
  }
  return "?";
}

std::vector<int> loop_placement(int pp, int v) {
  std::vector<int> rank(static_cast<size_t>(pp * v));
  for (int s = 0; s < pp * v; ++s) rank[static_cast<size_t>(s)] = s % pp;
  return rank;
}

PipelineSchedule gpipe(int pp, int m) {
  PipelineSchedule s;
  s.ranks.resize(static_cast<size_t>(pp));
  for (int r = 0; r < pp; ++r) {
    for (int i = 0; i < m; ++i) s.ranks[static_cast<size_t>(r)].push_back({r, PipeOp::kForward, i});
    for (int i = 0; i < m; ++i) s.ranks[static_cast<size_t>(r)].push_back({r, PipeOp::kBackward, i});
  }
  return s;
}

PipelineSchedule one_f_one_b(int pp, int m) {
  PipelineSchedule s;
  s.ranks.resize(static_cast<size_t>(pp));
  for (int r = 0; r < pp; ++r) {
    auto& acts = s.ranks[static_cast<size_t>(r)];
    const int warmup = std::min(pp - r - 1, m);
    int f = 0, b = 0;
    for (; f < warmup; ++f) acts.push_back({r, PipeOp::kForward, f});
    while (f < m) {
      acts.push_back({r, PipeOp::kForward, f++});
      acts.push_back({r, PipeOp::kBackward, b++});
    }
    while (b < m) acts.push_back({r, PipeOp::kBackward, b++});
  }
  return s;
}

// Megatron's interleaved order: a rank's k-th forward is chunk (k / pp) % v of
// micro-batch (k / (pp v)) pp + k % pp; backwards walk the chunks in reverse.
PipelineSchedule interleaved(int pp, int v, int m) {
  PipelineSchedule s;
  s.ranks.resize(static_cast<size_t>(pp));
  const int total = m * v;
  const auto forward_of = [&](int k) { return std::make_pair((k / pp) % v, (k / (pp * v)) * pp + k % pp); };
  for (int r = 0; r < pp; ++r) {
    auto& acts = s.ranks[static_cast<size_t>(r)];
    const auto add = [&](int k, bool backward) {
      auto [chunk, micro] = forward_of(k);
      if (backward) chunk = v - 1 - chunk;
      acts.push_back({chunk * pp + r, backward ? PipeOp::kBackward : PipeOp::kForward, micro});
    };
    const int warmup = std::min((pp - r - 1) * 2 + (v - 1) * pp, total);
    int f = 0, b = 0;
    for (; f < warmup; ++f) add(f, false);
    while (f < total) {
      add(f++, false);
      add(b++, true);
    }
    while (b < total) add(b++, true);
  }
  return s;
}

// ZB-H1 built by running the ranks on unit costs with its priorities (see the header).
PipelineSchedule zero_bubble_h1(int pp, int m) {
  PipelineSchedule s;
  s.ranks.resize(static_cast<size_t>(pp));
  std::map<std::tuple<int, int, int>, int> finish;  // (stage, op, micro) -> unit time it finishes
  const auto done_by = [&](int stage, PipeOp op, int micro, int t) {
    const auto it = finish.find({stage, static_cast<int>(op), micro});
    return it != finish.end() && it->second <= t;
  };
  std::vector<int> forwards(static_cast<size_t>(pp)), inputs(forwards), weights(forwards), busy_until(forwards);
  for (int t = 0; std::any_of(weights.begin(), weights.end(), [&](int w) { return w < m; }); ++t) {
    for (int r = 0; r < pp; ++r) {
      const size_t ri = static_cast<size_t>(r);
      if (busy_until[ri] > t) continue;
      const int f = forwards[ri], i = inputs[ri], w = weights[ri];
      const bool input_ready = i < f && (r == pp - 1 ? done_by(r, PipeOp::kForward, i, t) : done_by(r + 1, PipeOp::kInputGrad, i, t));
      const bool forward_ready = f < m && f - w < 2 * pp - r && (r == 0 || done_by(r - 1, PipeOp::kForward, f, t));
      PipeAction a;
      if (input_ready) {
        a = {r, PipeOp::kInputGrad, inputs[ri]++};
      } else if (i - w > r) {
        a = {r, PipeOp::kWeightGrad, weights[ri]++};
      } else if (forward_ready) {
        a = {r, PipeOp::kForward, forwards[ri]++};
      } else if (i > w) {
        a = {r, PipeOp::kWeightGrad, weights[ri]++};
      } else {
        continue;
      }
      s.ranks[ri].push_back(a);
      finish[{a.stage, static_cast<int>(a.op), a.micro}] = t + 1;
      busy_until[ri] = t + 1;
    }
  }
  return s;
}

}  // namespace

std::string PipeAction::text() const { return std::to_string(stage) + code(op) + std::to_string(micro); }

std::optional<PipeAction> parse_action(const std::string& text) {
  size_t i = 0;
  const auto number = [&](int& out) {
    const size_t start = i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    if (i == start || i - start > 6) return false;
    out = std::stoi(text.substr(start, i - start));
    return true;
  };
  PipeAction a;
  if (!number(a.stage)) return std::nullopt;
  const size_t start = i;
  while (i < text.size() && std::isupper(static_cast<unsigned char>(text[i]))) ++i;
  const std::string op = text.substr(start, i - start);
  bool known = false;
  for (PipeOp candidate : {PipeOp::kForward, PipeOp::kBackward, PipeOp::kInputGrad, PipeOp::kWeightGrad, PipeOp::kSendForward,
                           PipeOp::kRecvForward, PipeOp::kSendBackward, PipeOp::kRecvBackward}) {
    if (op == code(candidate)) a.op = candidate, known = true;
  }
  if (!known || !number(a.micro) || i != text.size()) return std::nullopt;
  return a;
}

std::string PipelineSchedule::csv(int rank) const {
  std::string out = "index,action\n";
  const auto& acts = ranks.at(static_cast<size_t>(rank));
  for (size_t i = 0; i < acts.size(); ++i) out += std::to_string(i) + "," + acts[i].text() + "\n";
  return out;
}

PipelineSchedule make_schedule(const std::string& name, int pp, int v, int micro_batches) {
  const std::string where = "pipeline schedule " + name + " (pp " + std::to_string(pp) + ", v " + std::to_string(v) + ", " +
                            std::to_string(micro_batches) + " micro-batches): ";
  if (pp < 1 || v < 1 || micro_batches < 1) throw std::invalid_argument(where + "pp, v and micro-batches must be >= 1");
  PipelineSchedule s;
  if (name == "gpipe" || name == "1f1b" || name == "zbh1") {
    if (v != 1) throw std::invalid_argument(where + name + " runs one chunk per rank (v 1); interleaved runs several");
    s = name == "gpipe" ? gpipe(pp, micro_batches) : name == "1f1b" ? one_f_one_b(pp, micro_batches) : zero_bubble_h1(pp, micro_batches);
    s.split_backward = name == "zbh1";
  } else if (name == "interleaved") {
    if (v < 2) throw std::invalid_argument(where + "interleaved needs v >= 2 chunks per rank (parallel.virtual_pp)");
    if (micro_batches % pp != 0) {
      throw std::invalid_argument(where + "interleaved needs micro-batches in whole groups of pp (a multiple of " + std::to_string(pp) + ")");
    }
    s = interleaved(pp, v, micro_batches);
  } else {
    throw std::invalid_argument("pipeline schedule: unknown name '" + name + "' (" + kScheduleNames + ")");
  }
  s.name = name;
  s.pp = pp;
  s.v = v;
  s.micro_batches = micro_batches;
  s.stage_rank = loop_placement(pp, v);
  return s;
}

PipelineSchedule lower(const PipelineSchedule& in) {
  PipelineSchedule out = in;
  out.lowered = true;
  const int stages = in.num_stages();
  const auto rank_of = [&](int stage) { return in.stage_rank[static_cast<size_t>(stage)]; };
  for (size_t r = 0; r < in.ranks.size(); ++r) {
    auto& acts = out.ranks[r];
    acts.clear();
    for (const PipeAction& a : in.ranks[r]) {
      const bool backward = a.op == PipeOp::kBackward || a.op == PipeOp::kInputGrad;
      // The receive goes right before the action that consumes it.
      if (a.op == PipeOp::kForward && a.stage > 0 && rank_of(a.stage - 1) != static_cast<int>(r)) {
        acts.push_back({a.stage, PipeOp::kRecvForward, a.micro});
      }
      if (backward && a.stage + 1 < stages && rank_of(a.stage + 1) != static_cast<int>(r)) {
        acts.push_back({a.stage, PipeOp::kRecvBackward, a.micro});
      }
      acts.push_back(a);
      // The send right after the action that produces it.
      if (a.op == PipeOp::kForward && a.stage + 1 < stages && rank_of(a.stage + 1) != static_cast<int>(r)) {
        acts.push_back({a.stage, PipeOp::kSendForward, a.micro});
      }
      if (backward && a.stage > 0 && rank_of(a.stage - 1) != static_cast<int>(r)) {
        acts.push_back({a.stage, PipeOp::kSendBackward, a.micro});
      }
    }
  }
  return out;
}

std::string validate(const PipelineSchedule& s) {
  const int stages = s.num_stages(), m = s.micro_batches;
  if (static_cast<int>(s.ranks.size()) != s.pp) return "expected " + std::to_string(s.pp) + " ranks' lists, got " + std::to_string(s.ranks.size());
  // position[(stage, op, micro)] = (rank, index)
  std::map<std::tuple<int, int, int>, std::pair<int, int>> position;
  for (int r = 0; r < s.pp; ++r) {
    const auto& acts = s.ranks[static_cast<size_t>(r)];
    for (int i = 0; i < static_cast<int>(acts.size()); ++i) {
      const PipeAction& a = acts[static_cast<size_t>(i)];
      const std::string where = "rank " + std::to_string(r) + " action " + std::to_string(i) + " (" + a.text() + "): ";
      if (a.stage < 0 || a.stage >= stages) return where + "no such stage";
      if (a.micro < 0 || a.micro >= m) return where + "no such micro-batch";
      if (s.stage_rank[static_cast<size_t>(a.stage)] != r) {
        return where + "stage " + std::to_string(a.stage) + " lives on rank " + std::to_string(s.stage_rank[static_cast<size_t>(a.stage)]);
      }
      if (!a.is_compute() && !s.lowered) return where + "a send or receive in a schedule that is not lowered";
      if (s.split_backward ? a.op == PipeOp::kBackward : (a.op == PipeOp::kInputGrad || a.op == PipeOp::kWeightGrad)) {
        return where + (s.split_backward ? "a whole backward in a split-backward schedule" : "a split backward in a whole-backward schedule");
      }
      if (!position.emplace(std::make_tuple(a.stage, static_cast<int>(a.op), a.micro), std::make_pair(r, i)).second) return where + "repeated";
    }
  }
  const auto find = [&](int stage, PipeOp op, int micro) -> const std::pair<int, int>* {
    const auto it = position.find({stage, static_cast<int>(op), micro});
    return it == position.end() ? nullptr : &it->second;
  };
  const std::vector<PipeOp> order = s.split_backward ? std::vector<PipeOp>{PipeOp::kForward, PipeOp::kInputGrad, PipeOp::kWeightGrad}
                                                     : std::vector<PipeOp>{PipeOp::kForward, PipeOp::kBackward};
  for (int stage = 0; stage < stages; ++stage) {
    for (int micro = 0; micro < m; ++micro) {
      int previous = -1;
      for (PipeOp op : order) {
        const PipeAction a{stage, op, micro};
        const auto* at = find(stage, op, micro);
        if (!at) return a.text() + " is missing";
        if (at->second < previous) return a.text() + " runs before the step it depends on (F before I before W)";
        previous = at->second;
      }
    }
  }
  if (s.lowered) {
    for (const auto& [key, where] : position) {
      const auto [stage, op_int, micro] = key;
      const PipeOp op = static_cast<PipeOp>(op_int);
      const bool send = op == PipeOp::kSendForward || op == PipeOp::kSendBackward;
      if (!send) continue;
      const bool forward = op == PipeOp::kSendForward;
      const int peer_stage = forward ? stage + 1 : stage - 1;
      const PipeAction sent{stage, op, micro};
      if (peer_stage < 0 || peer_stage >= stages) return sent.text() + " sends past the last stage";
      if (!find(peer_stage, forward ? PipeOp::kRecvForward : PipeOp::kRecvBackward, micro)) {
        return sent.text() + " has no matching receive on rank " + std::to_string(s.stage_rank[static_cast<size_t>(peer_stage)]);
      }
    }
    for (const auto& [key, where] : position) {
      const auto [stage, op_int, micro] = key;
      const PipeOp op = static_cast<PipeOp>(op_int);
      if (op != PipeOp::kRecvForward && op != PipeOp::kRecvBackward) continue;
      const bool forward = op == PipeOp::kRecvForward;
      if (!find(forward ? stage - 1 : stage + 1, forward ? PipeOp::kSendForward : PipeOp::kSendBackward, micro)) {
        return PipeAction{stage, op, micro}.text() + " receives what no rank sends";
      }
    }
  }
  return "";
}

}  // namespace fmoe::parallel

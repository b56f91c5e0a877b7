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

// DualPipeV (DeepSeek's "cut-in-half" DualPipe): 2 pp stages in a V, rank r
// holding stage r (chunk 0, on the way down) and stage 2 pp - 1 - r (chunk 1, on
// the way back up), so the first rank holds the embedding and the head. Each
// rank runs the eight phases of DeepSeek's dualpipev.py, in its order; its
// overlapped forward-and-backward pairs run here one after the other. Some
// backwards are split (their weight gradients queued first in, first out and
// run where the phases place them), the others whole.
PipelineSchedule dual_pipe_v(int pp, int m) {
  PipelineSchedule s;
  s.ranks.resize(static_cast<size_t>(pp));
  for (int r = 0; r < pp; ++r) {
    auto& acts = s.ranks[static_cast<size_t>(r)];
    const int stage[2] = {r, 2 * pp - 1 - r};
    int forwards[2] = {0, 0}, backwards[2] = {0, 0};
    std::vector<PipeAction> deferred;  // weight gradients, first in first out
    size_t next_weight = 0;
    const auto forward = [&](int chunk, bool overlapped = false) {
      acts.push_back({stage[chunk], PipeOp::kForward, forwards[chunk]++, overlapped});
    };
    const auto backward = [&](int chunk, bool split) {
      const int micro = backwards[chunk]++;
      if (!split) {
        acts.push_back({stage[chunk], PipeOp::kBackward, micro});
        return;
      }
      acts.push_back({stage[chunk], PipeOp::kInputGrad, micro});
      deferred.push_back({stage[chunk], PipeOp::kWeightGrad, micro});
    };
    const auto weight = [&] { acts.push_back(deferred.at(next_weight++)); };
    const int tail = pp - r - 1;  // the phases whose length shrinks down the V
    for (int i = 0; i < 2 * tail; ++i) forward(0);             // 1: nF0
    for (int i = 0; i < r + 1; ++i) forward(0), forward(1);    // 2: nF0F1
    for (int i = 0; i < tail; ++i) backward(1, true), weight(), forward(1);  // 3: nB1W1F1
    // An overlapped pair: a forward of one chunk with a backward of the other.
    const auto pair = [&](int forward_chunk) { forward(forward_chunk, true), backward(1 - forward_chunk, false); };
    for (int i = 0; i < m - 2 * pp + r + 1; ++i) {             // 4: nF0B1F1B0
      // The last rank's first pair runs apart: its forward feeds its own chunk 1.
      if (i == 0 && r == pp - 1) {
        forward(0), backward(1, false);
      } else {
        pair(0);
      }
      pair(1);
    }
    for (int i = 0; i < tail; ++i) backward(1, false), pair(1);  // 5: nB1F1B0
    bool split = false;                                         // 6: nB1B0, the second half split
    for (int i = 0; i < r + 1; ++i) {
      if (i == (r + 1) / 2 && r % 2 == 1) split = true;
      backward(1, split);
      if (i == (r + 1) / 2 && r % 2 == 0) split = true;
      backward(0, split);
    }
    for (int i = 0; i < tail; ++i) weight(), backward(0, true);  // 7: nWB0
    while (next_weight < deferred.size()) weight();              // 8: nW
  }
  return s;
}

std::vector<int> v_placement(int pp) {
  std::vector<int> rank(static_cast<size_t>(2 * pp));
  for (int s = 0; s < 2 * pp; ++s) rank[static_cast<size_t>(s)] = s < pp ? s : 2 * pp - 1 - s;
  return rank;
}

}  // namespace

std::vector<int> stage_placement(const std::string& name, int pp, int v) {
  return name == "dualpipev" ? v_placement(pp) : loop_placement(pp, v);
}

std::string PipeAction::text() const { return std::to_string(stage) + code(op) + std::to_string(micro) + (overlapped ? "&" : ""); }

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
  if (!known || !number(a.micro)) return std::nullopt;
  if (i + 1 == text.size() && text[i] == '&' && a.op == PipeOp::kForward) a.overlapped = true, ++i;
  if (i != text.size()) return std::nullopt;
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
  } else if (name == "dualpipev") {
    if (v != 2) throw std::invalid_argument(where + "dualpipev runs two chunks per rank in a V (parallel.virtual_pp 2)");
    if (micro_batches < 2 * pp) {
      throw std::invalid_argument(where + "dualpipev needs at least 2 pp = " + std::to_string(2 * pp) + " micro-batches");
    }
    s = dual_pipe_v(pp, micro_batches);
    s.split_backward = true;
  } else {
    throw std::invalid_argument("pipeline schedule: unknown name '" + name + "' (" + kScheduleNames + ")");
  }
  s.name = name;
  s.pp = pp;
  s.v = v;
  s.micro_batches = micro_batches;
  s.stage_rank = stage_placement(name, pp, v);
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
    const auto& compute = in.ranks[r];
    const auto away = [&](int stage) { return stage >= 0 && stage < stages && rank_of(stage) != static_cast<int>(r); };
    const auto is_backward = [](const PipeAction& a) { return a.op == PipeOp::kBackward || a.op == PipeOp::kInputGrad; };
    // The receive goes right before the action that consumes it.
    const auto receives = [&](const PipeAction& a) {
      if (a.op == PipeOp::kForward && a.stage > 0 && away(a.stage - 1)) acts.push_back({a.stage, PipeOp::kRecvForward, a.micro});
      if (is_backward(a) && away(a.stage + 1)) acts.push_back({a.stage, PipeOp::kRecvBackward, a.micro});
    };
    // The send right after the action that produces it.
    const auto sends = [&](const PipeAction& a) {
      if (a.op == PipeOp::kForward && away(a.stage + 1)) acts.push_back({a.stage, PipeOp::kSendForward, a.micro});
      if (is_backward(a) && away(a.stage - 1)) acts.push_back({a.stage, PipeOp::kSendBackward, a.micro});
    };
    for (size_t i = 0; i < compute.size(); ++i) {
      const PipeAction& a = compute[i];
      if (a.overlapped && i + 1 < compute.size()) {
        const PipeAction& b = compute[++i];
        receives(a), receives(b);
        acts.push_back(a), acts.push_back(b);
        sends(a), sends(b);
        continue;
      }
      receives(a);
      acts.push_back(a);
      sends(a);
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
      if (a.overlapped) {
        const bool paired = i + 1 < static_cast<int>(acts.size()) && acts[static_cast<size_t>(i) + 1].op == PipeOp::kBackward;
        if (a.op != PipeOp::kForward || !paired) return where + "an overlapped forward must be followed by a whole backward";
      }
      if (!s.split_backward && (a.op == PipeOp::kInputGrad || a.op == PipeOp::kWeightGrad)) {
        return where + "a split backward in a whole-backward schedule";
      }
      if (!position.emplace(std::make_tuple(a.stage, static_cast<int>(a.op), a.micro), std::make_pair(r, i)).second) return where + "repeated";
    }
  }
  const auto find = [&](int stage, PipeOp op, int micro) -> const std::pair<int, int>* {
    const auto it = position.find({stage, static_cast<int>(op), micro});
    return it == position.end() ? nullptr : &it->second;
  };
  // Each micro-batch's backward on a stage runs whole (B) or split (I, then W):
  // a split-backward schedule may mix the two (DualPipeV does).
  for (int stage = 0; stage < stages; ++stage) {
    for (int micro = 0; micro < m; ++micro) {
      const auto* whole = find(stage, PipeOp::kBackward, micro);
      const auto* input = find(stage, PipeOp::kInputGrad, micro);
      const auto* weight = find(stage, PipeOp::kWeightGrad, micro);
      if (whole && (input || weight)) {
        return PipeAction{stage, PipeOp::kBackward, micro}.text() + " beside " +
               PipeAction{stage, input ? PipeOp::kInputGrad : PipeOp::kWeightGrad, micro}.text() + ": a backward runs whole or split, not both";
      }
      const std::vector<PipeOp> order = whole || !s.split_backward ? std::vector<PipeOp>{PipeOp::kForward, PipeOp::kBackward}
                                                                   : std::vector<PipeOp>{PipeOp::kForward, PipeOp::kInputGrad, PipeOp::kWeightGrad};
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

namespace {

bool is_receive(PipeOp op) { return op == PipeOp::kRecvForward || op == PipeOp::kRecvBackward; }
bool is_send(PipeOp op) { return op == PipeOp::kSendForward || op == PipeOp::kSendBackward; }

// The peer rank of a send or receive action.
int peer_of(const PipelineSchedule& s, const PipeAction& a) {
  const bool forward = a.op == PipeOp::kSendForward || a.op == PipeOp::kRecvBackward;
  return s.stage_rank.at(static_cast<size_t>(forward ? a.stage + 1 : a.stage - 1));
}

// The message a send or receive carries: (sending stage, micro-batch, backward).
std::tuple<int, int, int> message_of(const PipeAction& a) {
  switch (a.op) {
    case PipeOp::kSendForward: return {a.stage, a.micro, 0};
    case PipeOp::kRecvForward: return {a.stage - 1, a.micro, 0};
    case PipeOp::kSendBackward: return {a.stage, a.micro, 1};
    default: return {a.stage + 1, a.micro, 1};
  }
}

}  // namespace

std::vector<std::vector<size_t>> receives_by_sender(const PipelineSchedule& s, int rank) {
  // Each peer's messages to `rank`, numbered in the order it sends them.
  std::map<std::pair<int, std::tuple<int, int, int>>, size_t> place;  // (sender, message) -> its place
  for (int peer = 0; peer < s.pp; ++peer) {
    size_t sent = 0;
    for (const PipeAction& a : s.ranks.at(static_cast<size_t>(peer))) {
      if (is_send(a.op) && peer_of(s, a) == rank) place[{peer, message_of(a)}] = sent++;
    }
  }
  std::vector<std::vector<std::pair<size_t, size_t>>> from(static_cast<size_t>(s.pp));  // per sender: (place, action index)
  const std::vector<PipeAction>& acts = s.ranks.at(static_cast<size_t>(rank));
  for (size_t i = 0; i < acts.size(); ++i) {
    if (!is_receive(acts[i].op)) continue;
    const int peer = peer_of(s, acts[i]);
    const auto it = place.find({peer, message_of(acts[i])});
    if (it == place.end()) throw std::invalid_argument(acts[i].text() + " on rank " + std::to_string(rank) + " has no matching send");
    from[static_cast<size_t>(peer)].emplace_back(it->second, i);
  }
  std::vector<std::vector<size_t>> order(from.size());
  for (size_t peer = 0; peer < from.size(); ++peer) {
    std::sort(from[peer].begin(), from[peer].end());
    for (const auto& [where, index] : from[peer]) order[peer].push_back(index);
  }
  return order;
}

namespace {

// One rank's groups as its runs stand, with the receives brought along.
std::vector<P2PGroup> run_groups(const PipelineSchedule& s, int rank) {
  const std::vector<PipeAction>& acts = s.ranks.at(static_cast<size_t>(rank));
  const std::vector<std::vector<size_t>> from = receives_by_sender(s, rank);
  std::map<size_t, std::pair<int, size_t>> order;  // receive index -> (sender, its place among the sender's messages)
  for (size_t peer = 0; peer < from.size(); ++peer) {
    for (size_t k = 0; k < from[peer].size(); ++k) order[from[peer][k]] = {static_cast<int>(peer), k};
  }
  std::vector<size_t> next(from.size(), 0);  // per sender: how many of its messages are in groups already
  std::vector<P2PGroup> groups;
  std::vector<bool> placed(acts.size(), false);
  for (size_t i = 0; i < acts.size();) {
    if (acts[i].is_compute()) {
      ++i;
      continue;
    }
    P2PGroup group;
    group.at = i;
    std::vector<size_t> sends;
    for (; i < acts.size() && !acts[i].is_compute(); ++i) {
      if (placed[i]) continue;
      if (is_send(acts[i].op)) {
        sends.push_back(i);
        continue;
      }
      const auto [peer, k] = order.at(i);
      for (size_t& n = next[static_cast<size_t>(peer)]; n <= k; ++n) {
        const size_t r = from[static_cast<size_t>(peer)][n];
        group.actions.push_back(r);
        placed[r] = true;
      }
    }
    if (group.actions.empty() && sends.empty()) continue;
    group.actions.insert(group.actions.end(), sends.begin(), sends.end());
    groups.push_back(std::move(group));
  }
  return groups;
}

// Runs every rank's groups: each rank stands in one group until the
// counterparts of all its operations are posted (their rank stands in or past
// their group), then moves on. Returns where each rank stands at the end
// (groups.size() when done) and, per rank, the sends of its standing group
// whose receives are not posted.
struct GroupRun {
  std::vector<size_t> at;
  std::vector<std::vector<size_t>> unmatched_sends;
};

GroupRun run_to_the_end(const PipelineSchedule& s, const std::vector<std::vector<P2PGroup>>& groups) {
  const int pp = s.pp;
  // Per (sender, receiver) pair: the k-th message's send group and receive group.
  std::map<std::tuple<int, int, size_t>, size_t> send_group, recv_group;
  for (int r = 0; r < pp; ++r) {
    const std::vector<PipeAction>& acts = s.ranks[static_cast<size_t>(r)];
    std::map<size_t, size_t> place;  // receive index -> its place among its sender's messages
    for (const std::vector<size_t>& from : receives_by_sender(s, r)) {
      for (size_t k = 0; k < from.size(); ++k) place[from[k]] = k;
    }
    std::map<int, size_t> sent;
    for (size_t g = 0; g < groups[static_cast<size_t>(r)].size(); ++g) {
      for (const size_t i : groups[static_cast<size_t>(r)][g].actions) {
        const int peer = peer_of(s, acts[i]);
        if (is_send(acts[i].op)) {
          send_group[{r, peer, sent[peer]++}] = g;
        } else {
          recv_group[{peer, r, place.at(i)}] = g;
        }
      }
    }
  }
  GroupRun run;
  run.at.assign(static_cast<size_t>(pp), 0);
  run.unmatched_sends.assign(static_cast<size_t>(pp), {});
  std::vector<std::map<int, size_t>> sent_before(static_cast<size_t>(pp)), received_before(static_cast<size_t>(pp));
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < pp; ++r) {
      const size_t g = run.at[static_cast<size_t>(r)];
      if (g == groups[static_cast<size_t>(r)].size()) continue;
      const std::vector<PipeAction>& acts = s.ranks[static_cast<size_t>(r)];
      std::map<int, size_t> sent = sent_before[static_cast<size_t>(r)], received = received_before[static_cast<size_t>(r)];
      std::vector<size_t> unmatched;
      bool ready = true;
      for (const size_t i : groups[static_cast<size_t>(r)][g].actions) {
        const int peer = peer_of(s, acts[i]);
        const bool send = is_send(acts[i].op);
        const size_t other = send ? recv_group.at({r, peer, sent[peer]++}) : send_group.at({peer, r, received[peer]++});
        if (run.at[static_cast<size_t>(peer)] >= other) continue;
        ready = false;
        if (send) unmatched.push_back(i);
      }
      run.unmatched_sends[static_cast<size_t>(r)] = unmatched;
      if (!ready) continue;
      sent_before[static_cast<size_t>(r)] = std::move(sent);
      received_before[static_cast<size_t>(r)] = std::move(received);
      ++run.at[static_cast<size_t>(r)];
      moved = true;
    }
  }
  return run;
}

// Empty when every rank ran its groups to the end, else the waiting groups in one line.
std::string stuck_groups(const PipelineSchedule& s, const std::vector<std::vector<P2PGroup>>& groups, const GroupRun& run) {
  std::string stuck;
  for (int r = 0; r < s.pp; ++r) {
    const size_t g = run.at[static_cast<size_t>(r)];
    if (g == groups[static_cast<size_t>(r)].size()) continue;
    std::string names;
    for (const size_t i : groups[static_cast<size_t>(r)][g].actions) names += (names.empty() ? "" : " ") + s.ranks[static_cast<size_t>(r)][i].text();
    stuck += (stuck.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " waits in [" + names + "]";
  }
  return stuck.empty() ? "" : "grouped point-to-point deadlocks: " + stuck;
}

}  // namespace

std::vector<std::vector<P2PGroup>> p2p_groups(const PipelineSchedule& s, bool delay_sends) {
  if (!s.lowered) throw std::invalid_argument("p2p_groups: the schedule is not lowered");
  std::vector<std::vector<P2PGroup>> groups(static_cast<size_t>(s.pp));
  for (int r = 0; r < s.pp; ++r) groups[static_cast<size_t>(r)] = run_groups(s, r);
  if (!delay_sends) return groups;
  // Each round moves at least one send one group later, so the rounds are bounded.
  for (;;) {
    const GroupRun run = run_to_the_end(s, groups);
    int rank = -1;
    for (int r = 0; r < s.pp && rank < 0; ++r) {
      const size_t g = run.at[static_cast<size_t>(r)];
      if (g + 1 < groups[static_cast<size_t>(r)].size() && !run.unmatched_sends[static_cast<size_t>(r)].empty()) rank = r;
    }
    if (rank < 0) {
      if (const std::string stuck = stuck_groups(s, groups, run); !stuck.empty()) throw std::invalid_argument(stuck);
      return groups;
    }
    std::vector<P2PGroup>& mine = groups[static_cast<size_t>(rank)];
    const size_t g = run.at[static_cast<size_t>(rank)];
    const std::vector<PipeAction>& acts = s.ranks[static_cast<size_t>(rank)];
    // The unmatched sends move on, and with them every later send of the group to the same peer (issue order).
    std::set<int> peers;
    for (const size_t i : run.unmatched_sends[static_cast<size_t>(rank)]) peers.insert(peer_of(s, acts[i]));
    const size_t first = run.unmatched_sends[static_cast<size_t>(rank)].front();
    std::vector<size_t> stay, move;
    for (const size_t i : mine[g].actions) {
      (is_send(acts[i].op) && i >= first && peers.count(peer_of(s, acts[i])) ? move : stay).push_back(i);
    }
    mine[g].actions = stay;
    std::vector<size_t>& next = mine[g + 1].actions;
    next.insert(next.end(), move.begin(), move.end());
    // Receives first (their order stands), then the sends in action order.
    std::stable_partition(next.begin(), next.end(), [&](size_t i) { return is_receive(acts[i].op); });
    const auto sends = std::find_if(next.begin(), next.end(), [&](size_t i) { return is_send(acts[i].op); });
    std::sort(sends, next.end());
    if (mine[g].actions.empty()) mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(g));
  }
}

std::string check_p2p_groups(const PipelineSchedule& s, const std::vector<std::vector<P2PGroup>>& groups) {
  return stuck_groups(s, groups, run_to_the_end(s, groups));
}

std::vector<bool> last_gradient_actions(const PipelineSchedule& schedule, int rank) {
  const std::vector<PipeAction>& actions = schedule.ranks.at(static_cast<size_t>(rank));
  std::vector<bool> last(actions.size(), false);
  // Walking backwards: the kinds of gradient action met so far on each stage.
  std::map<int, std::set<PipeOp>> later;
  for (size_t i = actions.size(); i-- > 0;) {
    const PipeAction& a = actions[i];
    if (a.op != PipeOp::kBackward && a.op != PipeOp::kInputGrad && a.op != PipeOp::kWeightGrad) continue;
    std::set<PipeOp>& met = later[a.stage];
    // B gives every gradient, I those that do not defer, W those that do.
    const bool b = met.count(PipeOp::kBackward) > 0, in = met.count(PipeOp::kInputGrad) > 0, w = met.count(PipeOp::kWeightGrad) > 0;
    if (a.op == PipeOp::kBackward) last[i] = !b && !in && !w;
    if (a.op == PipeOp::kInputGrad) last[i] = !b && !in;
    if (a.op == PipeOp::kWeightGrad) last[i] = !b && !w;
    met.insert(a.op);
  }
  return last;
}

}  // namespace fmoe::parallel

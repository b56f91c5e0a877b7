#include "plan/pipeline_sim.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <map>
#include <tuple>

namespace fmoe::plan {
namespace {

using Key = std::tuple<int, int, int>;  // stage, op, micro
Key key(int stage, PipeOp op, int micro) { return {stage, static_cast<int>(op), micro}; }

struct Need {
  Key what;
  bool across = false;  // produced on another rank: adds the communication time
};

double cost_of(PipeOp op, const PipeCosts& c) {
  switch (op) {
    case PipeOp::kForward: return c.forward;
    case PipeOp::kBackward: return c.backward;
    case PipeOp::kInputGrad: return c.input_grad;
    case PipeOp::kWeightGrad: return c.weight_grad;
    default: return 0;  // sends are posted, receives wait: neither occupies the rank
  }
}

}  // namespace

PipeSimResult simulate(const PipelineSchedule& s, const PipeCosts& costs) {
  const int ranks = s.pp, stages = s.num_stages();
  // A stage's input gradient is there once its B, or its I, is done: both are
  // recorded under the I key, so schedules that mix whole and split backwards work.
  const PipeOp backward = PipeOp::kInputGrad;
  const auto rank_of = [&](int stage) { return s.stage_rank[static_cast<size_t>(stage)]; };
  // What an action waits for. In a lowered schedule what crosses ranks comes through its receive.
  const auto needs = [&](const PipeAction& a, int r) {
    std::vector<Need> out;
    const auto add = [&](int stage, PipeOp op) {
      const bool across = rank_of(stage) != r;
      if (!(across && s.lowered)) out.push_back({key(stage, op, a.micro), across});
    };
    switch (a.op) {
      case PipeOp::kForward:
        if (a.stage > 0) add(a.stage - 1, PipeOp::kForward);
        break;
      case PipeOp::kBackward:
      case PipeOp::kInputGrad:
        add(a.stage, PipeOp::kForward);
        if (a.stage + 1 < stages) add(a.stage + 1, backward);
        break;
      case PipeOp::kWeightGrad: add(a.stage, PipeOp::kInputGrad); break;
      case PipeOp::kSendForward: add(a.stage, PipeOp::kForward); break;
      case PipeOp::kSendBackward: add(a.stage, backward); break;
      case PipeOp::kRecvForward: out.push_back({key(a.stage - 1, PipeOp::kSendForward, a.micro), true}); break;
      case PipeOp::kRecvBackward: out.push_back({key(a.stage + 1, PipeOp::kSendBackward, a.micro), true}); break;
    }
    return out;
  };

  PipeSimResult result;
  result.busy.assign(static_cast<size_t>(ranks), 0);
  result.spans.resize(static_cast<size_t>(ranks));
  result.peak_activations.assign(static_cast<size_t>(ranks), 0);
  std::vector<int> live(static_cast<size_t>(ranks), 0);
  std::vector<size_t> next(static_cast<size_t>(ranks), 0);
  std::vector<double> free_at(static_cast<size_t>(ranks), 0);
  std::map<Key, double> done;
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < ranks; ++r) {
      const size_t ri = static_cast<size_t>(r);
      const auto& acts = s.ranks[ri];
      while (next[ri] < acts.size()) {
        // An overlapped forward runs with the backward after it: one chunk, both inputs first, both outputs at its end.
        const size_t count = acts[next[ri]].overlapped && next[ri] + 1 < acts.size() ? 2 : 1;
        double start = free_at[ri];
        bool ready = true;
        for (size_t k = 0; k < count && ready; ++k) {
          for (const Need& n : needs(acts[next[ri] + k], r)) {
            const auto it = done.find(n.what);
            if (it == done.end()) {
              ready = false;
              break;
            }
            start = std::max(start, it->second + (n.across ? costs.comm : 0));
          }
        }
        if (!ready) break;
        double end = start;
        for (size_t k = 0; k < count; ++k) {
          const PipeAction& a = acts[next[ri] + k];
          const double scale = costs.stage_scale.empty() ? 1.0 : costs.stage_scale.at(static_cast<size_t>(a.stage));
          const double begin = end;
          end += cost_of(a.op, costs) * scale;
          if (a.is_compute()) {
            result.busy[ri] += end - begin;
            result.spans[ri].push_back({a, begin, end});
            // Activations live from a forward until the backward that frees them (B, or W when split).
            if (a.op == PipeOp::kForward) result.peak_activations[ri] = std::max(result.peak_activations[ri], ++live[ri]);
            if (a.op == PipeOp::kBackward || a.op == PipeOp::kWeightGrad) --live[ri];
          }
        }
        for (size_t k = 0; k < count; ++k) {
          const PipeAction& a = acts[next[ri] + k];
          done[key(a.stage, a.op, a.micro)] = end;
          if (a.op == PipeOp::kBackward) done[key(a.stage, PipeOp::kInputGrad, a.micro)] = end;
        }
        free_at[ri] = end;
        next[ri] += count;
        moved = true;
      }
    }
  }
  for (int r = 0; r < ranks; ++r) {
    const size_t ri = static_cast<size_t>(r);
    if (next[ri] >= s.ranks[ri].size()) continue;
    const PipeAction& a = s.ranks[ri][next[ri]];
    std::string waits;
    for (const Need& n : needs(a, r)) {
      if (done.count(n.what)) continue;
      const auto [stage, op, micro] = n.what;
      // A whole-backward schedule's input gradients come from its B.
      const PipeOp named = static_cast<PipeOp>(op) == PipeOp::kInputGrad && !s.split_backward ? PipeOp::kBackward : static_cast<PipeOp>(op);
      waits = PipeAction{stage, named, micro}.text();
      break;
    }
    result.deadlock += (result.deadlock.empty() ? "deadlock: " : "; ") + std::string("rank ") + std::to_string(r) + " waits at " +
                       a.text() + " for " + waits;
  }
  result.makespan = *std::max_element(free_at.begin(), free_at.end());
  double idle = 0;
  for (double b : result.busy) {
    result.idle.push_back(result.makespan - b);
    idle += result.makespan - b;
  }
  result.bubble_fraction = result.makespan > 0 ? idle / (result.makespan * ranks) : 0;
  return result;
}

namespace {

double time_unit(const PipeSimResult& r) {
  double unit = 0;
  for (const auto& spans : r.spans) {
    for (const PipeSpan& s : spans) {
      const double d = s.end - s.start;
      if (d > 0 && (unit == 0 || d < unit)) unit = d;
    }
  }
  return unit > 0 ? unit : 1;
}

std::string op_code(const PipeAction& a) {
  const std::string text = a.text();
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  return text.substr(i, text.find_first_of("0123456789", i) - i);
}

}  // namespace

std::string render_text(const PipelineSchedule& s, const PipeSimResult& r) {
  const double unit = time_unit(r);
  const int cells = static_cast<int>(std::ceil(r.makespan / unit - 1e-9));
  std::string out;
  for (int rank = 0; rank < s.pp; ++rank) {
    std::vector<std::string> row(static_cast<size_t>(cells), " . ");
    for (const PipeSpan& span : r.spans[static_cast<size_t>(rank)]) {
      const int first = static_cast<int>(std::lround(span.start / unit));
      const int last = std::max(first + 1, static_cast<int>(std::lround(span.end / unit)));
      char cell[8];
      std::snprintf(cell, sizeof(cell), "%s%-2d", op_code(span.action).c_str(), span.action.micro % 100);
      for (int c = first; c < last && c < cells; ++c) row[static_cast<size_t>(c)] = std::string(cell).substr(0, 3);
    }
    char head[16];
    std::snprintf(head, sizeof(head), "rank %-2d|", rank);
    out += head;
    for (const auto& c : row) out += c;
    out += "|\n";
  }
  return out;
}

std::string render_svg(const PipelineSchedule& s, const PipeSimResult& r) {
  const double unit = time_unit(r);
  const double cell = 22, row_height = 26, left = 64, top = 30;
  const double width = left + r.makespan / unit * cell + 10, height = top + s.pp * row_height + 30;
  char buf[512];
  std::string out;
  std::snprintf(buf, sizeof(buf),
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"monospace\" font-size=\"10\">\n"
                "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                "<text x=\"4\" y=\"16\" font-size=\"12\">%s, pp %d, v %d, %d micro-batches: bubble %.1f%%</text>\n",
                width, height, s.name.c_str(), s.pp, s.v, s.micro_batches, 100 * r.bubble_fraction);
  out += buf;
  for (int rank = 0; rank < s.pp; ++rank) {
    const double y = top + rank * row_height;
    std::snprintf(buf, sizeof(buf), "<text x=\"4\" y=\"%.0f\">rank %d</text>\n", y + 16, rank);
    out += buf;
    for (const PipeSpan& span : r.spans[static_cast<size_t>(rank)]) {
      const std::string op = op_code(span.action);
      const char* fill = op == "F" ? "#6fa8dc" : op == "W" ? "#f6b26b" : "#93c47d";
      const double x = left + span.start / unit * cell, w = (span.end - span.start) / unit * cell;
      std::snprintf(buf, sizeof(buf),
                    "<rect x=\"%.1f\" y=\"%.0f\" width=\"%.1f\" height=\"%.0f\" fill=\"%s\" stroke=\"#333\" stroke-width=\"0.5\">"
                    "<title>%s</title></rect><text x=\"%.1f\" y=\"%.0f\">%s%d</text>\n",
                    x, y, w, row_height - 4, fill, span.action.text().c_str(), x + 2, y + 15, op.c_str(), span.action.micro);
      out += buf;
    }
  }
  std::snprintf(buf, sizeof(buf), "<text x=\"4\" y=\"%.0f\">F forward, B/I backward (input gradient), W weight gradient; one cell = %.3g</text>\n",
                top + s.pp * row_height + 18, unit);
  out += buf;
  out += "</svg>\n";
  return out;
}

}  // namespace fmoe::plan

// Pipeline schedules as data: every generator over a grid of (pp, v,
// micro-batches) is valid before and after lowering and simulates without a
// deadlock; on unit costs the simulated bubble equals each schedule's formula;
// invalid combinations are refused in one line; the validator and the
// simulator name what is wrong; golden CSVs pin a few schedules exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

#include "parallel/pipeline_schedule.h"
#include "plan/pipeline_sim.h"

namespace {

using namespace fmoe::parallel;
using namespace fmoe::plan;

// F = I = W = 1 per stage; a chunk of v costs 1 / v of that.
PipeCosts unit_costs(int v) {
  PipeCosts c;
  c.forward = c.input_grad = c.weight_grad = 1.0 / v;
  c.backward = 2.0 / v;
  return c;
}

// The bubble each rank sees, by the schedule's formula (F = I = W = 1, B = I + W).
double formula(const std::string& name, int pp, int v, int m) {
  const double f = 1, b = 2, w = 1;
  if (name == "interleaved") return (pp - 1) * (f + b) / v;
  // DeepSeek's table with PP = 2 pp stages of half a rank's work each (a chunk's
  // F, I, W cost 1 / v = 1/2) and F&B = F + B (they run in turn here).
  if (name == "dualpipev") return (pp - 1) * ((f + b) / v + b / v - 3 * w / v);
  if (name == "zbh1" && m >= pp) return (pp - 1) * (f + b - 2 * w);
  return (pp - 1) * (f + b);
}

TEST(PipelineSchedule, EveryGeneratorOverTheGridIsValidAndMeetsItsFormula) {
  int valid = 0, refused = 0;
  for (const std::string name : {"gpipe", "1f1b", "interleaved", "zbh1", "dualpipev"}) {
    for (int pp : {2, 3, 4, 8}) {
      for (int v : {1, 2}) {
        for (int m = pp - 1; m <= 4 * pp; ++m) {
          const std::string where = name + " pp" + std::to_string(pp) + " v" + std::to_string(v) + " m" + std::to_string(m);
          PipelineSchedule s;
          try {
            s = make_schedule(name, pp, v, m);
          } catch (const std::invalid_argument& e) {
            const std::string what = e.what();
            EXPECT_EQ(what.find('\n'), std::string::npos) << where;
            EXPECT_NE(what.find(name), std::string::npos) << what;
            ++refused;
            continue;
          }
          ++valid;
          ASSERT_EQ(validate(s), "") << where;
          const PipelineSchedule lowered = lower(s);
          ASSERT_EQ(validate(lowered), "") << where << " lowered";
          ASSERT_EQ(check_p2p_groups(lowered, p2p_groups(lowered)), "") << where;  // runs over NCCL
          for (const PipelineSchedule* schedule : {static_cast<const PipelineSchedule*>(&s), &lowered}) {
            const PipeSimResult r = simulate(*schedule, unit_costs(v));
            ASSERT_EQ(r.deadlock, "") << where;
            const double expected = formula(name, pp, v, m);
            for (int rank = 0; rank < pp; ++rank) {
              if (name == "zbh1" && m < pp) {
                EXPECT_LE(r.idle[static_cast<size_t>(rank)], expected + 1e-9) << where;  // never worse than 1F1B
              } else {
                EXPECT_NEAR(r.idle[static_cast<size_t>(rank)], expected, 1e-9) << where << " rank " << rank;
              }
            }
          }
        }
      }
    }
  }
  // gpipe, 1f1b and zbh1 at v 1 for every m (3 pp + 2 values each); interleaved
  // at v 2 for m = pp, 2 pp, 3 pp, 4 pp; dualpipev at v 2 for m = 2 pp .. 4 pp.
  EXPECT_EQ(valid, 3 * (8 + 11 + 14 + 26) + 4 * 4 + (5 + 7 + 9 + 17));
  EXPECT_GT(refused, 0);
}

TEST(PipelineSchedule, InvalidCombinationsAreRefusedInOneLine) {
  const auto message = [](const std::string& name, int pp, int v, int m) {
    try {
      make_schedule(name, pp, v, m);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(message("1f1b", 4, 2, 8), "pipeline schedule 1f1b (pp 4, v 2, 8 micro-batches): 1f1b runs one chunk per rank (v 1); interleaved runs several");
  EXPECT_EQ(message("interleaved", 4, 2, 6),
            "pipeline schedule interleaved (pp 4, v 2, 6 micro-batches): interleaved needs micro-batches in whole groups of pp (a multiple of 4)");
  EXPECT_EQ(message("interleaved", 4, 1, 8), "pipeline schedule interleaved (pp 4, v 1, 8 micro-batches): interleaved needs v >= 2 chunks per rank (parallel.virtual_pp)");
  EXPECT_EQ(message("dualpipe", 4, 1, 8), "pipeline schedule: unknown name 'dualpipe' (gpipe, 1f1b, interleaved, zbh1, dualpipev)");
  EXPECT_EQ(message("dualpipev", 4, 1, 8),
            "pipeline schedule dualpipev (pp 4, v 1, 8 micro-batches): dualpipev runs two chunks per rank in a V (parallel.virtual_pp 2)");
  EXPECT_EQ(message("dualpipev", 4, 2, 7), "pipeline schedule dualpipev (pp 4, v 2, 7 micro-batches): dualpipev needs at least 2 pp = 8 micro-batches");
  EXPECT_EQ(message("1f1b", 0, 1, 8), "pipeline schedule 1f1b (pp 0, v 1, 8 micro-batches): pp, v and micro-batches must be >= 1");
}

TEST(PipelineSchedule, ActionsPrintAndParse) {
  for (const std::string text : {"2F0", "1I3", "0W3", "12B7", "1SF2", "3RF0", "0SB11", "4RB1", "2F0&"}) {
    const auto a = parse_action(text);
    ASSERT_TRUE(a.has_value()) << text;
    EXPECT_EQ(a->text(), text);
  }
  EXPECT_EQ(parse_action("1I3")->op, PipeOp::kInputGrad);
  EXPECT_EQ(parse_action("12B7")->stage, 12);
  EXPECT_EQ(parse_action("12B7")->micro, 7);
  EXPECT_TRUE(parse_action("2F0&")->overlapped);
  EXPECT_FALSE(parse_action("2F0")->overlapped);
  for (const std::string bad : {"", "F0", "1X2", "1F", "1F2x", "-1F2", "1f2", "1B2&", "1F2&&"}) EXPECT_FALSE(parse_action(bad).has_value()) << bad;
}

TEST(PipelineSchedule, OneFOneBHandComputedAndItsLowering) {
  const PipelineSchedule s = make_schedule("1f1b", 2, 1, 3);
  EXPECT_EQ(s.csv(0), "index,action\n0,0F0\n1,0F1\n2,0B0\n3,0F2\n4,0B1\n5,0B2\n");
  EXPECT_EQ(s.csv(1), "index,action\n0,1F0\n1,1B0\n2,1F1\n3,1B1\n4,1F2\n5,1B2\n");
  const PipelineSchedule l = lower(s);
  EXPECT_EQ(l.csv(0), "index,action\n0,0F0\n1,0SF0\n2,0F1\n3,0SF1\n4,0RB0\n5,0B0\n6,0F2\n7,0SF2\n8,0RB1\n9,0B1\n10,0RB2\n11,0B2\n");
  EXPECT_EQ(l.csv(1), "index,action\n0,1RF0\n1,1F0\n2,1B0\n3,1SB0\n4,1RF1\n5,1F1\n6,1B1\n7,1SB1\n8,1RF2\n9,1F2\n10,1B2\n11,1SB2\n");
}

// "at:actions | at:actions" for one rank's groups.
std::string groups_text(const PipelineSchedule& s, const std::vector<std::vector<P2PGroup>>& groups, int rank) {
  std::string text;
  for (const P2PGroup& g : groups[static_cast<size_t>(rank)]) {
    if (!text.empty()) text += " | ";
    text += std::to_string(g.at) + ":";
    for (size_t k = 0; k < g.actions.size(); ++k) {
      if (k > 0) text += ' ';
      text += s.ranks[static_cast<size_t>(rank)][g.actions[k]].text();
    }
  }
  return text;
}

// Grouped point-to-point (NCCL): each run of sends and receives between two
// computes goes out as one group, receives first; Megatron's
// send-forward-receive-backward pairs fall out of 1F1B's lowering.
TEST(PipelineSchedule, PointToPointGroupsOfOneFOneB) {
  const PipelineSchedule l = lower(make_schedule("1f1b", 2, 1, 3));
  const std::vector<std::vector<P2PGroup>> all = p2p_groups(l);
  EXPECT_EQ(groups_text(l, all, 0), "1:0SF0 | 3:0RB0 0SF1 | 7:0RB1 0SF2 | 10:0RB2");
  EXPECT_EQ(groups_text(l, all, 1), "0:1RF0 | 3:1RF1 1SB0 | 7:1RF2 1SB1 | 11:1SB2");
  EXPECT_EQ(check_p2p_groups(l, all), "");
  EXPECT_THROW(p2p_groups(make_schedule("1f1b", 2, 1, 3)), std::invalid_argument);
}

// A receive from a peer brings along the receives of what that peer sends
// before it, so that messages match in issue order.
TEST(PipelineSchedule, PointToPointGroupsReceiveInTheSendersOrder) {
  PipelineSchedule s;
  s.name = "custom", s.pp = 2, s.v = 1, s.micro_batches = 2, s.stage_rank = {0, 1}, s.lowered = true;
  const auto list = [](std::initializer_list<const char*> texts) {
    std::vector<PipeAction> out;
    for (const char* t : texts) out.push_back(*parse_action(t));
    return out;
  };
  s.ranks = {list({"0F0", "0SF0", "0F1", "0SF1", "0RB1", "0B1", "0RB0", "0B0"}),
             list({"1RF0", "1F0", "1B0", "1SB0", "1RF1", "1F1", "1B1", "1SB1"})};
  ASSERT_EQ(validate(s), "");
  EXPECT_EQ(groups_text(s, p2p_groups(s), 0), "1:0SF0 | 3:0RB0 0RB1 0SF1");
  EXPECT_EQ(check_p2p_groups(s, p2p_groups(s)), "");
}

// Sends that complete only once received, on one stream: rank 0 sends F1, then
// computes F2, then waits for B0; rank 1 sends B0 before it takes F1. Its runs as
// groups would hang (non-blocking MPI sends would not), and the check says
// where; moving rank 0's sends F1 and then F2 one group on ends the wait.
TEST(PipelineSchedule, PointToPointGroupsNameADeadlock) {
  PipelineSchedule s;
  s.name = "custom", s.pp = 2, s.v = 1, s.micro_batches = 3, s.stage_rank = {0, 1}, s.lowered = true, s.split_backward = true;
  const auto list = [](std::initializer_list<const char*> texts) {
    std::vector<PipeAction> out;
    for (const char* t : texts) out.push_back(*parse_action(t));
    return out;
  };
  s.ranks = {list({"0F0", "0SF0", "0F1", "0SF1", "0F2", "0SF2", "0RB0", "0B0", "0RB1", "0B1", "0RB2", "0B2"}),
             list({"1RF0", "1F0", "1I0", "1SB0", "1W0", "1RF1", "1F1", "1I1", "1SB1", "1W1", "1RF2", "1F2", "1I2", "1SB2", "1W2"})};
  ASSERT_EQ(validate(s), "");
  EXPECT_EQ(check_p2p_groups(s, p2p_groups(s, /*delay_sends=*/false)), "grouped point-to-point deadlocks: rank 0 waits in [0SF1]; rank 1 waits in [1SB0]");
  const std::vector<std::vector<P2PGroup>> moved = p2p_groups(s);
  EXPECT_EQ(groups_text(s, moved, 0), "1:0SF0 | 5:0RB0 0SF1 | 8:0RB1 0SF2 | 10:0RB2");
  EXPECT_EQ(groups_text(s, moved, 1), "0:1RF0 | 3:1SB0 | 5:1RF1 | 8:1SB1 | 10:1RF2 | 13:1SB2");
  EXPECT_EQ(check_p2p_groups(s, moved), "");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(PipelineSchedule, GoldenCsvs) {
  const std::string dir = std::string(FMOE_SOURCE_DIR) + "/tests/parallel/golden/";
  for (const auto& [name, pp, v, m] : {std::tuple<std::string, int, int, int>{"interleaved", 2, 2, 4}, {"zbh1", 3, 1, 4}, {"gpipe", 2, 1, 2},
                                     {"dualpipev", 2, 2, 4}, {"dualpipev", 4, 2, 10}}) {
    const PipelineSchedule s = make_schedule(name, pp, v, m);
    for (int r = 0; r < pp; ++r) {
      const std::string file = name + "_pp" + std::to_string(pp) + "_v" + std::to_string(v) + "_m" + std::to_string(m) + "_rank" + std::to_string(r) + ".csv";
      EXPECT_EQ(s.csv(r), read_file(dir + file)) << file;
    }
  }
}

TEST(PipelineSchedule, PeakActivationsFollowTheSchedule) {
  const PipeSimResult one = simulate(make_schedule("1f1b", 4, 1, 8), unit_costs(1));
  EXPECT_EQ(one.peak_activations, (std::vector<int>{4, 3, 2, 1}));  // pp - r on rank r
  const PipeSimResult all = simulate(make_schedule("gpipe", 4, 1, 8), unit_costs(1));
  EXPECT_EQ(all.peak_activations, (std::vector<int>{8, 8, 8, 8}));
  // Interleaved: (pp - r - 1) x 2 + (v - 1) x pp warm-up chunk forwards, plus the one in flight.
  const PipeSimResult inter = simulate(make_schedule("interleaved", 4, 2, 8), unit_costs(2));
  EXPECT_EQ(inter.peak_activations, (std::vector<int>{11, 9, 7, 5}));
}

TEST(PipelineSchedule, DualPipeVHoldsAVOfStagesAndDeepSeeksMemory) {
  const PipelineSchedule s = make_schedule("dualpipev", 4, 2, 10);
  EXPECT_EQ(s.stage_rank, (std::vector<int>{0, 1, 2, 3, 3, 2, 1, 0}));  // the head's stage on rank 0 beside the embedding
  // DeepSeek's table: PP + 1 = 2 pp + 1 chunks' activations per device.
  EXPECT_EQ(simulate(s, unit_costs(2)).peak_activations, (std::vector<int>{9, 9, 9, 9}));
  // The turn of the V stays on the last rank: nothing crosses between stages 3 and 4.
  const PipelineSchedule l = lower(s);
  for (const PipeAction& a : l.ranks[3]) EXPECT_TRUE(a.is_compute() ? true : (a.stage != 3 || a.op != PipeOp::kSendForward)) << a.text();
  // The overlapped pairs keep their receives before and their sends after them
  // (on a middle rank every stage's neighbours live elsewhere).
  const auto& r1 = l.ranks[1];
  int pairs = 0;
  for (size_t i = 2; i + 3 < r1.size(); ++i) {
    if (!r1[i].overlapped) continue;
    ++pairs;
    const PipeAction &f = r1[i], &b = r1[i + 1];
    EXPECT_EQ(b.op, PipeOp::kBackward);
    EXPECT_EQ(r1[i - 2], (PipeAction{f.stage, PipeOp::kRecvForward, f.micro}));
    EXPECT_EQ(r1[i - 1], (PipeAction{b.stage, PipeOp::kRecvBackward, b.micro}));
    EXPECT_EQ(r1[i + 2], (PipeAction{f.stage, PipeOp::kSendForward, f.micro}));
    EXPECT_EQ(r1[i + 3], (PipeAction{b.stage, PipeOp::kSendBackward, b.micro}));
  }
  EXPECT_EQ(pairs, 2 * (10 - 8 + 1 + 1) + 2);  // phase 4: two per round; phase 5: one per round
}

// Which gradients each kind of action gives: 1 those of weights that do not defer
// to W (norms, the embedding), 2 those that do.
int contributes(PipeOp op) { return op == PipeOp::kBackward ? 3 : op == PipeOp::kInputGrad ? 1 : op == PipeOp::kWeightGrad ? 2 : 0; }

TEST(PipelineSchedule, TheLastGradientActionsOfEachStageAreMarked) {
  EXPECT_EQ(last_gradient_actions(make_schedule("1f1b", 1, 1, 3), 0), (std::vector<bool>{false, false, false, false, false, true}));
  int checked = 0;
  for (const std::string name : {"gpipe", "1f1b", "interleaved", "zbh1", "dualpipev"}) {
    for (int pp : {2, 4}) {
      const int v = name == "interleaved" || name == "dualpipev" ? 2 : 1;
      for (int m : {2 * pp, 3 * pp}) {
        const PipelineSchedule s = lower(make_schedule(name, pp, v, m));
        for (int r = 0; r < pp; ++r) {
          const std::vector<PipeAction>& actions = s.ranks[static_cast<size_t>(r)];
          const std::vector<bool> last = last_gradient_actions(s, r);
          ASSERT_EQ(last.size(), actions.size());
          std::map<int, int> covered;  // stage -> the kinds of gradient its marked actions give, together
          for (size_t i = 0; i < actions.size(); ++i) {
            const int mine = contributes(actions[i].op);
            if (mine == 0) {
              EXPECT_FALSE(last[i]) << actions[i].text();
              continue;
            }
            // Marked exactly when no later action on the stage gives any of the same gradients.
            bool later = false;
            for (size_t j = i + 1; j < actions.size(); ++j) later |= actions[j].stage == actions[i].stage && (contributes(actions[j].op) & mine);
            EXPECT_EQ(last[i], !later) << name << " pp" << pp << " m" << m << " rank " << r << " " << actions[i].text();
            if (last[i]) covered[actions[i].stage] |= mine;
            ++checked;
          }
          // Every stage of the rank has a marked action; without mixed whole and
          // split backwards, the marked ones give both kinds of gradient.
          EXPECT_EQ(static_cast<int>(covered.size()), v) << name << " rank " << r;
          if (name != "dualpipev") {
            for (const auto& [stage, kinds] : covered) EXPECT_EQ(kinds, 3) << name << " stage " << stage;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 800);  // the grid ran (854 gradient actions)
}

TEST(PipelineSchedule, ValidatorNamesTheFirstProblem) {
  PipelineSchedule s = make_schedule("1f1b", 2, 1, 2);
  PipelineSchedule missing = s;
  missing.ranks[1].pop_back();
  EXPECT_EQ(validate(missing), "1B1 is missing");
  PipelineSchedule wrong_rank = s;
  wrong_rank.ranks[0][0].stage = 1;
  EXPECT_EQ(validate(wrong_rank), "rank 0 action 0 (1F0): stage 1 lives on rank 1");
  PipelineSchedule reversed = s;
  std::swap(reversed.ranks[1][0], reversed.ranks[1][1]);  // 1B0 before 1F0
  EXPECT_EQ(validate(reversed), "1B0 runs before the step it depends on (F before I before W)");
  PipelineSchedule repeated = s;
  repeated.ranks[0].push_back(repeated.ranks[0][0]);
  EXPECT_EQ(validate(repeated), "rank 0 action 4 (0F0): repeated");
  PipelineSchedule unmatched = lower(s);
  unmatched.ranks[1].erase(unmatched.ranks[1].begin());  // rank 1's receive of 0F0's activation
  EXPECT_EQ(validate(unmatched), "0SF0 has no matching receive on rank 1");
  PipelineSchedule split = s;
  split.ranks[0][2].op = PipeOp::kInputGrad;  // 0B0 -> 0I0 in a whole-backward schedule
  EXPECT_EQ(validate(split), "rank 0 action 2 (0I0): a split backward in a whole-backward schedule");
  split.split_backward = true;
  EXPECT_EQ(validate(split), "0W0 is missing");
  split.ranks[0].push_back({0, PipeOp::kBackward, 0});
  EXPECT_EQ(validate(split), "0B0 beside 0I0: a backward runs whole or split, not both");
  PipelineSchedule overlapped = s;
  overlapped.ranks[0][1].overlapped = true;  // 0F1& followed by 0B0: fine
  EXPECT_EQ(validate(overlapped), "");
  overlapped.ranks[0][0].overlapped = true;  // 0F0& followed by 0F1&
  EXPECT_EQ(validate(overlapped), "rank 0 action 0 (0F0&): an overlapped forward must be followed by a whole backward");
}

TEST(PipelineSchedule, SimulatorNamesADeadlock) {
  // Valid per stage, but the ranks wait on each other: rank 0 wants 1B0 first,
  // rank 1 starts with micro-batch 1, which rank 0 has not forwarded yet.
  PipelineSchedule s = make_schedule("gpipe", 2, 1, 2);
  s.ranks[0] = {{0, PipeOp::kForward, 0}, {0, PipeOp::kBackward, 0}, {0, PipeOp::kForward, 1}, {0, PipeOp::kBackward, 1}};
  s.ranks[1] = {{1, PipeOp::kForward, 1}, {1, PipeOp::kBackward, 1}, {1, PipeOp::kForward, 0}, {1, PipeOp::kBackward, 0}};
  EXPECT_EQ(validate(s), "");
  const PipeSimResult r = simulate(s, unit_costs(1));
  EXPECT_EQ(r.deadlock, "deadlock: rank 0 waits at 0B0 for 1B0; rank 1 waits at 1F1 for 0F1");
  EXPECT_EQ(simulate(lower(s), unit_costs(1)).deadlock, "deadlock: rank 0 waits at 0RB0 for 1SB0; rank 1 waits at 1RF1 for 0SF1");
}

TEST(PipelineSchedule, CommunicationTimeLengthensTheCriticalPath) {
  PipeCosts c = unit_costs(1);
  c.comm = 0.5;
  // 1F1B pp2, one micro-batch: F, send, F, B, send, B: 1 + 0.5 + 1 + 2 + 0.5 + 2.
  EXPECT_DOUBLE_EQ(simulate(lower(make_schedule("1f1b", 2, 1, 1)), c).makespan, 7.0);
  EXPECT_DOUBLE_EQ(simulate(make_schedule("1f1b", 2, 1, 1), c).makespan, 7.0);
}

TEST(PipelineSchedule, StagesCanCostDifferently) {
  // Stage 1 twice as costly: F 1 | F 2, B 4 | B 2 on one micro-batch: 1 + 2 + 4 + 2.
  PipeCosts c = unit_costs(1);
  c.stage_scale = {1.0, 2.0};
  const PipeSimResult r = simulate(make_schedule("1f1b", 2, 1, 1), c);
  EXPECT_DOUBLE_EQ(r.makespan, 9.0);
  EXPECT_EQ(r.busy, (std::vector<double>{3.0, 6.0}));
}

TEST(PipelineSchedule, TimelineRendersAsTextAndSvg) {
  const PipelineSchedule s = make_schedule("1f1b", 2, 1, 2);
  const PipeSimResult r = simulate(s, unit_costs(1));
  // Unit = the forward: F takes one cell, B two. Rank 0 waits two units for
  // rank 1's first backward and one for its second; rank 1 one unit at each end.
  EXPECT_EQ(render_text(s, r), "rank 0 |F0 F1  .  . B0 B0  . B1 B1 |\n"
                               "rank 1 | . F0 B0 B0 F1 B1 B1  .  . |\n");
  const std::string svg = render_svg(s, r);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("1f1b, pp 2, v 1, 2 micro-batches: bubble 33.3%"), std::string::npos);
  EXPECT_NE(svg.find("<title>1B1</title>"), std::string::npos);
}

}  // namespace

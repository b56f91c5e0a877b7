// Pipeline schedules as data. A schedule is, for every pipeline rank, the
// ordered list of actions that rank runs: a forward (F), a whole backward (B),
// or a backward split into its input-gradient (I) and weight-gradient (W)
// halves, of one micro-batch on one stage; lowering adds the point-to-point
// actions (SF/RF: send/receive a forward activation, SB/RB: a gradient).
// Generators are pure functions of (pp, v, micro-batches); the validator checks
// any list; the simulator (pipeline_sim.h) runs all ranks' lists in lockstep.
//
// Stages are global: with v chunks per rank there are pp x v of them, stage s
// of chunk c on rank r being s = c x pp + r (the interleaved "loop" placement).
// Text form of an action: stage, code, micro-batch: "2F0", "1I3", "0W3", "1SF2";
// "2F0&" for a forward overlapped with the backward that follows it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fmoe::parallel {

enum class PipeOp : uint8_t { kForward, kBackward, kInputGrad, kWeightGrad, kSendForward, kRecvForward, kSendBackward, kRecvBackward };

struct PipeAction {
  int stage = 0;
  PipeOp op = PipeOp::kForward;
  int micro = 0;
  // A forward run together with the rank's next action, a whole backward, as one
  // overlapped F&B chunk (DualPipe's pairs): both start when both have their
  // inputs, and both outputs leave when the pair ends. Text form "2F0&".
  bool overlapped = false;
  std::string text() const;
  bool is_compute() const { return op == PipeOp::kForward || op == PipeOp::kBackward || op == PipeOp::kInputGrad || op == PipeOp::kWeightGrad; }
  bool operator==(const PipeAction& o) const { return stage == o.stage && op == o.op && micro == o.micro && overlapped == o.overlapped; }
};

// "2F0" -> {2, F, 0}, "2F0&" -> {2, F, 0, overlapped}; nullopt for anything else.
std::optional<PipeAction> parse_action(const std::string& text);

struct PipelineSchedule {
  std::string name;              // gpipe | 1f1b | interleaved | zbh1 | dualpipev
  int pp = 1, v = 1, micro_batches = 1;
  std::vector<int> stage_rank;   // the rank holding each of the pp x v stages
  std::vector<std::vector<PipeAction>> ranks;  // each rank's actions, in order
  bool split_backward = false;   // I and W instead of B (DualPipeV mixes both)
  bool lowered = false;          // send/receive actions present
  int num_stages() const { return static_cast<int>(stage_rank.size()); }
  // "index,action" rows, one per action of rank r (with a header line).
  std::string csv(int rank) const;
};

// The schedule names make_schedule knows, for messages.
inline constexpr const char* kScheduleNames = "gpipe, 1f1b, interleaved, zbh1, dualpipev";

// Which rank holds each of the pp x v stages under a schedule: the loop
// placement (stage c x pp + r on rank r), or for dualpipev the V (stage r and
// stage 2 pp - 1 - r on rank r).
std::vector<int> stage_placement(const std::string& name, int pp, int v);

// Throws std::invalid_argument with one line naming what is wrong (an unknown
// name; v other than 1 for gpipe, 1f1b and zbh1; v < 2 for interleaved, or
// micro-batches not a multiple of pp there; v other than 2 or fewer than 2 pp
// micro-batches for dualpipev; pp or micro-batches < 1).
//   gpipe: every forward, then every backward.
//   1f1b: pp - 1 - r warm-up forwards on rank r, then one forward, one backward.
//   interleaved: Megatron's interleaved 1F1B over v chunks per rank, micro-batches
//     in groups of pp; bubble (pp - 1)(F + B) / v.
//   zbh1: zero-bubble ZB-H1: backwards split into I and W; a rank runs an input
//     gradient as soon as it can (it is on the critical path), keeps up to r
//     weight gradients deferred to fill the waits, and a forward when fewer than
//     2 pp - r micro-batches hold activations; bubble (pp - 1)(F + I - W) when
//     micro-batches >= pp.
//   dualpipev: DeepSeek's DualPipeV, v 2 chunks per rank in a V (see
//     stage_placement), at least 2 pp micro-batches; backwards whole or split;
//     bubble (pp - 1)(F&B + B - 3W) by DeepSeek's table, F&B the time of a
//     forward and a backward run together (here F + B: they run in turn).
PipelineSchedule make_schedule(const std::string& name, int pp, int v, int micro_batches);

// The same schedule with the point-to-point actions added: after a forward
// whose next stage lives on another rank, a send; before the forward that
// consumes it, the matching receive (and the same for backward gradients).
// Sends are non-blocking, so the receive orders follow the compute orders and
// cannot deadlock. An overlapped pair gets both receives before it and both
// sends after it.
PipelineSchedule lower(const PipelineSchedule& schedule);

// Empty when valid, else one line naming the first problem: every micro-batch
// runs F once and its backward (B, or I and W) once per stage, on the rank that
// holds the stage, F before I before W, an overlapped forward directly followed
// by a whole backward; with lowering, every send has exactly
// one matching receive on the next (or previous) stage's rank.
std::string validate(const PipelineSchedule& schedule);

// `rank`'s receives of a lowered schedule, per sending rank, as action indices
// in the order that rank sends them (messages between two ranks match in issue
// order under NCCL, so receives are posted in this order). Throws
// std::invalid_argument for a receive that no send matches.
std::vector<std::vector<size_t>> receives_by_sender(const PipelineSchedule& lowered, int rank);

// Point-to-point in groups, as NCCL runs it: messages between two ranks match
// in the order they are issued (not by tag), the operations of a communicator
// run one after another on one stream, and a send completes only once its
// receive is posted. So a rank issues its sends and receives in groups that
// progress together, and waits for each group whole before it goes on. A group
// starts as a run of send/receive actions between two compute actions (the
// sends of what the compute before made, the receives of what the compute after
// needs) and goes out where the run begins. Each receive from a peer brings
// along, into its group, the receives of every message that peer sends earlier
// and this rank has not yet received. Where the groups would wait on each other
// in a cycle (interleaved schedules), a send whose receive is not yet posted
// moves to the rank's next group, with the later sends to the same peer, until
// none does. In a group the receives come first, in their senders' order, then
// the sends, in action order.
struct P2PGroup {
  size_t at = 0;                // the action index where the group goes out (its run's first)
  std::vector<size_t> actions;  // indices of the sends and receives it carries
};

// Every rank's groups of a lowered schedule; without delay_sends, the runs as
// they stand (with the receives brought along). Throws std::invalid_argument
// naming the ranks' waiting groups when no moving of sends ends the waits.
std::vector<std::vector<P2PGroup>> p2p_groups(const PipelineSchedule& lowered, bool delay_sends = true);

// Empty when every rank's groups run to the end with each group completing only
// when its peers have posted every matching operation; else one line naming,
// for each rank, the group it waits in.
std::string check_p2p_groups(const PipelineSchedule& lowered, const std::vector<std::vector<P2PGroup>>& groups);

// For each action of `rank`'s list: whether the gradients it produces are the
// last contributions of the step to its stage's parameters, so that their
// data-parallel reductions may start during it. A whole backward (B) gives every
// parameter's gradient, an input-gradient half (I) only those of the weights
// that do not defer to W (norms, the embedding), W the rest: a B is final with
// no later B, I or W on its stage, an I with no later B or I, a W with no later
// B or W (DualPipeV mixes whole and split backwards on one stage).
std::vector<bool> last_gradient_actions(const PipelineSchedule& schedule, int rank);

}  // namespace fmoe::parallel

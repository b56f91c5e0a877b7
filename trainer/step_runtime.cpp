#include "trainer/step_runtime.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>

#include "common/timing.h"
#include "moe/weight_grad.h"

namespace fmoe::trainer {
namespace {

using common::seconds_since;

// [cross-entropy, aux, z, MTP depth 1..D] of one stage's forward (zeros for what it does not hold).
at::Tensor stage_losses(const moe::StageOutput& out, const at::Tensor& zero, int64_t mtp_depth) {
  const at::Tensor main = at::stack({out.ce_loss.defined() ? out.ce_loss.detach() : zero, out.aux_loss.detach(), out.z_loss.detach()});
  const at::Tensor mtp = out.mtp_losses.defined() ? out.mtp_losses.detach() : zero.expand({mtp_depth});
  return at::cat({main, mtp}).to(at::kDouble);
}

}  // namespace

// One worker thread, on communication lane 1, with the device of the step: start()
// hands it a job, wait() blocks until the job is done and rethrows what it threw.
class OverlapThread {
 public:
  explicit OverlapThread(c10::Device device) : thread_([this, device] { loop(device); }) {}
  ~OverlapThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    ready_.notify_all();
    thread_.join();
  }
  void start(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = std::move(job);
      done_ = false;
      error_ = nullptr;
    }
    ready_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  void loop(c10::Device device) {
    const parallel::CommLane lane(1);
    std::optional<c10::DeviceGuard> on_device;
    if (!device.is_cpu()) on_device.emplace(device);
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stop_ || job_; });
        if (stop_) return;
        job = std::move(job_);
        job_ = nullptr;
      }
      std::exception_ptr error;
      try {
        job();
      } catch (...) {
        error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = error;
        done_ = true;
      }
      ready_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable ready_;
  std::function<void()> job_;
  bool done_ = true, stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: it starts once the rest is made
};

StepRuntime::StepRuntime(moe::MoEModel& model, parallel::PipelineSchedule schedule, PipelineContext pipeline)
    : model_(model), schedule_(std::move(schedule)), pipeline_(std::move(pipeline)) {
  if (schedule_.pp != 1 && !pipeline_.pp) throw std::invalid_argument("step runtime: a pipelined schedule needs the pipeline group");
  if (schedule_.pp > 1 && !schedule_.lowered) schedule_ = parallel::lower(schedule_);
  if (const std::string error = parallel::validate(schedule_); !error.empty()) throw std::invalid_argument("step schedule: " + error);
  if (schedule_.pp == 1) return;
  if (pipeline_.fb_overlap) overlap_ = std::make_shared<OverlapThread>(pipeline_.device);
  if (pipeline_.grouped_p2p) {
    groups_ = parallel::p2p_groups(schedule_)[static_cast<size_t>(pipeline_.pp->rank())];
    for (size_t g = 0; g < groups_.size(); ++g) group_at_[groups_[g].at] = g;
    return;
  }
  // Where each receive is posted: when the compute action before it starts.
  const std::vector<parallel::PipeAction>& actions = schedule_.ranks[static_cast<size_t>(pipeline_.pp->rank())];
  post_at_.resize(actions.size());
  for (size_t i = 0, last_compute = 0; i < actions.size(); ++i) {
    const parallel::PipeOp op = actions[i].op;
    if (op == parallel::PipeOp::kRecvForward || op == parallel::PipeOp::kRecvBackward) post_at_[last_compute].push_back(i);
    if (actions[i].is_compute()) last_compute = i;
  }
  // Receives from one peer are posted in the order that peer sends: NCCL (and
  // MPI under FMOE_P2P_ISSUE_ORDER) match a pair of ranks' messages in issue
  // order, not by tag. The schedule names every rank's sends, so each receive's
  // place in its sender's sequence is known here.
  recv_order_ = parallel::receives_by_sender(schedule_, pipeline_.pp->rank());
  recv_peer_.assign(actions.size(), -1);
  recv_place_.assign(actions.size(), 0);
  for (size_t peer = 0; peer < recv_order_.size(); ++peer) {
    for (size_t k = 0; k < recv_order_[peer].size(); ++k) {
      recv_peer_[recv_order_[peer][k]] = static_cast<int>(peer);
      recv_place_[recv_order_[peer][k]] = k;
    }
  }
}

StepTotals StepRuntime::run(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8) {
  if (schedule_.pp > 1) return run_pipelined(hooks, compute_dtype, fp8);
  StepTotals totals;
  const double micro_batches = static_cast<double>(schedule_.micro_batches);
  std::map<int, moe::ModelOutput> in_flight;  // forwarded micro-batches awaiting their backward
  int backwards_left = schedule_.micro_batches;
  for (const parallel::PipeAction& action : schedule_.ranks.front()) {
    switch (action.op) {
      case parallel::PipeOp::kForward: {
        const auto start = std::chrono::steady_clock::now();
        const at::Tensor tokens = hooks.batch(action.micro);
        totals.data_seconds += seconds_since(start);
        const auto compute = std::chrono::steady_clock::now();
        in_flight[action.micro] = model_.forward(tokens, compute_dtype, fp8);
        totals.forward_seconds += seconds_since(compute);
        break;
      }
      case parallel::PipeOp::kBackward: {
        const moe::ModelOutput out = std::move(in_flight.at(action.micro));
        in_flight.erase(action.micro);
        if (hooks.before_backward) hooks.before_backward(--backwards_left == 0);
        const auto compute = std::chrono::steady_clock::now();
        (out.loss / micro_batches).backward();
        totals.backward_seconds += seconds_since(compute);
        const at::Tensor these = at::cat({at::stack({out.ce_loss, out.aux_loss, out.z_loss}), out.mtp_losses}).to(at::kDouble);
        totals.losses = totals.losses.defined() ? totals.losses + these : these;
        break;
      }
      default:
        throw std::logic_error("step runtime: " + action.text() + " in a one-stage schedule");
    }
  }
  return totals;
}

bool StepRuntime::holds_head() const {
  if (schedule_.pp == 1) return true;
  return schedule_.stage_rank.back() == pipeline_.pp->rank();
}

std::vector<at::Tensor> StepRuntime::forward_only(const std::vector<at::Tensor>& batches, at::ScalarType compute_dtype, bool fp8) {
  std::vector<at::Tensor> losses(batches.size());
  if (schedule_.pp == 1) {
    for (size_t i = 0; i < batches.size(); ++i) losses[i] = model_.forward(batches[i], compute_dtype, fp8).ce_loss;
    return losses;
  }
  parallel::Communicator& pp = *pipeline_.pp;
  const int rank = pp.rank(), stages = schedule_.num_stages();
  const int count = static_cast<int>(batches.size());
  const auto rank_of = [&](int stage) { return schedule_.stage_rank[static_cast<size_t>(stage)]; };
  std::vector<int> mine;  // this rank's stages, in order
  for (int s = 0; s < stages; ++s) {
    if (rank_of(s) == rank) mine.push_back(s);
  }
  std::vector<std::pair<std::unique_ptr<parallel::Work>, at::Tensor>> sends;
  // Micro-batches in order, this rank's stages in stage order: activations only
  // ever flow to later stages, so the orders cannot deadlock.
  for (int i = 0; i < count; ++i) {
    const at::Tensor& tokens = batches[static_cast<size_t>(i)];
    const int64_t rows = tokens.size(0) * (tokens.size(1) - 1) / pipeline_.rows_divisor;
    at::Tensor local;  // the previous stage's output when this rank holds it too (the turn of a V)
    for (const int s : mine) {
      const moe::PipelineStage& stage = pipeline_.stages[static_cast<size_t>(s)];
      at::Tensor input;
      if (!stage.embedding && rank_of(s - 1) == rank) {
        input = local;
      } else if (!stage.embedding) {
        input = at::empty({rows, pipeline_.hidden_dim}, at::TensorOptions().dtype(at::kFloat).device(pipeline_.device));
        pp.recv(input, rank_of(s - 1), {(s - 1) * count + i})->wait();
      }
      const moe::StageOutput out = model_.forward_stage(stage, tokens, input, compute_dtype, fp8);
      if (stage.head) {
        losses[static_cast<size_t>(i)] = out.ce_loss;
      } else if (rank_of(s + 1) == rank) {
        local = out.hidden;
      } else {
        const at::Tensor hidden = out.hidden.contiguous();
        std::unique_ptr<parallel::Work> work = pp.send(hidden, rank_of(s + 1), {s * count + i});
        // Over NCCL the next receive would queue behind this send anyway.
        if (pipeline_.grouped_p2p) work->wait();
        sends.emplace_back(std::move(work), hidden);
      }
    }
  }
  for (auto& [work, tensor] : sends) work->wait();
  return losses;
}

// Kept whole (~140 lines): one loop over this rank's actions whose cases share
// the posted receives, the sends in flight and the activations kept for backward.
StepTotals StepRuntime::run_pipelined(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8) {
  parallel::Communicator& pp = *pipeline_.pp;
  const int rank = pp.rank();
  const int micro_batches = schedule_.micro_batches, stages = schedule_.num_stages();
  const auto rank_of = [&](int stage) { return schedule_.stage_rank[static_cast<size_t>(stage)]; };
  // One tag per (sending stage, micro-batch, direction): with pp 2 the previous and next stage are one rank.
  const auto tag = [&](int sending_stage, int micro, int backward) { return (sending_stage * micro_batches + micro) * 2 + backward; };
  const auto buffer = [&] {
    return at::empty({pipeline_.hidden_rows, pipeline_.hidden_dim}, at::TensorOptions().dtype(at::kFloat).device(pipeline_.device));
  };
  struct InFlight {
    at::Tensor input;         // the received hidden state (a leaf whose gradient goes back), or undefined on the first stage
    moe::StageOutput output;
  };
  std::map<std::pair<int, int>, InFlight> in_flight;
  // (stage, micro) -> the activation its forward takes, or the gradient of its
  // output its backward takes: received, or handed over by this rank's own
  // neighbouring stage (the turn of DualPipeV's V).
  std::map<std::pair<int, int>, at::Tensor> received;
  std::map<std::pair<int, int>, moe::WeightGradQueue> deferred;  // split backwards' weight gradients, until their W
  std::vector<std::pair<std::unique_ptr<parallel::Work>, at::Tensor>> sends;  // kept until they complete
  StepTotals totals;
  const at::Tensor zero = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(pipeline_.device));
  const int64_t mtp_depth = model_.config().mtp_depth;
  totals.losses = at::zeros({3 + mtp_depth}, at::TensorOptions().dtype(at::kDouble).device(pipeline_.device));
  // The gradient buckets arm for each stage's last B, I and W: what those produce
  // is final, so the buckets it completes start reducing while backward goes on.
  const std::vector<bool> final_gradients = parallel::last_gradient_actions(schedule_, rank);
  const double scale = 1.0 / micro_batches;

  // A whole backward (B), or its input-gradient half (I) with the weight gradients queued for W.
  const auto backward = [&](const std::pair<int, int>& key, bool split) {
    InFlight& f = in_flight.at(key);
    const moe::StageOutput& out = f.output;
    const auto compute = std::chrono::steady_clock::now();
    {
      std::optional<moe::DeferWeightGrads> defer;
      if (split) defer.emplace(deferred[key]);
      const at::Tensor extra = (out.aux_loss + out.z_loss) * scale;  // this stage's own loss terms
      if (out.ce_loss.defined()) {
        const at::Tensor head_loss = out.mtp_loss.defined() ? out.ce_loss + out.mtp_loss : out.ce_loss;
        (head_loss * scale + extra).backward();
      } else {
        std::vector<at::Tensor> roots{out.hidden}, grads{received.at(key)};
        if (extra.requires_grad()) roots.push_back(extra), grads.push_back(at::ones_like(extra));
        torch::autograd::backward(roots, grads);
        received.erase(key);
      }
    }
    totals.backward_seconds += seconds_since(compute);
    totals.losses += stage_losses(out, zero, mtp_depth);
    f.output = {};  // the stage's activations go back now
    const int s = key.first;
    if (f.input.defined() && rank_of(s - 1) == rank) {
      received[{s - 1, key.second}] = f.input.grad();
      in_flight.erase(key);
    } else if (!f.input.defined()) {
      in_flight.erase(key);
    }
  };

  // Receives are posted ahead: each one when the compute action before it
  // starts (the tensor can arrive while that runs), and waited for where the
  // schedule puts it. Tags keep early receives from matching the wrong message
  // under MPI; where messages match in issue order (NCCL's rule), receives from
  // a peer are posted in the order it sends them.
  const std::vector<parallel::PipeAction>& actions = schedule_.ranks[static_cast<size_t>(rank)];
  std::map<size_t, std::pair<std::unique_ptr<parallel::Work>, at::Tensor>> posted;
  const auto post_one = [&](size_t index) {
    const parallel::PipeAction& r = actions[index];
    at::Tensor into = buffer();
    const bool forward = r.op == parallel::PipeOp::kRecvForward;
    const int from = forward ? r.stage - 1 : r.stage + 1;
    posted[index] = {pp.recv(into, rank_of(from), {tag(from, r.micro, forward ? 0 : 1)}), into};
  };
  // Posts a receive, and first every receive from the same peer that peer sends
  // earlier (issue-order matching); a no-op for one already posted.
  std::vector<size_t> next_from(static_cast<size_t>(schedule_.pp), 0);
  const auto post = [&](size_t index) {
    const size_t peer = static_cast<size_t>(recv_peer_[index]);
    for (size_t& next = next_from[peer]; next <= recv_place_[index]; ++next) post_one(recv_order_[peer][next]);
  };

  // Grouped point-to-point: the group that goes out at this action, sent and received together and waited for whole.
  const auto run_group = [&](size_t index) {
    const auto found = group_at_.find(index);
    if (found == group_at_.end()) return;
    std::vector<parallel::P2POp> ops;
    std::vector<std::pair<std::pair<int, int>, at::Tensor>> arriving;
    for (const size_t i : groups_[found->second].actions) {
      const parallel::PipeAction& c = actions[i];
      const auto key = std::make_pair(c.stage, c.micro);
      switch (c.op) {
        case parallel::PipeOp::kRecvForward:
          arriving.emplace_back(key, buffer());
          ops.push_back({false, arriving.back().second, rank_of(c.stage - 1), tag(c.stage - 1, c.micro, 0)});
          break;
        case parallel::PipeOp::kRecvBackward:
          arriving.emplace_back(key, buffer());
          ops.push_back({false, arriving.back().second, rank_of(c.stage + 1), tag(c.stage + 1, c.micro, 1)});
          break;
        case parallel::PipeOp::kSendForward:
          ops.push_back({true, in_flight.at(key).output.hidden.detach().contiguous(), rank_of(c.stage + 1), tag(c.stage, c.micro, 0)});
          break;
        case parallel::PipeOp::kSendBackward:
          ops.push_back({true, in_flight.at(key).input.grad().contiguous(), rank_of(c.stage - 1), tag(c.stage, c.micro, 1)});
          in_flight.erase(key);
          break;
        default:
          throw std::logic_error("step runtime: " + c.text() + " in a point-to-point group");
      }
    }
    pp.send_recv(ops)->wait();
    for (auto& [key, tensor] : arriving) received[key] = tensor;
  };

  for (size_t index = 0; index < actions.size(); ++index) {
    const parallel::PipeAction& a = actions[index];
    if (pipeline_.grouped_p2p) {
      if (!a.is_compute()) {
        run_group(index);
        continue;
      }
    } else {
      for (size_t r : post_at_[index]) post(r);
    }
    const auto key = std::make_pair(a.stage, a.micro);
    const bool gradient = a.op == parallel::PipeOp::kBackward || a.op == parallel::PipeOp::kInputGrad || a.op == parallel::PipeOp::kWeightGrad;
    if (gradient && hooks.before_backward) hooks.before_backward(final_gradients[index]);
    switch (a.op) {
      case parallel::PipeOp::kRecvForward:
      case parallel::PipeOp::kRecvBackward: {
        post(index);
        auto& [work, tensor] = posted.at(index);
        work->wait();
        received[key] = tensor;
        posted.erase(index);
        break;
      }
      case parallel::PipeOp::kForward: {
        const auto start = std::chrono::steady_clock::now();
        const at::Tensor tokens = hooks.batch(a.micro);
        totals.data_seconds += seconds_since(start);
        InFlight f;
        if (!pipeline_.stages[static_cast<size_t>(a.stage)].embedding) {
          f.input = received.at(key).requires_grad_();
          received.erase(key);
        }
        double forward_took = 0;
        const auto forward = [&] {
          const auto compute = std::chrono::steady_clock::now();
          f.output = model_.forward_stage(pipeline_.stages[static_cast<size_t>(a.stage)], tokens, f.input, compute_dtype, fp8);
          forward_took = seconds_since(compute);
        };
        if (a.overlapped && overlap_) {
          // The pair at once: this forward on the second thread (its own
          // communication lane; it touches nothing else of the step), the
          // backward that follows it (validated: a whole B) here.
          const parallel::PipeAction& b = actions[++index];
          if (hooks.before_backward) hooks.before_backward(final_gradients[index]);
          const double backward_before = totals.backward_seconds;
          const auto pair = std::chrono::steady_clock::now();
          overlap_->start(forward);
          try {
            backward({b.stage, b.micro}, /*split=*/false);
          } catch (...) {
            try {
              overlap_->wait();
            } catch (...) {  // the backward's error is the one to report
            }
            throw;
          }
          overlap_->wait();
          totals.overlapped_seconds += forward_took + (totals.backward_seconds - backward_before) - seconds_since(pair);
        } else {
          forward();
        }
        totals.forward_seconds += forward_took;
        // The next stage on this rank too: its input without a message.
        if (a.stage + 1 < stages && rank_of(a.stage + 1) == rank) received[{a.stage + 1, a.micro}] = f.output.hidden.detach();
        in_flight[key] = std::move(f);
        break;
      }
      case parallel::PipeOp::kSendForward: {
        const at::Tensor out = in_flight.at(key).output.hidden.detach().contiguous();
        sends.emplace_back(pp.send(out, rank_of(a.stage + 1), {tag(a.stage, a.micro, 0)}), out);
        break;
      }
      case parallel::PipeOp::kBackward:
        backward(key, /*split=*/false);
        break;
      case parallel::PipeOp::kInputGrad:
        backward(key, /*split=*/true);
        break;
      case parallel::PipeOp::kWeightGrad: {
        const auto compute = std::chrono::steady_clock::now();
        deferred.at(key).run();
        deferred.erase(key);
        totals.weight_seconds += seconds_since(compute);
        break;
      }
      case parallel::PipeOp::kSendBackward: {
        const at::Tensor gradient = in_flight.at(key).input.grad().contiguous();
        sends.emplace_back(pp.send(gradient, rank_of(a.stage - 1), {tag(a.stage, a.micro, 1)}), gradient);
        in_flight.erase(key);
        break;
      }
    }
  }
  for (auto& [work, tensor] : sends) work->wait();
  return totals;
}

}  // namespace fmoe::trainer

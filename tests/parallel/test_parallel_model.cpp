// Every data / tensor / expert-parallel layout that fits the rank count trains
// the same model as one process: from one seed, the loss and every parameter's
// gradient after one step match the single-process model on the same global
// batch (FP32, 1e-5 relative), and 20 AdamW steps give the same loss curve (1e-4).
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>

#include "moe/model.h"
#include "parallel/grad_sync.h"
#include "parallel/mpi/mpi_communicator.h"
#include "tests/parallel/mpi_test_env.h"
#include "trainer/optimizer.h"
#include "trainer/zero1.h"

namespace {

using namespace fmoe;
using fmoe::testing::world;

moe::ModelConfig micro_config(bool mla = false, bool mtp = false, bool qwen = false) {
  moe::ModelConfig c = fmoe::testing::test_model(
      {.vocab = 128, .hidden = 32, .layers = 3, .heads = 4, .kv_heads = 2, .head_dim = 8, .ffn = 64, .experts = 8, .top_k = 2, .moe_ffn = 16});
  c.attention_bias = c.shared_expert_gate = qwen;  // Qwen2-MoE's QKV biases and gated shared expert
  c.mtp_depth = mtp ? 1 : 0;  // multi-token prediction (not under sequence parallelism)
  if (mla) {  // multi-head latent attention with a query latent and YaRN
    fmoe::testing::use_mla(c, {.q_lora_rank = 16, .kv_lora_rank = 12, .nope = 8, .rope = 4, .v = 6});
    c.rope_scaling.type = "yarn";
    c.rope_scaling.factor = 4;
    c.rope_scaling.original_max_position_embeddings = 8;
    c.rope_scaling.mscale_all_dim = 1;
  }
  c.num_shared_experts = 1;
  c.num_groups = 2;
  c.group_top_k = 1;
  c.aux_loss_coeff = 1e-2;
  c.z_loss_coeff = 1e-3;
  c.expert_bias_update_rate = 1e-2;
  return c;
}

constexpr int64_t kSeqLen = 16, kLocalBatch = 2, kSteps = 20;

// The global batch of one step: dp * kLocalBatch sequences, the same on every rank.
at::Tensor global_batch(int64_t step, int64_t dp) {
  at::manual_seed(1000 + step);
  return at::randint(0, 128, {dp * kLocalBatch, kSeqLen + 1}, at::kLong);
}

double relative_error(const at::Tensor& a, const at::Tensor& b) {
  const double denominator = b.to(at::kDouble).norm().item<double>();
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() / std::max(denominator, 1e-30);
}

struct Layout {
  parallel::MeshShape shape;
  const char* name;
  bool sequence_parallel = false;
  bool mla = false;
  bool qwen = false;
};

std::vector<Layout> layouts_for(int64_t n) {
  std::vector<Layout> all = {{{2, 1, 1, 1}, "dp2"},          {{1, 1, 2, 1}, "tp2"},          {{2, 1, 1, 2}, "dp2+ep2"},
                             {{4, 1, 1, 4}, "dp4+ep4"},      {{4, 1, 1, 2}, "dp4+ep2"},      {{2, 1, 2, 2}, "dp2xtp2+ep2"},
                             {{4, 1, 2, 4}, "dp4xtp2+ep4"},  {{1, 1, 2, 1}, "tp2 sp", true},
                             {{2, 1, 2, 2}, "dp2xtp2+ep2 sp", true}, {{4, 1, 2, 4}, "dp4xtp2+ep4 sp", true},
                             {{1, 1, 2, 1}, "tp2 mla mtp", false, true}, {{2, 1, 2, 2}, "dp2xtp2+ep2 sp mla", true, true},
                             {{4, 1, 2, 4}, "dp4xtp2+ep4 sp mla", true, true},
                             {{1, 1, 2, 1}, "tp2 qwen", false, false, true}, {{2, 1, 2, 2}, "dp2xtp2+ep2 sp qwen", true, false, true}};
  std::vector<Layout> fitting;
  for (const Layout& l : all) {
    if (l.shape.world_size() == n) fitting.push_back(l);
  }
  return fitting;
}

struct Trained {
  std::shared_ptr<moe::MoEModel> model;
  std::unique_ptr<trainer::Optimizer> optimizer;
};

config::OptimizerConfig optimizer_config() {
  config::OptimizerConfig o;
  o.lr = 3e-3;
  o.weight_decay = 0.1;
  o.grad_clip = 1.0;
  return o;
}

std::vector<trainer::NamedParameter> named(const moe::MoEModel& model) {
  std::vector<trainer::NamedParameter> params;
  for (const auto& item : model.named_parameters()) params.push_back({item.key(), item.value()});
  return params;
}

// (expert dispatcher, ZeRO-1)
class ParallelModel : public ::testing::TestWithParam<std::tuple<moe::ExpertDispatcher, bool>> {};

// Forward and backward of the single-process reference on the whole global batch.
double reference_backward(moe::MoEModel& model, const at::Tensor& tokens) {
  model.zero_grad();
  const moe::ModelOutput out = model.forward(tokens, at::kFloat);
  out.loss.backward();
  return out.loss.item<double>();
}

void reference_update(moe::MoEModel& model, trainer::Optimizer& optimizer) {
  std::vector<at::Tensor> grads;
  for (const auto& p : model.parameters()) grads.push_back(p.grad());
  trainer::clip_grad_norm(grads, optimizer_config().grad_clip);
  std::vector<at::Tensor> loads;
  for (const auto& layer : model.moe_layers()) loads.push_back(layer->step_load.clone());
  model.update_expert_biases(loads);
  optimizer.step(optimizer_config().lr);
}

TEST_P(ParallelModel, OneStepGradientsAndTwentyStepLossesMatchOneProcess) {
  const int64_t n = world().size();
  const auto [dispatcher, zero1] = GetParam();
  for (const Layout& layout : layouts_for(n)) {
    if (zero1 && layout.shape.dp == 1) continue;
    SCOPED_TRACE(std::string(layout.name) + (zero1 ? " zero1" : ""));
    const parallel::Mesh mesh(fmoe::testing::world_communicator(), layout.shape);
    const parallel::MeshCoords& c = mesh.coords();
    const int64_t dp = layout.shape.dp;

    at::manual_seed(7);
    const bool mtp = layout.mla && !layout.sequence_parallel;
    auto reference = std::make_shared<moe::MoEModel>(micro_config(layout.mla, mtp, layout.qwen));
    at::manual_seed(7);
    auto sharded =
        std::make_shared<moe::MoEModel>(micro_config(layout.mla, mtp, layout.qwen), moe::Parallelism{mesh, dispatcher, layout.sequence_parallel});
    trainer::Optimizer reference_opt(named(*reference), optimizer_config());

    std::vector<at::Tensor> dense, experts, grads_of, partial;
    std::vector<bool> over_tp, is_expert;
    for (const auto& item : sharded->named_parameters()) {
      const parallel::ShardSpec& spec = sharded->shard_specs().at(item.key());
      (spec.is_expert() ? experts : dense).push_back(item.value());
      if (spec.tp_partial_grad) partial.push_back(item.value());
      grads_of.push_back(item.value());
      over_tp.push_back(spec.tp_dim >= 0);
      is_expert.push_back(spec.is_expert());
    }
    parallel::GradientSync sync(dense, experts, mesh, /*bucket_bytes=*/16 << 10);  // several buckets
    sync.enable_overlap(/*deferred=*/partial);
    std::unique_ptr<trainer::Optimizer> sharded_opt;
    std::unique_ptr<trainer::Zero1> zero;
    if (zero1) {
      zero = std::make_unique<trainer::Zero1>(named(*sharded), over_tp, is_expert, mesh, optimizer_config());
    } else {
      sharded_opt = std::make_unique<trainer::Optimizer>(named(*sharded), optimizer_config());
    }
    // Each rank holds its share: E / ep experts, each F / tp wide.
    ASSERT_EQ(sharded->moe_layers()[0]->w13.sizes(), (at::IntArrayRef{8 / layout.shape.ep, 32, 2 * 16 / layout.shape.tp}));

    double worst_loss = 0, worst_grad = 0, initial_loss = 0;
    for (int64_t step = 0; step < kSteps; ++step) {
      const at::Tensor tokens = global_batch(step, dp);
      const double ref_loss = reference_backward(*reference, tokens);
      if (step == 0) initial_loss = ref_loss;

      sharded->zero_grad();
      sync.arm(/*last_micro_batch=*/!zero1);
      const moe::ModelOutput out = sharded->forward(tokens.narrow(0, c.dp * kLocalBatch, kLocalBatch), at::kFloat);
      out.loss.backward();
      parallel::sum_partial_gradients_over_tp(partial, mesh);
      if (zero1) {
        zero->reduce_scatter_gradients();
      } else {
        sync.sync();
        // Buckets of the last layers start reducing while backward still runs.
        if (dp > 1) {
          EXPECT_GT(sync.launched_in_backward(), 0);
        }
      }
      at::Tensor loss = out.loss.detach().clone().view({1});
      mesh.dp().all_reduce(loss, {parallel::ReduceOp::kAvg})->wait();
      if (step == 0) {
        // Gradients before the update: every parameter's shard against the reference's.
        int64_t compared = 0;
        for (const auto& item : sharded->named_parameters()) {
          if (!item.value().grad().defined()) continue;  // ZeRO-1: another rank owns it
          ++compared;
          const at::Tensor expected = parallel::local_shard(reference->named_parameters()[item.key()].grad(),
                                                            sharded->shard_specs().at(item.key()), layout.shape, c);
          ASSERT_EQ(item.value().grad().sizes(), expected.sizes()) << item.key();
          const double error = relative_error(item.value().grad(), expected);
          worst_grad = std::max(worst_grad, error);
          EXPECT_LE(error, 1e-5) << item.key();
        }
        EXPECT_LE(std::abs(loss.item<double>() - ref_loss) / ref_loss, 1e-5);
        // Every parameter's gradient is checked on some rank: ZeRO-1 spreads them over dp.
        at::Tensor total = at::full({1}, compared, at::kLong);
        if (zero1) mesh.dp().all_reduce(total, {parallel::ReduceOp::kSum})->wait();
        EXPECT_GE(total.item<int64_t>(), static_cast<int64_t>(sharded->named_parameters().size()));
      }
      reference_update(*reference, reference_opt);
      if (zero1) {
        zero->clip_grad_norm(optimizer_config().grad_clip);
      } else {
        std::vector<at::Tensor> grads;
        for (const auto& p : grads_of) grads.push_back(p.grad());
        trainer::clip_grad_norm(grads, over_tp, is_expert, mesh, optimizer_config().grad_clip);
      }
      std::vector<at::Tensor> loads;
      for (const auto& layer : sharded->moe_layers()) {
        at::Tensor load = layer->step_load.clone();
        mesh.dp().all_reduce(load, {parallel::ReduceOp::kSum})->wait();  // the global load
        loads.push_back(load);
      }
      sharded->update_expert_biases(loads);
      if (zero1) {
        zero->step(optimizer_config().lr);
      } else {
        sharded_opt->step(optimizer_config().lr);
      }
      const double error = std::abs(loss.item<double>() - ref_loss) / ref_loss;
      worst_loss = std::max(worst_loss, error);
      EXPECT_LE(error, 1e-4) << "step " << step;
    }
    // The models must have moved: a curve that matches because nothing trains proves nothing.
    EXPECT_LT(reference_backward(*reference, global_batch(0, dp)), initial_loss - 0.05);
    if (world().rank() == 0) {
      std::printf("[ layout %-15s%s ] worst gradient error %.2e, worst loss error over %lld steps %.2e\n", layout.name, zero1 ? " zero1" : "", worst_grad,
                  static_cast<long long>(kSteps), worst_loss);
    }
  }
}

// The first MoE layer of a sharded model on 24 tokens: its output and d(sum out^2)/d w13.
std::pair<at::Tensor, at::Tensor> moe_layer_output_and_grad(const moe::MoEModel& model, const at::Tensor& h, int64_t pad) {
  auto& layer = *model.moe_layers()[0];
  moe::ForwardContext ctx;
  ctx.batch = 2;
  ctx.seq_len = 12;
  ctx.expert_pad_multiple = pad;
  ctx.aux_loss = at::zeros({});
  ctx.z_loss = at::zeros({});
  ctx.parallel = &model.parallelism();
  const at::Tensor out = layer.forward(h, ctx);
  return {out.detach(), torch::autograd::grad({out.square().sum()}, {layer.w13})[0]};
}

TEST(ExpertParallel, PaddingTheReceivedRowsChangesNothing) {
  // BF16 runs pad each local expert's rows to a multiple of 64; in FP32 the
  // padded and unpadded computations must agree to rounding, values and gradients.
  const int64_t n = world().size();
  const parallel::Mesh mesh(fmoe::testing::world_communicator(), {n, 1, 1, n});
  at::manual_seed(5);
  moe::MoEModel model(micro_config(), moe::Parallelism{mesh, moe::ExpertDispatcher::kAllToAll});
  at::manual_seed(100 + world().rank());
  const at::Tensor h = at::randn({24, 32});
  std::vector<at::Tensor> outs, grads;
  for (int64_t pad : {1, 8}) {
    const auto [out, grad] = moe_layer_output_and_grad(model, h, pad);
    outs.push_back(out);
    grads.push_back(grad);
  }
  EXPECT_LT(relative_error(outs[1], outs[0]), 1e-6);
  EXPECT_LT(relative_error(grads[1], grads[0]), 1e-6);
}

TEST(ExpertParallel, DispatchersAgreeWhenTokensAreDropped) {
  // With a capacity factor each rank drops assignments locally before dispatch;
  // the all-to-all and the all-gather dispatchers must compute the same function.
  const int64_t n = world().size();
  const parallel::Mesh mesh(fmoe::testing::world_communicator(), {n, 1, 1, n});
  moe::ModelConfig c = micro_config();
  c.capacity_factor = 0.5;
  std::vector<at::Tensor> outs, grads;
  for (auto dispatcher : {moe::ExpertDispatcher::kAllToAll, moe::ExpertDispatcher::kAllGather}) {
    at::manual_seed(5);
    moe::MoEModel model(c, moe::Parallelism{mesh, dispatcher});
    at::manual_seed(200 + world().rank());
    const auto [out, grad] = moe_layer_output_and_grad(model, at::randn({24, 32}), 1);
    outs.push_back(out);
    grads.push_back(grad);
  }
  EXPECT_LT(relative_error(outs[1], outs[0]), 1e-6);
  EXPECT_LT(relative_error(grads[1], grads[0]), 1e-6);
}

// Whether this CPU's GEMMs give each row the same bits whatever the number of
// rows beside it (the blocking of some backends' kernels, AVX2 MKL's among them,
// changes the order of the sums with the row count).
bool gemm_rows_are_independent() {
  at::manual_seed(11);
  const at::Tensor x = at::randn({25, 32}), w = at::randn({32, 64});
  const at::Tensor all = at::mm(x, w), all_t = at::mm(all, w.t());
  for (int64_t rows = 1; rows < 25; ++rows) {
    const at::Tensor part = x.narrow(0, 0, rows);
    if (!at::equal(at::mm(part, w), all.narrow(0, 0, rows))) return false;
    if (!at::equal(at::mm(all.narrow(0, 0, rows), w.t()), all_t.narrow(0, 0, rows))) return false;
  }
  return true;
}

TEST(ExpertParallel, OverlappedChunksComputeTheSameFunction) {
  // parallel.ep_overlap: the tokens go through the all-to-all dispatcher in two
  // chunks whose exchanges are in flight while the other chunk's experts compute.
  // Per token nothing changes: the outputs and the input gradients are the
  // unsplit ones (each row's GEMMs alike); the expert weight gradients are summed
  // per chunk, so they may differ by rounding only. With the MPI progress thread too.
  const int64_t n = world().size();
  const parallel::Mesh mesh(fmoe::testing::world_communicator(), {n, 1, 1, n});
  for (const bool thread : {false, true}) {
    SCOPED_TRACE(thread ? "progress thread" : "no progress thread");
    const bool was_on = parallel::mpi_progress_thread();
    ASSERT_TRUE(parallel::set_mpi_progress_thread(thread));
    std::vector<at::Tensor> outs, input_grads, weight_grads, bias_grads;
    for (const bool overlap : {false, true}) {
      at::manual_seed(5);
      moe::MoEModel model(micro_config(), moe::Parallelism{mesh, moe::ExpertDispatcher::kAllToAll, false, overlap});
      at::manual_seed(300 + world().rank());
      // 25 tokens: chunks of 13 and 12.
      const at::Tensor h = at::randn({25, 32}).requires_grad_();
      auto& layer = *model.moe_layers()[0];
      moe::ForwardContext ctx;
      ctx.batch = 1;
      ctx.seq_len = 25;
      ctx.aux_loss = at::zeros({});
      ctx.z_loss = at::zeros({});
      ctx.parallel = &model.parallelism();
      const at::Tensor out = layer.forward(h, ctx);
      const auto grads = torch::autograd::grad({(out * out.detach().cos()).sum()}, {h, layer.w13, layer.w2, layer.router_weight});
      outs.push_back(out.detach());
      input_grads.push_back(grads[0]);
      weight_grads.push_back(at::cat({grads[1].flatten(), grads[2].flatten()}));
      bias_grads.push_back(grads[3]);
    }
    if (gemm_rows_are_independent()) {
      EXPECT_TRUE(at::equal(outs[1], outs[0])) << "largest difference " << (outs[1] - outs[0]).abs().max().item<double>();
      EXPECT_TRUE(at::equal(input_grads[1], input_grads[0])) << "relative " << relative_error(input_grads[1], input_grads[0]);
      EXPECT_TRUE(at::equal(bias_grads[1], bias_grads[0])) << "router relative " << relative_error(bias_grads[1], bias_grads[0]);
    } else {
      // The chunks' GEMMs round differently on this CPU: the same function within FP32 rounding.
      EXPECT_LT(relative_error(outs[1], outs[0]), 1e-6);
      EXPECT_LT(relative_error(input_grads[1], input_grads[0]), 1e-6);
      EXPECT_LT(relative_error(bias_grads[1], bias_grads[0]), 1e-6);
    }
    EXPECT_GT(weight_grads[0].abs().sum().item<double>(), 0);
    EXPECT_LT(relative_error(weight_grads[1], weight_grads[0]), 1e-6);
    parallel::set_mpi_progress_thread(was_on);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ParallelModel,
                         ::testing::Combine(::testing::Values(moe::ExpertDispatcher::kAllToAll, moe::ExpertDispatcher::kAllGather),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == moe::ExpertDispatcher::kAllToAll ? "AllToAll" : "AllGather") +
                                  (std::get<1>(info.param) ? "Zero1" : "");
                         });

}  // namespace

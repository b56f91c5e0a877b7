#include <gtest/gtest.h>

#include "config/config.h"
#include "trainer/optimizer.h"

namespace {

using namespace fmoe::trainer;
using namespace fmoe::config;

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(yaml, "run.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(Config, DefaultsAreValid) { EXPECT_EQ(Config().validate(), ""); }

TEST(Config, UnknownKeySuggestsNearest) {
  EXPECT_EQ(error_of("model:\n  num_expert: 8\n"),
            "run.yaml:2:3: unknown key 'model.num_expert'; did you mean 'model.num_experts'?");
  EXPECT_EQ(error_of("trainin:\n  steps: 3\n"), "run.yaml:1:1: unknown key 'trainin'; did you mean 'training'?");
}

TEST(Config, WrongTypeReportsLineAndColumn) {
  EXPECT_EQ(error_of("training:\n  steps: 3\n  seq_len: long\n"),
            "run.yaml:3:12: training.seq_len: expected an integer, got 'long'");
  EXPECT_EQ(error_of("optimizer:\n  lr: 1e-3x\n"), "run.yaml:2:7: optimizer.lr: expected a number, got '1e-3x'");
  EXPECT_EQ(error_of("model:\n  norm_topk_prob: maybe\n"),
            "run.yaml:2:19: model.norm_topk_prob: expected true or false, got 'maybe'");
  EXPECT_EQ(error_of("model:\n  score_function: relu\n"),
            "run.yaml:2:19: model.score_function: expected softmax or sigmoid, got 'relu'");
  EXPECT_EQ(error_of("model: 3\n"), "run.yaml:1:8: model: expected a mapping of keys");
}

TEST(Config, RangesAreValidated) {
  EXPECT_EQ(error_of("model:\n  top_k: 17\n"), "run.yaml: model.top_k: must be in [1, num_experts=16], got 17");
  EXPECT_EQ(error_of("training:\n  steps: -1\n"), "run.yaml: training.steps: must be >= 1, or 0 to size the run by the budget, got -1");
  EXPECT_EQ(error_of("training:\n  steps: 0\n"),
            "run.yaml: training.steps: 0 sizes the run by the budget, but no budget limit is set (budget.max_minutes, "
            "max_gpu_hours, max_usd or max_tokens)");
  EXPECT_EQ(error_of("training:\n  steps: 0\noptimizer:\n  warmup_steps: 5\nbudget:\n  max_minutes: 8\n"),
            "run.yaml: optimizer.warmup_steps: 5 is shorter than budget.calibration_steps 20; a budget-sized schedule is "
            "fixed during warmup");
  EXPECT_EQ(error_of("training:\n  steps: 0\noptimizer:\n  warmup_steps: 5\nbudget:\n  max_tokens: 4096\n"), "");
  EXPECT_EQ(error_of("training:\n  precision: fp16\n"), "run.yaml: training.precision: must be auto, bf16 or fp32, got 'fp16'");
  EXPECT_EQ(error_of("training:\n  eval_batches: 4\n"),
            "run.yaml:2:3: unknown key 'training.eval_batches'; validation is now a fixed number of held-out windows: use "
            "'training.eval_sequences'");
  EXPECT_EQ(error_of("training:\n  seq_len: 512\n"), "run.yaml: training.seq_len: 512 exceeds model.max_seq_len 256");
  EXPECT_EQ(error_of("parallel:\n  dp: 4\n  ep: 3\n"), "run.yaml: parallel.ep: must divide dp (4), got 3");
  EXPECT_EQ(error_of("budget:\n  max_usd: 5\n"), "run.yaml: budget.max_usd: needs usd_per_gpu_hour > 0 to convert time into dollars");
  // moe-plan takes any layout; moe-train says what it cannot run.
  EXPECT_EQ(parse_config("parallel:\n  pp: 2\n", "run.yaml").parallel.trainer_support(), "");
  EXPECT_EQ(parse_config("parallel:\n  virtual_pp: 2\n", "run.yaml").parallel.trainer_support(),
            "virtual_pp: chunks per rank need pipeline parallelism (pp > 1)");
  EXPECT_EQ(parse_config("parallel:\n  tp: 2\n  ep: 2\n  dp: 2\n", "run.yaml").parallel.trainer_support(), "");
  EXPECT_EQ(error_of("parallel:\n  expert_dispatcher: ring\n"),
            "run.yaml: parallel.expert_dispatcher: must be alltoall or allgather, got 'ring'");
  EXPECT_EQ(error_of("parallel:\n  ep_overlap: true\n  expert_dispatcher: allgather\n"),
            "run.yaml: parallel.ep_overlap: overlaps the all-to-all dispatcher's exchanges; expert_dispatcher is 'allgather'");
  EXPECT_EQ(error_of("parallel:\n  pp: 2\n  fb_overlap: true\n"),
            "run.yaml: parallel.fb_overlap: overlaps DualPipeV's F&B pairs; pipeline_schedule is 'auto'");
  EXPECT_EQ(parse_config("parallel:\n  pp: 2\n  virtual_pp: 2\n  pipeline_schedule: dualpipev\n  fb_overlap: true\n", "run.yaml").parallel.fb_overlap, true);
  EXPECT_EQ(error_of("optimizer:\n  stochastic_rounding: true\n"),
            "run.yaml: optimizer.stochastic_rounding: rounds BF16 master weights; main_params_dtype is 'fp32'");
  EXPECT_EQ(error_of("optimizer:\n  name: sgd\n"), "run.yaml: optimizer.name: must be adamw or muon, got 'sgd'");
  // FP4 is a gradient dtype only (an exponential moving average would pile up its
  // rounding), and for Muon's matrices only.
  EXPECT_EQ(parse_config("optimizer:\n  name: muon\n  grad_dtype: fp4\n", "run.yaml").optimizer.grad_dtype, "fp4");
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: fp4\n"),
            "run.yaml: optimizer.grad_dtype: fp4 is for Muon's matrices (name: muon); AdamW's second moment would take its "
            "rounding noise for signal");
  EXPECT_EQ(error_of("optimizer:\n  exp_avg_dtype: fp4\n"), "run.yaml: optimizer.exp_avg_dtype: must be fp32, bf16, fp8 or fp6, got 'fp4'");
  EXPECT_EQ(parse_config("optimizer:\n  exp_avg_dtype: fp6\n", "run.yaml").optimizer.exp_avg_dtype, "fp6");
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: int4\n"),
            "run.yaml: optimizer.grad_dtype: must be fp32, bf16, fp8, fp6, fp4 or nvfp4, got 'int4'");
  EXPECT_EQ(parse_config("optimizer:\n  grad_dtype: fp6\n", "run.yaml").optimizer.grad_dtype, "fp6");  // AdamW too
  EXPECT_TRUE(parse_config("optimizer:\n  exp_avg_sq_dtype: fp8\n  exp_avg_sq_stochastic_rounding: true\n", "run.yaml")
                  .optimizer.exp_avg_sq_stochastic_rounding);
  EXPECT_EQ(error_of("optimizer:\n  exp_avg_sq_dtype: bf16\n  exp_avg_sq_stochastic_rounding: true\n"),
            "run.yaml: optimizer.exp_avg_sq_stochastic_rounding: rounds fp8 second moments; exp_avg_sq_dtype is 'bf16'");
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: fp6\n  grad_hadamard: true\n"),
            "run.yaml: optimizer.grad_hadamard: rotates fp4 and nvfp4 gradients; grad_dtype is 'fp6'");
  EXPECT_EQ(parse_config("optimizer:\n  name: muon\n  grad_dtype: nvfp4\n", "run.yaml").optimizer.grad_dtype, "nvfp4");
  EXPECT_FALSE(parse_config("optimizer:\n  name: muon\n  grad_dtype: nvfp4\n  grad_stochastic_rounding: false\n", "run.yaml")
                   .optimizer.grad_stochastic_rounding);
  EXPECT_TRUE(parse_config("optimizer:\n  name: muon\n  grad_dtype: nvfp4\n  grad_hadamard: true\n", "run.yaml").optimizer.grad_hadamard);
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: fp8\n  grad_hadamard: true\n"),
            "run.yaml: optimizer.grad_hadamard: rotates fp4 and nvfp4 gradients; grad_dtype is 'fp8'");
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: fp8\n  grad_stochastic_rounding: false\n"),
            "run.yaml: optimizer.grad_stochastic_rounding: rounds fp4 and nvfp4 gradients; grad_dtype is 'fp8'");
  EXPECT_EQ(error_of("optimizer:\n  grad_dtype: nvfp4\n"),
            "run.yaml: optimizer.grad_dtype: nvfp4 is for Muon's matrices (name: muon); AdamW's second moment would take its "
            "rounding noise for signal");
  EXPECT_EQ(error_of("optimizer:\n  name: muon\n  muon_scale: spectral\n"),
            "run.yaml: optimizer.muon_scale: must be rms or shape, got 'spectral'");
  EXPECT_EQ(error_of("optimizer:\n  muon_ns_steps: 0\n"), "run.yaml: optimizer.muon_ns_steps: must be in [1, 20], got 0");
}

TEST(Config, SyntaxErrorHasLocation) {
  const std::string message = error_of("model:\n  top_k: [1, 2\n");
  EXPECT_EQ(message.rfind("run.yaml:", 0), 0u) << message;
  EXPECT_NE(message.find("YAML syntax error"), std::string::npos) << message;
}

TEST(Config, SetOverridesApplyAndAreChecked) {
  const Config c = parse_config("model:\n  top_k: 2\n", "run.yaml", {"model.top_k=3", "training.precision=fp32", "data.sources=[a, b]"});
  EXPECT_EQ(c.model.top_k, 3);
  EXPECT_EQ(c.training.precision, "fp32");
  EXPECT_EQ(c.data.sources, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(error_of("", {"model.topk=3"}), "--set: unknown key 'model.topk'; did you mean 'model.top_k'?");
  EXPECT_EQ(error_of("", {"model.top_k=x"}), "--set: model.top_k: expected an integer, got 'x'");
  EXPECT_EQ(error_of("", {"model"}), "--set model: expected key.path=value");
}

TEST(Config, ResolvedYamlRoundTrips) {
  Config c = parse_config("model:\n  score_function: softmax\n  route_scale: 2.5\noptimizer:\n  lr: 0.001\n", "a.yaml");
  const std::string yaml = to_yaml(c);
  const Config again = parse_config(yaml, "resolved.yaml");
  EXPECT_EQ(to_yaml(again), yaml);
  EXPECT_EQ(again.model.score_function, fmoe::moe::ScoreFunction::kSoftmax);
  EXPECT_DOUBLE_EQ(again.model.route_scale, 2.5);
  EXPECT_DOUBLE_EQ(again.optimizer.lr, 0.001);
  EXPECT_EQ(again.model.num_experts, c.model.num_experts);
}

TEST(Config, PipelineLayoutIsCheckedAgainstTheModel) {
  Config c;
  c.model.num_layers = 4;
  c.parallel.pp = 2;
  c.parallel.pipeline_layout = "E t*2 | t*2 L";
  EXPECT_EQ(c.validate(), "");
  c.parallel.pipeline_layout = "E t*2 | t L";
  EXPECT_EQ(c.validate(), "parallel.pipeline_layout: pipeline layout 'E t*2 | t L': places 3 of the 4 layers: layer 3 is missing");
  c.parallel.pipeline_layout = "";
  c.parallel.pipeline_schedule = "dualpipe";
  EXPECT_EQ(c.validate(), "parallel.pipeline_schedule: must be auto, gpipe, 1f1b, interleaved, zbh1 or dualpipev, got 'dualpipe'");
}

TEST(Config, EditDistance) {
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("top_k", "top_k"), 0u);
}

TEST(Schedule, WarmupCosineAndWsd) {
  OptimizerConfig o;
  o.lr = 1.0;
  o.min_lr = 0.1;
  o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(learning_rate(o, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(o, 9, 110), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 10, 110), 1.0);
  EXPECT_NEAR(learning_rate(o, 60, 110), 0.55, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(learning_rate(o, 110, 110), 0.1, 1e-12);
  o.lr_schedule = "wsd";
  o.wsd_decay_fraction = 0.2;  // decay over the last 22 of 110 steps
  EXPECT_DOUBLE_EQ(learning_rate(o, 50, 110), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 88, 110), 1.0);
  EXPECT_NEAR(learning_rate(o, 99, 110), 0.55, 1e-12);
  o.lr_schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(o, 100, 110), 1.0);
}

TEST(Optimizer, ParameterKindsAndDecay) {
  EXPECT_EQ(classify_parameter("embedding.weight"), ParamKind::kEmbedding);
  EXPECT_EQ(classify_parameter("head.weight"), ParamKind::kHead);
  EXPECT_EQ(classify_parameter("head.norm.weight"), ParamKind::kNorm);
  EXPECT_EQ(classify_parameter("layers.3.attention_norm.weight"), ParamKind::kNorm);
  EXPECT_EQ(classify_parameter("layers.3.moe.router_weight"), ParamKind::kRouter);
  EXPECT_EQ(classify_parameter("layers.3.moe.w13"), ParamKind::kExpert);
  EXPECT_EQ(classify_parameter("layers.3.moe.shared.w13"), ParamKind::kDense);
  OptimizerConfig o;
  EXPECT_FALSE(decays(ParamKind::kNorm, o));
  EXPECT_TRUE(decays(ParamKind::kExpert, o));
  o.decay_norms = true;
  EXPECT_TRUE(decays(ParamKind::kNorm, o));
}

TEST(Optimizer, AdamWFirstStepMatchesClosedForm) {
  // After one step, m_hat = g and v_hat = g^2, so p -= lr * (g / (|g| + eps)) + lr * wd * p.
  at::Tensor decayed = at::full({3}, 2.0f).requires_grad_();
  at::Tensor plain = at::full({2}, 2.0f).requires_grad_();
  decayed.mutable_grad() = at::tensor({0.5f, -2.0f, 0.0f});
  plain.mutable_grad() = at::tensor({1.0f, -1.0f});
  OptimizerConfig o;
  o.weight_decay = 0.1;
  o.eps = 1e-8;
  Optimizer adam({{"layers.0.moe.w13", decayed}, {"layers.0.attention_norm.weight", plain}}, o);
  adam.step(0.01);
  EXPECT_NEAR(decayed[0].item<double>(), 2.0 - 0.01 * 0.1 * 2.0 - 0.01, 1e-6);
  EXPECT_NEAR(decayed[1].item<double>(), 2.0 - 0.01 * 0.1 * 2.0 + 0.01, 1e-6);
  EXPECT_NEAR(decayed[2].item<double>(), 2.0 - 0.01 * 0.1 * 2.0, 1e-6);
  EXPECT_NEAR(plain[0].item<double>(), 2.0 - 0.01, 1e-6);  // norms do not decay
  EXPECT_EQ(adam.steps_taken(), 1);
}

TEST(Optimizer, ClipGradNorm) {
  std::vector<at::Tensor> grads = {at::tensor({3.0f}), at::tensor({4.0f})};
  EXPECT_DOUBLE_EQ(clip_grad_norm(grads, 10.0).item<double>(), 5.0);
  EXPECT_FLOAT_EQ(grads[0].item<float>(), 3.0f);
  EXPECT_NEAR(clip_grad_norm(grads, 1.0).item<double>(), 5.0, 1e-6);
  EXPECT_NEAR(std::hypot(grads[0].item<double>(), grads[1].item<double>()), 1.0, 1e-5);
}

}  // namespace

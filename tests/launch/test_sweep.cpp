#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "launch/sweep.h"
#include "launch/sweep_runner.h"

namespace {

namespace fs = std::filesystem;
using namespace fmoe::launch;

class SweepTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("fmoe_sweep_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    std::ofstream(dir_ / "base.yaml") << "model: {}\n";
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& text) const {
    const std::string path = (dir_ / "sweep.yaml").string();
    std::ofstream(path) << text;
    return path;
  }
  std::string error_of(const std::string& text) const {
    try {
      load_sweep(write(text));
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "";
  }
  fs::path dir_;
};

constexpr const char* kLrAux =
    "base: base.yaml\n"
    "set: {training.steps: 12}\n"
    "axes:\n"
    "  optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}\n"
    "  model.aux_loss_coeff: {grid: [0.0, 0.01]}\n"
    "random: {count: 4, seed: 3}\n";

TEST_F(SweepTest, GridTimesRandomDrawsReproducibly) {
  const SweepSpec spec = load_sweep(write(kLrAux));
  EXPECT_EQ(spec.base, (dir_ / "base.yaml").string());
  EXPECT_EQ(spec.overrides, std::vector<std::string>{"training.steps=12"});
  const std::vector<Trial> trials = expand(spec);
  ASSERT_EQ(trials.size(), 8u);  // 2 grid values x 4 draws
  std::set<std::string> lrs;
  for (size_t i = 0; i < trials.size(); ++i) {
    EXPECT_EQ(trials[i].name, "trial_00" + std::to_string(i));
    ASSERT_EQ(trials[i].values.size(), 2u);
    EXPECT_EQ(trials[i].values[0].first, "optimizer.lr");  // axis order, as written
    EXPECT_EQ(trials[i].values[1], (std::pair<std::string, std::string>{"model.aux_loss_coeff", i < 4 ? "0.0" : "0.01"}));
    const double lr = std::stod(trials[i].values[0].second);
    EXPECT_GE(lr, 1e-4);
    EXPECT_LE(lr, 1e-2);
    lrs.insert(trials[i].values[0].second);
  }
  EXPECT_EQ(lrs.size(), 8u);  // every trial its own draw
  // The same file: the same trials. Another seed: other draws, the same grid.
  const std::vector<Trial> again = expand(load_sweep(write(kLrAux)));
  for (size_t i = 0; i < trials.size(); ++i) EXPECT_EQ(again[i].values, trials[i].values);
  std::string other = kLrAux;
  other.replace(other.find("seed: 3"), 7, "seed: 4");
  const std::vector<Trial> reseeded = expand(load_sweep(write(other)));
  EXPECT_NE(reseeded[0].values[0], trials[0].values[0]);
  EXPECT_EQ(reseeded[5].values[1], trials[5].values[1]);
  EXPECT_EQ(trials[2].overrides(), (std::vector<std::string>{"optimizer.lr=" + trials[2].values[0].second, "model.aux_loss_coeff=0.0"}));
}

TEST_F(SweepTest, LogUniformSpreadsOverDecades) {
  // 400 draws over [1e-4, 1e-2]: about half below 1e-3 (a uniform draw would put 9% there).
  const SweepSpec spec = load_sweep(write("base: base.yaml\naxes:\n  optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}\nrandom: {count: 400, seed: 9}\n"));
  int below = 0;
  for (const Trial& t : expand(spec)) below += std::stod(t.values[0].second) < 1e-3;
  EXPECT_GT(below, 160);
  EXPECT_LT(below, 240);
}

TEST_F(SweepTest, LinkedAxesMoveTogetherAndChoicesComeFromTheList) {
  const SweepSpec spec = load_sweep(write(
      "base: base.yaml\n"
      "axes:\n  model.top_k: {choice: [1, 2]}\n"
      "linked:\n  - {training.micro_batch_size: [8, 16, 32], optimizer.lr: [0.001, 0.002, 0.004]}\n"
      "random: {count: 2, seed: 1}\n"));
  const std::vector<Trial> trials = expand(spec);
  ASSERT_EQ(trials.size(), 6u);  // 3 linked points x 2 draws
  for (size_t i = 0; i < trials.size(); ++i) {
    ASSERT_EQ(trials[i].values.size(), 3u);
    EXPECT_TRUE(trials[i].values[0].second == "1" || trials[i].values[0].second == "2");
    const std::vector<std::string> batch{"8", "16", "32"}, lr{"0.001", "0.002", "0.004"};
    EXPECT_EQ(trials[i].values[1], (std::pair<std::string, std::string>{"training.micro_batch_size", batch[i / 2]}));
    EXPECT_EQ(trials[i].values[2], (std::pair<std::string, std::string>{"optimizer.lr", lr[i / 2]}));
  }
  // Without random axes the count is ignored: one trial per grid point.
  EXPECT_EQ(expand(load_sweep(write("base: base.yaml\naxes:\n  a.b: {grid: [1, 2, 3]}\nrandom: {count: 5}\n"))).size(), 3u);
}

TEST_F(SweepTest, BadFilesNameTheKey) {
  const std::string file = (dir_ / "sweep.yaml").string();
  EXPECT_EQ(error_of("base: base.yaml\nlinked:\n  - {a.x: [1, 2], a.y: [1]}\n"), file + ": linked[0].a.y: 1 values, the group's first key has 2");
  EXPECT_EQ(error_of("base: base.yaml\naxes:\n  a.x: {normal: [0, 1]}\n"), file + ": axes.a.x: unknown axis kind 'normal' (grid, choice, uniform, log_uniform)");
  EXPECT_EQ(error_of("base: base.yaml\naxes:\n  a.x: {log_uniform: [0, 1]}\n"), file + ": axes.a.x.log_uniform: low must be > 0 on a log scale");
  EXPECT_EQ(error_of("base: base.yaml\naxes:\n  a.x: {grid: [1]}\nlinked:\n  - {a.x: [1], a.y: [2]}\n"), file + ": a.x: swept twice");
  EXPECT_EQ(error_of("base: nowhere.yaml\n"), file + ": base: " + (dir_ / "nowhere.yaml").string() + " does not exist");
  EXPECT_EQ(error_of("base: base.yaml\nrandom_count: 3\n"), file + ": random_count: unknown key");
  EXPECT_EQ(error_of("base: base.yaml\nsearch: {method: asha, min_steps: 4, budget: {hours: 1}}\n"), file + ": search.budget: unknown unit 'hours' (tokens, gpu_hours, usd)");
  EXPECT_EQ(error_of("base: base.yaml\nranks: 2\nparallel_ranks: 1\n"), file + ": parallel_ranks: must be >= ranks (2)");
}

TEST(Asha, RungsShrinkByEtaAndEndAtTheFullLength) {
  const auto rungs = asha_rungs(8, 4, 2, 16);
  ASSERT_EQ(rungs.size(), 3u);
  EXPECT_EQ(rungs[0].steps, 4);
  EXPECT_EQ(rungs[0].trials, 8);
  EXPECT_EQ(rungs[1].steps, 8);
  EXPECT_EQ(rungs[1].trials, 4);
  EXPECT_EQ(rungs[2].steps, 16);
  EXPECT_EQ(rungs[2].trials, 2);
  const auto thirds = asha_rungs(10, 5, 3, 100);  // 10 -> 4 -> 2 -> 1, steps 5, 15, 45, 100
  ASSERT_EQ(thirds.size(), 4u);
  EXPECT_EQ(thirds[1].trials, 4);
  EXPECT_EQ(thirds[2].trials, 2);
  EXPECT_EQ(thirds[3].trials, 1);
  EXPECT_EQ(thirds[3].steps, 100);
  EXPECT_EQ(asha_rungs(1, 4, 2, 16).size(), 1u);  // one trial: nothing to halve
}

TEST(SweepRandom, SplitMixIsPinned) {
  // The draws a sweep file gives must not change between versions or machines.
  EXPECT_EQ(format_value(sweep_uniform(1, 0, 0)), format_value(sweep_uniform(1, 0, 0)));
  EXPECT_NE(sweep_uniform(1, 0, 0), sweep_uniform(1, 0, 1));
  EXPECT_NE(sweep_uniform(1, 0, 0), sweep_uniform(1, 1, 0));
  EXPECT_EQ(format_value(sweep_uniform(1, 0, 0)), "0.6935");  // SplitMix64 computed independently (Python)
  EXPECT_EQ(format_value(sweep_uniform(7, 3, 2)), "0.03624");
}

TEST_F(SweepTest, TrialRecordsAndSpend) {
  std::ofstream(dir_ / "metrics.jsonl") << R"({"step":1,"loss":5.0,"tokens_seen":256,"gpu_hours":0.001,"tokens_per_second":1000})" "\n"
                                        << R"({"step":2,"loss":4.0,"tokens_seen":512,"gpu_hours":0.002,"tokens_per_second":3000,"val_loss":4.5})" "\n"
                                        << R"({"step":3,"loss":3.5,"tokens_seen":768,"gpu_hours":0.004,"tokens_per_second":2000,"val_loss":4.7})" "\n"
                                        << R"({"step":4,"lo)";  // a torn line from a kill
  const TrialRecord r = read_trial_record(dir_.string(), 2);
  EXPECT_EQ(r.steps, 3);
  EXPECT_EQ(r.tokens, 768);
  EXPECT_DOUBLE_EQ(r.final_val_loss, 4.7);
  EXPECT_DOUBLE_EQ(r.best_val_loss, 4.5);
  EXPECT_DOUBLE_EQ(r.final_loss, 3.5);
  EXPECT_DOUBLE_EQ(r.seconds, 0.004 * 3600 / 2);
  EXPECT_DOUBLE_EQ(r.tokens_per_second, 2000);
  EXPECT_DOUBLE_EQ(spend_of(r, "tokens", 2.0), 768);
  EXPECT_DOUBLE_EQ(spend_of(r, "gpu_hours", 2.0), 0.004);
  EXPECT_DOUBLE_EQ(spend_of(r, "usd", 2.0), 0.008);
  EXPECT_EQ(read_trial_record((dir_ / "none").string(), 1).steps, 0);  // a trial not started
}

// Successive halving promotes the best by validation loss at the rung's end; a
// trial without one (failed, or never validated) goes last; ties keep their order.
TEST(SweepPromotion, BestByRungLossWithMissingLast) {
  std::vector<TrialRun> runs(5);
  runs[0].rung_val = {{0, 3.0}};
  runs[1].rung_val = {{0, 1.0}};
  runs[2].rung_val = {{0, -1.0}};           // never validated
  runs[3].rung_val = {{0, 2.0}, {1, 0.5}};  // rung 1's figure is not rung 0's
  runs[4].rung_val = {{0, 1.0}};
  const Promotion p = promote(runs, {0, 1, 2, 3, 4}, 0, 2);
  EXPECT_EQ(p.promoted, (std::vector<size_t>{1, 4}));
  EXPECT_EQ(p.dropped, (std::vector<size_t>{3, 0, 2}));
  const Promotion at_rung_1 = promote(runs, {0, 3}, 1, 1);  // trial 0 has no rung-1 loss
  EXPECT_EQ(at_rung_1.promoted, (std::vector<size_t>{3}));
  EXPECT_EQ(at_rung_1.dropped, (std::vector<size_t>{0}));
  EXPECT_EQ(promote(runs, {2, 0}, 0, 5).promoted, (std::vector<size_t>{0, 2}));  // keep beyond the members: all, ordered
}

// trial.json round-trips; a trial the sweep left running resumes as stopped, others keep their state.
TEST(SweepResume, TrialStateRoundTripsAndRunningBecomesStopped) {
  TrialRun t;
  t.trial.values = {{"optimizer.lr", "0.001"}, {"model.top_k", "2"}};
  t.state = "running";
  t.launches = 3;
  t.rung = 1;
  t.rung_val = {{0, 4.5}, {1, 3.25}};
  const nlohmann::json j = trial_state_json(t);
  EXPECT_EQ(j["values"]["optimizer.lr"], "0.001");
  TrialRun back;
  restore_trial_state(back, j);
  EXPECT_EQ(back.state, "stopped");
  EXPECT_EQ(back.launches, 3);
  EXPECT_EQ(back.rung, 1);
  EXPECT_EQ(back.rung_val, t.rung_val);
  for (const std::string state : {"done", "pruned", "failed", "stopped"}) {
    t.state = state;
    TrialRun again;
    restore_trial_state(again, trial_state_json(t));
    EXPECT_EQ(again.state, state);
  }
  TrialRun fresh;
  restore_trial_state(fresh, nlohmann::json::object());  // a trial.json from before any launch field
  EXPECT_EQ(fresh.state, "pending");
  EXPECT_EQ(fresh.launches, 0);
}

}  // namespace

#include "launch/sweep_runner.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <thread>

#include "common/file_util.h"
#include "config/config.h"
#include "launch/plots.h"

namespace fmoe::launch {
namespace {

namespace fs = std::filesystem;

std::string train_binary() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return ec ? "moe-train" : (self.parent_path() / "moe-train").string();
}

void save_trial_state(const TrialRun& t) { common::write_file_atomic(t.dir + "/trial.json", trial_state_json(t).dump(2) + "\n"); }

void load_trial_state(TrialRun& t) {
  const std::string path = t.dir + "/trial.json";
  if (!fs::exists(path)) return;
  const nlohmann::json j = nlohmann::json::parse(common::read_file(path), nullptr, false);
  if (!j.is_discarded()) restore_trial_state(t, j);
}

}  // namespace

nlohmann::json trial_state_json(const TrialRun& t) {
  nlohmann::json j = {{"state", t.state}, {"launches", t.launches}, {"rung", t.rung}, {"values", nlohmann::json::object()}};
  for (const auto& [k, v] : t.trial.values) j["values"][k] = v;
  for (const auto& [r, v] : t.rung_val) j["rung_val_loss"][std::to_string(r)] = v;
  return j;
}

void restore_trial_state(TrialRun& t, const nlohmann::json& j) {
  t.state = j.value("state", t.state);
  if (t.state == "running") t.state = "stopped";  // the sweep itself died: resume it
  t.launches = j.value("launches", int64_t{0});
  t.rung = j.value("rung", int64_t{0});
  if (j.contains("rung_val_loss")) {
    for (const auto& [r, v] : j["rung_val_loss"].items()) t.rung_val[std::stoll(r)] = v.get<double>();
  }
}

Promotion promote(const std::vector<TrialRun>& runs, std::vector<size_t> members, int64_t rung, int64_t keep) {
  const auto loss = [&](size_t i) {
    const auto it = runs[i].rung_val.find(rung);
    return it == runs[i].rung_val.end() || it->second < 0 ? std::numeric_limits<double>::infinity() : it->second;
  };
  std::stable_sort(members.begin(), members.end(), [&](size_t a, size_t b) { return loss(a) < loss(b); });
  const size_t kept = std::min(members.size(), static_cast<size_t>(std::max<int64_t>(0, keep)));
  Promotion p;
  p.promoted.assign(members.begin(), members.begin() + static_cast<long>(kept));
  p.dropped.assign(members.begin() + static_cast<long>(kept), members.end());
  return p;
}

SweepRunner::SweepRunner(SweepSpec spec, const std::atomic<bool>& stop) : spec_(std::move(spec)), stop_(stop), train_(train_binary()) {}

// Resolves every trial's config (a bad key or value fails here, naming it) and checks the out_dir.
void SweepRunner::prepare(bool dry_run) {
  const std::vector<Trial> trials = expand(spec_);
  const int64_t threads = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()) / spec_.parallel_ranks);
  for (const Trial& trial : trials) {
    TrialRun t;
    t.trial = trial;
    t.dir = (fs::path(spec_.out_dir) / trial.name).string();
    std::vector<std::string> overrides = spec_.overrides;
    // The sweep's ranks share the cores, unless the sweep file sets the threads itself.
    if (std::none_of(overrides.begin(), overrides.end(), [](const std::string& o) { return o.rfind("training.threads=", 0) == 0; })) {
      overrides.push_back("training.threads=" + std::to_string(threads));
    }
    for (const std::string& o : trial.overrides()) overrides.push_back(o);
    overrides.push_back("training.run_dir=" + t.dir);
    config::Config config;
    try {
      config = config::load_config(spec_.base, overrides);
    } catch (const std::exception& e) {
      throw std::runtime_error(spec_.path + ": " + trial.name + ": " + e.what());
    }
    if (spec_.search.method == "asha") {
      // Validation at every rung's end: the promotion compares it.
      if (config.training.eval_interval <= 0 || spec_.search.min_steps % config.training.eval_interval != 0) {
        config.training.eval_interval = spec_.search.min_steps;
      }
      if (spec_.search.budget_unit == "usd" && config.budget.usd_per_gpu_hour <= 0) {
        throw std::runtime_error(spec_.path + ": search.budget.usd: the base config prices no GPU-hour (budget.usd_per_gpu_hour)");
      }
    }
    t.steps = config.training.steps;
    if (t.steps <= 0) throw std::runtime_error(spec_.path + ": " + trial.name + ": training.steps must be fixed (> 0) in a sweep");
    t.usd_per_gpu_hour = config.budget.usd_per_gpu_hour;
    configs_.push_back(config::to_yaml(config));
    runs_.push_back(std::move(t));
  }
  if (dry_run) return;
  fs::create_directories(spec_.out_dir);
  // The out_dir belongs to one sweep: the same trials, or an error naming the first difference.
  const std::string manifest_path = spec_.out_dir + "/sweep.json";
  nlohmann::json manifest = {{"sweep", spec_.path}, {"base", spec_.base}, {"trials", nlohmann::json::array()}};
  for (const TrialRun& t : runs_) {
    nlohmann::json values = nlohmann::json::object();
    for (const auto& [k, v] : t.trial.values) values[k] = v;
    manifest["trials"].push_back({{"name", t.trial.name}, {"values", values}});
  }
  if (fs::exists(manifest_path)) {
    const nlohmann::json old = nlohmann::json::parse(common::read_file(manifest_path), nullptr, false);
    if (old.is_discarded() || old.value("trials", nlohmann::json()) != manifest["trials"]) {
      throw std::runtime_error(manifest_path + ": holds the trials of a different sweep (other axes, values or seed); use another out_dir");
    }
  }
  common::write_file_atomic(manifest_path, manifest.dump(2) + "\n");
  for (size_t i = 0; i < runs_.size(); ++i) {
    fs::create_directories(runs_[i].dir);
    common::write_file_atomic(runs_[i].dir + "/config.yaml", configs_[i]);
    load_trial_state(runs_[i]);
    runs_[i].record = read_trial_record(runs_[i].dir, spec_.ranks);
  }
}

void SweepRunner::print_trials() const {
  for (const TrialRun& t : runs_) {
    std::string values;
    for (const auto& [k, v] : t.trial.values) values += " " + k + "=" + v;
    std::printf("%s%s\n", t.trial.name.c_str(), values.c_str());
  }
  std::printf("%zu trials of %lld steps, %lld rank%s each\n", runs_.size(), static_cast<long long>(runs_.front().steps),
              static_cast<long long>(spec_.ranks), spec_.ranks > 1 ? "s" : "");
}

// Returns 0 when every trial finished (or the budget is spent), 1 when interrupted or a trial failed.
int SweepRunner::run() {
  if (spec_.search.method == "asha") return run_asha();
  std::vector<size_t> queue;
  for (size_t i = 0; i < runs_.size(); ++i) {
    if (runs_[i].state != "done") queue.push_back(i);
  }
  run_jobs(queue, [this](size_t i) { return std::pair<int64_t, std::vector<std::string>>{runs_[i].steps, {}}; });
  write_summary();
  if (stop_) {
    std::printf("moe-sweep: stopped; run it again to resume\n");
    return 1;
  }
  const bool failed = std::any_of(runs_.begin(), runs_.end(), [](const TrialRun& t) { return t.state == "failed"; });
  std::printf("moe-sweep: %s; summary in %s/summary.md\n", failed ? "finished with failed trials" : "all trials done", spec_.out_dir.c_str());
  return failed ? 1 : 0;
}

// Runs the listed trials, each to the step target(i) names (with extra
// trainer flags), at most parallel_ranks ranks at once, a summary after each.
template <typename Target>
void SweepRunner::run_jobs(const std::vector<size_t>& queue, Target target) {
  std::map<pid_t, size_t> running;
  size_t next = 0;
  while ((next < queue.size() && !stop_) || !running.empty()) {
    while (!stop_ && next < queue.size() && static_cast<int64_t>(running.size() + 1) * spec_.ranks <= spec_.parallel_ranks) {
      const size_t i = queue[next++];
      const auto [until, extra] = target(i);
      running[launch(runs_[i], until, extra)] = i;
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0 && running.count(pid)) {
      finish(runs_[running[pid]], status);
      running.erase(pid);
      write_summary();
      continue;
    }
    if (stop_ && !stop_sent_) {
      for (const auto& [child, i] : running) kill(child, SIGTERM);  // mpirun passes it on: each rank checkpoints
      stop_sent_ = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

pid_t SweepRunner::launch(TrialRun& t, int64_t until, const std::vector<std::string>& extra) {
  const bool resume = fs::exists(t.dir + "/checkpoints/latest");
  std::vector<std::string> args{"mpirun"};
  args.insert(args.end(), spec_.mpirun_args.begin(), spec_.mpirun_args.end());
  for (const std::string& a : {std::string("-np"), std::to_string(spec_.ranks), train_, std::string("--config"), t.dir + "/config.yaml"}) args.push_back(a);
  args.insert(args.end(), extra.begin(), extra.end());
  if (until < t.steps) args.insert(args.end(), {"--stop-at", std::to_string(until)});
  if (resume) args.push_back("--resume");
  t.state = "running";
  ++t.launches;
  save_trial_state(t);
  std::string line;
  for (const std::string& a : args) line += " " + a;
  std::printf("moe-sweep: %s%s:%s\n", t.trial.name.c_str(), resume ? " (resumed)" : "", line.c_str());
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    const std::string log = t.dir + "/train.log";
    if (!freopen(log.c_str(), "a", stdout) || !freopen(log.c_str(), "a", stderr)) _exit(127);
    if (geteuid() == 0) {  // Open MPI refuses root unless told
      setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
      setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    }
    setpgid(0, 0);  // its own process group: a Ctrl-C reaches the sweep, which stops its trials in order
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execvp("mpirun", argv.data());
    std::fprintf(stderr, "moe-sweep: cannot run mpirun\n");
    _exit(127);
  }
  if (pid < 0) throw std::runtime_error("moe-sweep: fork failed");
  return pid;
}

void SweepRunner::finish(TrialRun& t, int status) {
  t.record = read_trial_record(t.dir, spec_.ranks);
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (t.record.steps >= t.steps) {
    t.state = "done";
  } else if (ok || stop_) {
    t.state = "stopped";  // at a rung's end, at the budget, or on request: resumable
  } else {
    t.state = "failed";
    std::fprintf(stderr, "moe-sweep: %s failed (exit %d); its log: %s/train.log\n", t.trial.name.c_str(),
                 WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), t.dir.c_str());
  }
  save_trial_state(t);
  std::printf("moe-sweep: %s %s at step %lld%s\n", t.trial.name.c_str(), t.state.c_str(), static_cast<long long>(t.record.steps),
              t.record.final_val_loss >= 0 ? (", val_loss " + format_value(t.record.final_val_loss)).c_str() : "");
  std::fflush(stdout);
}

std::string SweepRunner::amount(double value) const {
  if (spec_.search.budget_unit != "tokens") return format_value(value);
  return std::to_string(static_cast<long long>(std::llround(value)));
}

double SweepRunner::spent() const {
  double total = 0;
  for (const TrialRun& t : runs_) total += spend_of(t.record, spec_.search.budget_unit, t.usd_per_gpu_hour);
  return total;
}

// Successive halving: every trial to the first rung, then the best 1/eta by
// validation loss to the next, each run stopped at its rung with a checkpoint
// and resumed for the next; each launch carries the budget still unspent as
// its trainer's limit, so the sweep overshoots by at most a step.
int SweepRunner::run_asha() {
  const std::vector<Rung> rungs = asha_rungs(static_cast<int64_t>(runs_.size()), spec_.search.min_steps, spec_.search.eta, runs_.front().steps);
  std::vector<size_t> members(runs_.size());
  for (size_t i = 0; i < runs_.size(); ++i) members[i] = i;
  bool budget_out = false;
  for (size_t r = 0; r < rungs.size() && !stop_ && !budget_out; ++r) {
    if (r > 0) {
      // The best ceil(n / eta) by validation loss at the previous rung's end.
      const Promotion promotion = promote(runs_, members, static_cast<int64_t>(r - 1), rungs[r].trials);
      for (size_t i : promotion.dropped) {
        if (runs_[i].state != "done") runs_[i].state = "pruned", save_trial_state(runs_[i]);
      }
      members = promotion.promoted;
    }
    std::printf("moe-sweep: rung %zu: %zu trial%s to step %lld (spent %s of %s %s)\n", r, members.size(), members.size() > 1 ? "s" : "",
                static_cast<long long>(rungs[r].steps), amount(spent()).c_str(), amount(spec_.search.budget).c_str(),
                spec_.search.budget_unit.c_str());
    std::fflush(stdout);
    std::vector<size_t> todo;
    for (size_t i : members) {
      if (runs_[i].record.steps < rungs[r].steps && runs_[i].state != "done") todo.push_back(i);
    }
    // One at a time, so each launch knows what is left of the budget.
    for (size_t i : todo) {
      if (stop_) break;
      const double left = spec_.search.budget - spent();
      if (left <= 0) {
        budget_out = true;
        break;
      }
      const double limit = spend_of(runs_[i].record, spec_.search.budget_unit, runs_[i].usd_per_gpu_hour) + left;
      const std::string key = spec_.search.budget_unit == "tokens" ? "budget.max_tokens" : spec_.search.budget_unit == "gpu_hours" ? "budget.max_gpu_hours" : "budget.max_usd";
      char value[64];
      std::snprintf(value, sizeof(value), spec_.search.budget_unit == "tokens" ? "%.0f" : "%.9g", spec_.search.budget_unit == "tokens" ? std::floor(limit) : limit);
      run_jobs({i}, [&](size_t) { return std::pair<int64_t, std::vector<std::string>>{rungs[r].steps, {"--set", key + "=" + value}}; });
      if (runs_[i].state == "failed") break;
      if (runs_[i].record.steps >= rungs[r].steps || runs_[i].state == "done") {
        runs_[i].rung = static_cast<int64_t>(r);
        runs_[i].rung_val[static_cast<int64_t>(r)] = runs_[i].record.final_val_loss;
        save_trial_state(runs_[i]);
      } else if (!stop_) {
        budget_out = true;  // stopped short of its rung: the budget is spent
      }
    }
    write_summary();  // the rung's pruned trials
  }
  std::printf("moe-sweep: %s: spent %s of %s %s; summary in %s/summary.md\n", stop_ ? "stopped (run it again to resume)" : budget_out ? "budget spent" : "done",
              amount(spent()).c_str(), amount(spec_.search.budget).c_str(), spec_.search.budget_unit.c_str(), spec_.out_dir.c_str());
  return stop_ ? 1 : 0;
}

// summary.md and summary.csv sorted by best validation loss, and the charts.
void SweepRunner::write_summary() const {
  std::vector<const TrialRun*> order;
  for (const TrialRun& t : runs_) order.push_back(&t);
  const auto key = [](const TrialRun* t) { return t->record.best_val_loss < 0 ? std::numeric_limits<double>::infinity() : t->record.best_val_loss; };
  std::stable_sort(order.begin(), order.end(), [&](const TrialRun* a, const TrialRun* b) { return key(a) < key(b); });
  std::vector<std::string> axes;
  for (const auto& [k, v] : runs_.front().trial.values) axes.push_back(k);
  std::ostringstream csv, md;
  csv << "trial";
  md << "# Sweep " << spec_.path << "\n\nBase config `" << spec_.base << "`, " << runs_.size() << " trials, sorted by best validation loss.\n\n| trial |";
  for (const std::string& a : axes) csv << "," << a, md << " " << a << " |";
  csv << ",final_val_loss,best_val_loss,steps,tokens,seconds,gpu_hours,usd,state\n";
  md << " final val | best val | steps | tokens | time | GPU-hours | $ | state |\n|---|";
  for (size_t i = 0; i < axes.size() + 8; ++i) md << "---|";
  md << "\n";
  const auto num = [](double v) { return v < 0 ? std::string("") : format_value(v); };
  for (const TrialRun* t : order) {
    const TrialRecord& r = t->record;
    csv << t->trial.name;
    md << "| " << t->trial.name << " |";
    for (const auto& [k, v] : t->trial.values) csv << "," << v, md << " " << v << " |";
    const double usd = r.gpu_hours * t->usd_per_gpu_hour;
    csv << "," << num(r.final_val_loss) << "," << num(r.best_val_loss) << "," << r.steps << "," << r.tokens << "," << format_value(r.seconds) << ","
        << format_value(r.gpu_hours) << "," << (t->usd_per_gpu_hour > 0 ? format_value(usd) : "") << "," << t->state << "\n";
    md << " " << num(r.final_val_loss) << " | " << num(r.best_val_loss) << " | " << r.steps << " | " << r.tokens << " | " << format_value(r.seconds)
       << " s | " << format_value(r.gpu_hours) << " | " << (t->usd_per_gpu_hour > 0 ? format_value(usd) : "") << " | " << t->state << " |\n";
  }
  md << "\n![loss](loss.png)\n\n![validation loss](val_loss.png)\n";
  for (size_t a = 0; a < axes.size(); ++a) md << "\n![validation loss against " << axes[a] << "](val_vs_axis" << a << ".png)\n";
  common::write_file_atomic(spec_.out_dir + "/summary.csv", csv.str());
  common::write_file_atomic(spec_.out_dir + "/summary.md", md.str());

  // Charts: every trial's curves, the best three in colour; validation loss against each axis.
  std::set<std::string> best;
  for (size_t i = 0; i < order.size() && i < 3; ++i) {
    if (order[i]->record.best_val_loss >= 0) best.insert(order[i]->trial.name);
  }
  std::vector<Series> loss, val;
  for (const TrialRun& t : runs_) {
    Series l{t.trial.name, {}, best.count(t.trial.name) > 0}, v = l;
    std::ifstream in(t.dir + "/metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("step")) continue;
      const double step = j["step"].get<double>();
      if (j.contains("loss")) l.points.emplace_back(step, j["loss"].get<double>());
      if (j.contains("val_loss")) v.points.emplace_back(step, j["val_loss"].get<double>());
    }
    loss.push_back(std::move(l));
    val.push_back(std::move(v));
  }
  draw_lines(spec_.out_dir + "/loss.png", {"Training loss, all trials (best three by validation loss in colour)", "step", "loss"}, loss);
  draw_lines(spec_.out_dir + "/val_loss.png", {"Validation loss, all trials", "step", "validation loss"}, val);
  for (size_t a = 0; a < axes.size(); ++a) {
    const SweepAxis* axis = nullptr;
    for (const SweepAxis& s : spec_.axes) {
      if (s.key == axes[a] || std::find(s.linked_keys.begin(), s.linked_keys.end(), axes[a]) != s.linked_keys.end()) axis = &s;
    }
    Chart chart{"Best validation loss against " + axes[a], axes[a], "best validation loss"};
    chart.points_only = true;
    chart.log_x = axis && axis->kind == "log_uniform";
    std::vector<std::string> categories;  // non-numeric values (a choice of names): plotted by index
    Series points{"trials", {}, false};
    for (const TrialRun& t : runs_) {
      if (t.record.best_val_loss < 0) continue;
      const std::string& text = t.trial.values[a].second;
      char* end = nullptr;
      double x = std::strtod(text.c_str(), &end);
      if (end == text.c_str() || *end != '\0') {
        auto it = std::find(categories.begin(), categories.end(), text);
        if (it == categories.end()) categories.push_back(text), it = categories.end() - 1;
        x = static_cast<double>(it - categories.begin());
      }
      points.points.emplace_back(x, t.record.best_val_loss);
    }
    chart.xtics = categories;
    if (!categories.empty()) chart.log_x = false;
    draw_lines(spec_.out_dir + "/val_vs_axis" + std::to_string(a) + ".png", chart, {points});
  }
}

}  // namespace fmoe::launch

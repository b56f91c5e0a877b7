#include <nlohmann/json.hpp>

#include <cstdio>
#include <sstream>
#include <string>

#include "plan/plan.h"

// A plan as moe-plan prints it: the table, and the same figures as JSON.
namespace fmoe::plan {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string human_bytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f GiB", bytes / kGiB);
  return text;
}

std::string human_count(double n) {
  char text[32];
  if (n >= 1e12) {
    std::snprintf(text, sizeof(text), "%.2fT", n / 1e12);
  } else if (n >= 1e9) {
    std::snprintf(text, sizeof(text), "%.2fB", n / 1e9);
  } else if (n >= 1e6) {
    std::snprintf(text, sizeof(text), "%.2fM", n / 1e6);
  } else {
    std::snprintf(text, sizeof(text), "%.0f", n);
  }
  return text;
}

}  // namespace

std::string format_plan(const Plan& p, const ClusterSpec& c, const Assumptions& a) {
  std::ostringstream out;
  char line[256];
  const auto row = [&](const char* label, const std::string& value) {
    std::snprintf(line, sizeof(line), "  %-34s %s\n", label, value.c_str());
    out << line;
  };
  const auto seconds = [](double s) {
    char t[48];
    std::snprintf(t, sizeof(t), "%.4g s", s);
    return std::string(t);
  };
  out << "model\n";
  row("parameters (total, with MTP)", human_count(p.params_total));
  row("activated per token", human_count(p.params_activated));
  std::snprintf(line, sizeof(line), "%.4g GFLOP", p.flops_per_token / 1e9);
  row("training FLOPs per token", line);
  out << "layout on " << p.layout.gpus() << " x " << c.name << "\n";
  row("degrees", p.layout.describe());
  std::snprintf(line, sizeof(line), "%s tokens", human_count(p.tokens_per_step).c_str());
  row("global batch", line);
  if (!p.stage_layout.empty()) {
    std::snprintf(line, sizeof(line), " (costliest %.3gx the mean)", p.stage_imbalance);
    row("stages", p.stage_layout + line);
  }
  out << "memory per GPU (busiest stage)\n";
  row("weights (BF16)", human_bytes(p.memory.weights));
  row("gradients", human_bytes(p.memory.grads));
  row("master weights", human_bytes(p.memory.master));
  row("optimizer states", human_bytes(p.memory.optimizer));
  row("activations", human_bytes(p.memory.activations));
  if (p.memory.comm_buffers > 0) row("communication buffers", human_bytes(p.memory.comm_buffers));
  if (p.memory.runtime > 0) row("runtime (libraries, context)", human_bytes(p.memory.runtime));
  std::snprintf(line, sizeof(line), "%s of %.1f GiB usable: %s", human_bytes(p.memory.total()).c_str(), c.hbm_gib * a.memory_headroom,
                p.fits ? "fits" : "DOES NOT FIT");
  row("total", line);
  out << "communication per GPU per step\n";
  const auto comm = [&](const char* label, double bytes, double secs) {
    row(label, human_bytes(bytes) + " in " + seconds(secs));
  };
  comm("tp all-reduce", p.comm.tp_bytes, p.comm.tp_seconds);
  comm("ep all-to-all", p.comm.ep_bytes, p.comm.ep_seconds);
  comm("pp send/recv", p.comm.pp_bytes, p.comm.pp_seconds);
  comm("dp reduce-scatter/all-gather", p.comm.dp_bytes, p.comm.dp_seconds);
  out << "time\n";
  row("compute per step", seconds(p.compute_seconds) + " (GEMMs " + seconds(p.gemm_seconds) + ", element-wise " +
                               seconds(p.elementwise_seconds) + ": " + human_bytes(p.elementwise_bytes) + " through memory)");
  row("optimizer update", seconds(p.optimizer_seconds) + " (" + human_bytes(p.optimizer_bytes) + " through memory)");
  if (p.newton_schulz_flops > 0) {
    row("Muon's Newton-Schulz", seconds(p.newton_schulz_seconds) + " (" + std::to_string(static_cast<int64_t>(p.newton_schulz_flops / 1e9)) +
                                    " GFLOP per rank per step)");
  }
  std::snprintf(line, sizeof(line), "%.1f%%", 100 * p.bubble_fraction);
  const std::string bubble = p.pipeline_schedule.empty() ? "pipeline bubble" : "pipeline bubble (" + p.pipeline_schedule + ", simulated)";
  row(bubble.c_str(), line);
  std::snprintf(line, sizeof(line), "%s of %s (the rest hidden as assumed below)", seconds(p.comm_exposed_seconds).c_str(),
                seconds(p.comm_seconds).c_str());
  row("communication on the step", line);
  if (p.collectives > 0 && c.collective_latency_us + c.oversubscribed_latency_us > 0) {
    std::snprintf(line, sizeof(line), "%.0f a step, %s of their communication time", p.collectives,
                  seconds(p.latency_seconds).c_str());
    row("blocking collectives (latency)", line);
  }
  row("step", seconds(p.step_seconds));
  std::snprintf(line, sizeof(line), "%.1f%%", 100 * p.mfu);
  row("MFU", line);
  out << "cost\n";
  std::snprintf(line, sizeof(line), "%s tokens", human_count(p.tokens).c_str());
  row("tokens", line);
  std::snprintf(line, sizeof(line), "%.4g", p.gpu_hours);
  row("GPU-hours", line);
  std::snprintf(line, sizeof(line), "$%.4g at $%.2f per GPU-hour", p.usd, c.usd_per_gpu_hour);
  row("cost", line);
  std::snprintf(line, sizeof(line),
                "assumes GEMMs at %.0f%% of peak; hidden behind compute: %.0f%% of ep, %.0f%% of dp, %.0f%% of tp traffic, all "
                "pp traffic; %.0f%% of HBM usable; busiest expert at %.1fx the mean",
                100 * a.gemm_efficiency, 100 * a.ep_overlap, 100 * a.dp_overlap, 100 * a.tp_overlap, 100 * a.memory_headroom,
                a.moe_imbalance);
  out << line;
  if (c.device == "cpu") {
    std::snprintf(line, sizeof(line), "; a rank of several threads at %.0f%% of its cores", 100 * a.thread_efficiency);
    out << line;
  }
  out << "\n";
  return out.str();
}

std::string plan_json(const Plan& p, const ClusterSpec& c, const Assumptions& a) {
  const nlohmann::json j = {
      {"cluster", c.name},
      {"gpus", p.layout.gpus()},
      {"layout", {{"tp", p.layout.tp}, {"pp", p.layout.pp}, {"ep", p.layout.ep}, {"dp", p.layout.dp},
                  {"zero1", p.layout.zero1}, {"micro_batch_size", p.layout.micro_batch_size},
                  {"num_micro_batches", p.layout.num_micro_batches}, {"virtual_pp", p.layout.virtual_pp},
                  {"recompute", p.layout.recompute}}},
      {"params_total", p.params_total},
      {"params_activated", p.params_activated},
      {"flops_per_token", p.flops_per_token},
      {"tokens_per_step", p.tokens_per_step},
      {"memory_bytes", {{"weights", p.memory.weights}, {"grads", p.memory.grads}, {"master", p.memory.master},
                        {"optimizer", p.memory.optimizer}, {"activations", p.memory.activations}, {"comm_buffers", p.memory.comm_buffers},
                        {"runtime", p.memory.runtime}, {"total", p.memory.total()}}},
      {"fits", p.fits},
      {"comm_bytes", {{"tp", p.comm.tp_bytes}, {"ep", p.comm.ep_bytes}, {"pp", p.comm.pp_bytes}, {"dp", p.comm.dp_bytes}}},
      {"comm_seconds", {{"tp", p.comm.tp_seconds}, {"ep", p.comm.ep_seconds}, {"pp", p.comm.pp_seconds}, {"dp", p.comm.dp_seconds}}},
      {"bubble_fraction", p.bubble_fraction},
      {"pipeline_schedule", p.pipeline_schedule},
      {"stage_layout", p.stage_layout},
      {"stage_imbalance", p.stage_imbalance},
      {"peak_in_flight", p.peak_in_flight},
      {"compute_seconds", p.compute_seconds}, {"gemm_seconds", p.gemm_seconds},
      {"elementwise_seconds", p.elementwise_seconds}, {"elementwise_bytes", p.elementwise_bytes},
      {"collectives", p.collectives}, {"latency_seconds", p.latency_seconds},
      {"newton_schulz_seconds", p.newton_schulz_seconds},
      {"optimizer_seconds", p.optimizer_seconds}, {"optimizer_bytes", p.optimizer_bytes},
      {"step_seconds", p.step_seconds},
      {"comm_total_seconds", p.comm_seconds},
      {"comm_exposed_seconds", p.comm_exposed_seconds},
      {"mfu", p.mfu},
      {"tokens", p.tokens},
      {"gpu_hours", p.gpu_hours},
      {"usd", p.usd},
      {"assumptions", {{"gemm_efficiency", a.gemm_efficiency}, {"ep_overlap", a.ep_overlap}, {"dp_overlap", a.dp_overlap},
                       {"tp_overlap", a.tp_overlap}, {"moe_imbalance", a.moe_imbalance}, {"memory_headroom", a.memory_headroom},
                       {"thread_efficiency", a.thread_efficiency}}},
  };
  return j.dump(2);
}

}  // namespace fmoe::plan

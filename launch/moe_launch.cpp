// moe-launch: starts moe-train on several machines. From a hostfile (or the
// Slurm allocation it runs in) it builds the mpirun line — ranks per node,
// block placement, binding, NCCL / FMOE / OMP environment passed through —
// prints the mesh each rank will get and the node it sits on, so a user sees
// which groups cross nodes before anything trains, then runs it.
//
//   moe-launch --config FILE [--set k=v]... [--hostfile FILE | --slurm] [--ranks-per-node K]
//              [--mpirun-args "ARGS"] [--dry-run] [-- TRAINER ARGS (e.g. --resume)]
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/test_hooks.h"
#include "launch/cli.h"
#include "parallel/mesh.h"
#include "parallel/topology.h"
#include "config/config.h"

extern char** environ;
namespace fs = std::filesystem;

namespace {

constexpr const char* kUsage =
    "usage: moe-launch --config FILE [--set key=value]... [--hostfile FILE | --slurm] [--ranks-per-node K]\n"
    "                  [--mpirun-args \"ARGS\"] [--dry-run] [-- MOE-TRAIN ARGS]\n"
    "  --hostfile: lines 'host slots=N' (Open MPI's format); --slurm: the allocation this runs in\n"
    "  (SLURM_JOB_NODELIST, SLURM_NTASKS_PER_NODE); neither: this machine. --ranks-per-node defaults to the\n"
    "  slots (or Slurm's tasks per node). Prints the mesh and each rank's node, then runs mpirun;\n"
    "  --dry-run prints the mpirun line instead. Everything after -- goes to moe-train.\n";

struct Node {
  std::string host;
  int slots = 0;
};

std::vector<Node> read_hostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot read the hostfile");
  std::vector<Node> nodes;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    Node node;
    if (!(words >> node.host)) continue;
    node.slots = 1;
    std::string word;
    while (words >> word) {
      if (word.rfind("slots=", 0) == 0) {
        try {
          node.slots = std::stoi(word.substr(6));
        } catch (const std::exception&) {
          node.slots = 0;
        }
        if (node.slots < 1) throw std::runtime_error(path + ":" + std::to_string(number) + ": slots must be a positive number, got '" + word + "'");
      }
    }
    nodes.push_back(node);
  }
  if (nodes.empty()) throw std::runtime_error(path + ": no hosts");
  return nodes;
}

std::string run_and_read(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return "";
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) out.append(buffer, n);
  pclose(pipe);
  return out;
}

std::vector<Node> slurm_nodes() {
  const char* list = std::getenv("SLURM_JOB_NODELIST");
  if (!list) throw std::runtime_error("--slurm: SLURM_JOB_NODELIST is not set (run inside an allocation: sbatch or salloc)");
  std::vector<Node> nodes;
  std::istringstream hosts(run_and_read("scontrol show hostnames '" + std::string(list) + "'"));
  std::string host;
  while (hosts >> host) nodes.push_back({host, 0});
  if (nodes.empty()) throw std::runtime_error("--slurm: scontrol show hostnames '" + std::string(list) + "' listed no hosts");
  if (const char* per_node = std::getenv("SLURM_NTASKS_PER_NODE")) {
    for (Node& n : nodes) n.slots = std::atoi(per_node);
  }
  return nodes;
}

std::vector<std::string> split_words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  std::string word;
  while (in >> word) out.push_back(word);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace fmoe;
  try {
    // Everything after "--" is moe-train's.
    int split = argc;
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]) == "--") {
        split = i;
        break;
      }
    }
    const launch::Args args = launch::parse_args(split, argv, 1, {"dry-run", "slurm", "help"});
    std::vector<std::string> trainer_args(argv + std::min(split + 1, argc), argv + argc);
    if (const int code = launch::check_usage(args, kUsage, {"config"}); code >= 0) return code;
    std::vector<Node> nodes;
    std::string source;
    if (args.has("hostfile")) {
      nodes = read_hostfile(args.get("hostfile"));
      source = args.get("hostfile");
    } else if (args.has("slurm")) {
      nodes = slurm_nodes();
      source = "the Slurm allocation";
    } else {
      char host[256] = {};
      ::gethostname(host, sizeof(host) - 1);
      nodes = {{host, 0}};
      source = "this machine";
    }
    int per_node = args.has("ranks-per-node") ? std::atoi(args.get("ranks-per-node").c_str()) : nodes.front().slots;
    for (const Node& n : nodes) {
      if (!args.has("ranks-per-node") && n.slots != per_node) {
        throw std::runtime_error(source + ": nodes have different slots (" + nodes.front().host + ": " + std::to_string(per_node) + ", " +
                                 n.host + ": " + std::to_string(n.slots) + "); set --ranks-per-node");
      }
    }
    if (per_node < 1) throw std::runtime_error("--ranks-per-node: give the ranks per node (" + source + " does not say)");
    const int world = per_node * static_cast<int>(nodes.size());

    const config::Config config = config::load_config(args.get("config"), args.all("set"));
    parallel::MeshShape shape;
    shape.tp = config.parallel.tp;
    shape.pp = config.parallel.pp;
    shape.ep = config.parallel.ep;
    if (world % (shape.tp * shape.pp) != 0) {
      throw std::runtime_error("parallel.tp: tp x pp = " + std::to_string(shape.tp * shape.pp) + " does not divide the " + std::to_string(world) +
                               " ranks (" + std::to_string(nodes.size()) + " nodes x " + std::to_string(per_node) + ")");
    }
    shape.dp = config.parallel.dp > 0 ? config.parallel.dp : world / (shape.tp * shape.pp);
    if (const std::string why = shape.validate(world); !why.empty()) throw std::runtime_error("parallel." + why);

    // Block placement (--map-by ppr:K:node): ranks 0..K-1 on the first node, and so on.
    std::vector<std::string> node_of_rank;
    for (int r = 0; r < world; ++r) node_of_rank.push_back(nodes[static_cast<size_t>(r / per_node)].host);
    std::printf("moe-launch: %d ranks on %zu node%s (%d per node, from %s), mesh %s\n", world, nodes.size(), nodes.size() > 1 ? "s" : "",
                per_node, source.c_str(), shape.describe().c_str());
    std::printf("  rank  node                  dp  pp  tp  ep\n");
    for (int r = 0; r < world; ++r) {
      const parallel::MeshCoords c = parallel::coords_of(shape, r);
      std::printf("  %4d  %-20s %3lld %3lld %3lld %3lld\n", r, node_of_rank[static_cast<size_t>(r)].c_str(), static_cast<long long>(c.dp),
                  static_cast<long long>(c.pp), static_cast<long long>(c.tp), static_cast<long long>(c.ep));
    }
    for (const std::string& line : parallel::describe_placement(shape, node_of_rank)) std::printf("%s\n", line.c_str());
    const auto& m = config.model;
    if (shape.ep > 1 && m.num_groups > 1 && m.num_experts % m.num_groups == 0 && m.num_experts % shape.ep == 0) {
      std::printf("routing: group_top_k %lld of %lld expert groups: a token's experts sit on at most %d node(s)\n",
                  static_cast<long long>(m.group_top_k), static_cast<long long>(m.num_groups),
                  parallel::max_nodes_per_token(shape, node_of_rank, static_cast<int>(m.num_experts), static_cast<int>(m.num_groups),
                                                static_cast<int>(m.group_top_k)));
    }

    // The mpirun line.
    std::error_code ec;
    const fs::path self = fs::read_symlink("/proc/self/exe", ec);
    const std::string train = ec ? "moe-train" : (self.parent_path() / "moe-train").string();
    std::vector<std::string> command{"mpirun", "-np", std::to_string(world)};
    if (args.has("hostfile")) command.insert(command.end(), {"--hostfile", args.get("hostfile")});
    command.insert(command.end(), {"--map-by", "ppr:" + std::to_string(per_node) + ":node", "--bind-to", "none"});
    // The libraries' own variables by prefix; of ours, only the named test hooks
    // (a misspelt FMOE_ variable would otherwise travel silently and do nothing).
    for (char** e = environ; *e; ++e) {
      const std::string var(*e);
      const std::string name = var.substr(0, var.find('='));
      if (name.rfind("FMOE_", 0) == 0) {
        if (name == "FMOE_LAUNCH") continue;  // launch/slurm/train.sbatch's choice of launcher, read before this runs
        if (common::is_test_hook(name)) {
          command.insert(command.end(), {"-x", name});
        } else {
          std::fprintf(stderr, "moe-launch: warning: %s is not a FrugalMoE variable (docs/test-hooks.md lists them); not passed on\n",
                       name.c_str());
        }
        continue;
      }
      for (const char* prefix : {"NCCL_", "OMP_", "MKL_", "UCX_", "CUDA_VISIBLE_DEVICES", "TORCH_"}) {
        if (name.rfind(prefix, 0) == 0) {
          command.insert(command.end(), {"-x", name});
          break;
        }
      }
    }
    for (const std::string& a : split_words(args.get("mpirun-args"))) command.push_back(a);
    command.insert(command.end(), {train, "--config", args.get("config")});
    for (const std::string& s : args.all("set")) command.insert(command.end(), {"--set", s});
    command.insert(command.end(), trainer_args.begin(), trainer_args.end());
    std::string line;
    for (const std::string& c : command) line += (line.empty() ? "" : " ") + c;
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
    if (args.has("dry-run")) return 0;
    std::vector<char*> exec_args;
    for (std::string& c : command) exec_args.push_back(c.data());
    exec_args.push_back(nullptr);
    execvp("mpirun", exec_args.data());
    throw std::runtime_error("cannot run mpirun (is Open MPI installed and on PATH?)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-launch: error: %s\n", launch::error_message(e).c_str());
    return 1;
  }
}

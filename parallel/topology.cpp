#include "parallel/topology.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "parallel/communicator.h"

namespace fmoe::parallel {

std::vector<std::string> node_names(Communicator& world) {
  constexpr int64_t kMax = 64;
  char host[kMax] = {};
  ::gethostname(host, kMax - 1);
  at::Tensor mine = at::zeros({kMax}, at::kByte);
  std::memcpy(mine.data_ptr(), host, std::strlen(host));
  at::Tensor all = at::empty({world.size() * kMax}, at::kByte);
  world.all_gather(all, mine, {})->wait();
  std::vector<std::string> names;
  for (int r = 0; r < world.size(); ++r) names.emplace_back(reinterpret_cast<const char*>(all.data_ptr<uint8_t>() + r * kMax));
  return names;
}

std::vector<std::vector<int>> mesh_groups(const MeshShape& shape, char axis) {
  std::map<std::vector<int64_t>, std::vector<int>> groups;
  for (int r = 0; r < static_cast<int>(shape.world_size()); ++r) {
    const MeshCoords c = coords_of(shape, r);
    std::vector<int64_t> key;  // the coordinates a group shares
    switch (axis) {
      case 't': key = {c.dp, c.pp}; break;
      case 'd': key = {c.pp, c.tp}; break;
      case 'p': key = {c.dp, c.tp}; break;
      case 'e': key = {c.pp, c.tp, c.edp}; break;
      default: key = {};
    }
    groups[key].push_back(r);
  }
  std::vector<std::vector<int>> out;
  for (auto& [key, ranks] : groups) out.push_back(std::move(ranks));
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::vector<int>> groups_crossing_nodes(const MeshShape& shape, const std::vector<std::string>& node_of_rank, char axis) {
  std::vector<std::vector<int>> out;
  for (const auto& group : mesh_groups(shape, axis)) {
    std::set<std::string> nodes;
    for (int r : group) nodes.insert(node_of_rank.at(static_cast<size_t>(r)));
    if (nodes.size() > 1) out.push_back(group);
  }
  return out;
}

namespace {

std::string ranks_text(const std::vector<int>& ranks) {
  // Runs of consecutive ranks as a-b.
  std::string out;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(ranks[i]) + (j > i ? "-" + std::to_string(ranks[j]) : "");
    i = j + 1;
  }
  return out;
}

}  // namespace

std::vector<std::string> describe_placement(const MeshShape& shape, const std::vector<std::string>& node_of_rank) {
  std::vector<std::string> lines;
  std::vector<std::string> order;
  std::map<std::string, std::vector<int>> ranks_on;
  for (size_t r = 0; r < node_of_rank.size(); ++r) {
    if (!ranks_on.count(node_of_rank[r])) order.push_back(node_of_rank[r]);
    ranks_on[node_of_rank[r]].push_back(static_cast<int>(r));
  }
  std::string nodes = "nodes: " + std::to_string(order.size()) + " (";
  for (size_t i = 0; i < order.size(); ++i) nodes += (i ? ", " : "") + order[i] + ": ranks " + ranks_text(ranks_on[order[i]]);
  lines.push_back(nodes + ")");
  const struct {
    char axis;
    const char* name;
    int64_t size;
  } axes[] = {{'t', "tp", shape.tp}, {'e', "ep", shape.ep}, {'d', "dp", shape.dp}, {'p', "pp", shape.pp}};
  for (const auto& a : axes) {
    if (a.size <= 1) continue;
    const auto groups = mesh_groups(shape, a.axis);
    const auto crossing = groups_crossing_nodes(shape, node_of_rank, a.axis);
    if (crossing.empty()) {
      lines.push_back(std::string(a.name) + " groups: all " + std::to_string(groups.size()) + " inside a node");
      continue;
    }
    std::string text = std::to_string(crossing.size()) + " of " + std::to_string(groups.size()) + " " + a.name +
                       " groups cross nodes (first: ranks " + ranks_text(crossing.front()) + ")";
    if (a.axis == 't') {
      lines.push_back("warning: " + text + ": tensor parallelism all-reduces every layer over the network; "
                      "make the ranks per node a multiple of parallel.tp");
    } else {
      lines.push_back(text);
    }
  }
  return lines;
}

int max_nodes_per_token(const MeshShape& shape, const std::vector<std::string>& node_of_rank, int num_experts, int num_groups,
                        int group_top_k) {
  // Expert e lives on ep rank e / (E / ep); of each ep group, the nodes of its ranks in ep order (the first group's).
  const std::vector<int> ep_ranks = mesh_groups(shape, 'e').front();
  const int per_rank = num_experts / static_cast<int>(shape.ep);
  const int per_group = num_experts / num_groups;
  std::vector<std::set<std::string>> group_nodes(static_cast<size_t>(num_groups));
  for (int e = 0; e < num_experts; ++e) {
    group_nodes[static_cast<size_t>(e / per_group)].insert(node_of_rank.at(static_cast<size_t>(ep_ranks.at(static_cast<size_t>(e / per_rank)))));
  }
  // The worst choice of group_top_k groups: enumerate combinations (num_groups is small: DeepSeek-V3 has 8).
  int worst = 0;
  std::vector<int> pick(static_cast<size_t>(group_top_k));
  for (int i = 0; i < group_top_k; ++i) pick[static_cast<size_t>(i)] = i;
  while (true) {
    std::set<std::string> nodes;
    for (int g : pick) nodes.insert(group_nodes[static_cast<size_t>(g)].begin(), group_nodes[static_cast<size_t>(g)].end());
    worst = std::max(worst, static_cast<int>(nodes.size()));
    int i = group_top_k - 1;
    while (i >= 0 && pick[static_cast<size_t>(i)] == num_groups - group_top_k + i) --i;
    if (i < 0) break;
    ++pick[static_cast<size_t>(i)];
    for (int j = i + 1; j < group_top_k; ++j) pick[static_cast<size_t>(j)] = pick[static_cast<size_t>(j - 1)] + 1;
  }
  return worst;
}

}  // namespace fmoe::parallel

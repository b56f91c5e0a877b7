#include <gtest/gtest.h>

#include "parallel/topology.h"

namespace {

using namespace fmoe::parallel;

MeshShape shape_of(int64_t dp, int64_t tp, int64_t ep, int64_t pp = 1) {
  MeshShape s;
  s.dp = dp;
  s.tp = tp;
  s.ep = ep;
  s.pp = pp;
  return s;
}

// Block placement: ranks 0..k-1 on node0, and so on.
std::vector<std::string> blocks(int ranks, int per_node) {
  std::vector<std::string> nodes;
  for (int r = 0; r < ranks; ++r) nodes.push_back("node" + std::to_string(r / per_node));
  return nodes;
}

TEST(Topology, GroupsFollowTheMeshOrder) {
  const MeshShape s = shape_of(2, 2, 1);  // tp fastest, then dp
  EXPECT_EQ(mesh_groups(s, 't'), (std::vector<std::vector<int>>{{0, 1}, {2, 3}}));
  EXPECT_EQ(mesh_groups(s, 'd'), (std::vector<std::vector<int>>{{0, 2}, {1, 3}}));
  const MeshShape e = shape_of(4, 1, 2);  // ep carved out of dp: consecutive dp ranks
  EXPECT_EQ(mesh_groups(e, 'e'), (std::vector<std::vector<int>>{{0, 1}, {2, 3}}));
  const MeshShape p = shape_of(2, 1, 1, 2);  // pp slowest
  EXPECT_EQ(mesh_groups(p, 'p'), (std::vector<std::vector<int>>{{0, 2}, {1, 3}}));
}

TEST(Topology, TensorParallelGroupsCrossingNodesAreWarned) {
  const auto nodes = blocks(4, 2);
  EXPECT_EQ(describe_placement(shape_of(2, 2, 1), nodes),
            (std::vector<std::string>{"nodes: 2 (node0: ranks 0-1, node1: ranks 2-3)", "tp groups: all 2 inside a node",
                                      "2 of 2 dp groups cross nodes (first: ranks 0,2)"}));
  const auto lines = describe_placement(shape_of(1, 4, 1), nodes);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[1].rfind("warning: 1 of 1 tp groups cross nodes (first: ranks 0-3)", 0), 0u) << lines[1];
  EXPECT_EQ(groups_crossing_nodes(shape_of(4, 1, 4), nodes, 'e'), (std::vector<std::vector<int>>{{0, 1, 2, 3}}));
  EXPECT_TRUE(groups_crossing_nodes(shape_of(4, 1, 2), nodes, 'e').empty());  // ep2 pairs stay on their node
}

TEST(Topology, NodeLimitedRoutingBound) {
  // DeepSeek-V3: 256 routed experts over 64 ep ranks on 8 nodes (8 GPUs each),
  // 8 groups (one per node), a token picks 4 groups: at most 4 nodes.
  EXPECT_EQ(max_nodes_per_token(shape_of(64, 1, 64), blocks(64, 8), 256, 8, 4), 4);
  // The same groups on twice as many nodes (4 GPUs each): each group spans 2 nodes, so 8.
  EXPECT_EQ(max_nodes_per_token(shape_of(64, 1, 64), blocks(64, 4), 256, 8, 4), 8);
  // Groups smaller than a node (16 groups, 2 per node): 4 picks reach at most 4 nodes, at least 2.
  EXPECT_EQ(max_nodes_per_token(shape_of(64, 1, 64), blocks(64, 8), 256, 16, 4), 4);
  // One node: always 1.
  EXPECT_EQ(max_nodes_per_token(shape_of(8, 1, 8), blocks(8, 8), 64, 8, 4), 1);
}

}  // namespace

// Where a mesh's groups fall on machines. Ranks know their node (the host
// name, gathered over the world at start; a launcher computes it from the
// placement it asks mpirun for); tensor parallelism belongs inside a node
// (its all-reduces run every layer), expert and data parallelism may cross
// nodes. Pure functions besides node_names: moe-train logs them, moe-launch
// prints them first.
#pragma once

#include <string>
#include <vector>

#include "parallel/mesh.h"

namespace fmoe::parallel {

class Communicator;

// Every rank's node: its host name (up to 63 characters), gathered over world (collective).
std::vector<std::string> node_names(Communicator& world);

// The ranks of every group along one mesh axis ('t' tp, 'd' dp, 'p' pp, 'e' ep), each group's ranks ascending.
std::vector<std::vector<int>> mesh_groups(const MeshShape& shape, char axis);

// The groups along axis whose ranks sit on more than one node.
std::vector<std::vector<int>> groups_crossing_nodes(const MeshShape& shape, const std::vector<std::string>& node_of_rank, char axis);

// "nodes: 2 (a: ranks 0-1, b: ranks 2-3)", then per axis with groups of more
// than one rank whether they stay inside nodes; a tp group that crosses nodes
// is a line starting with "warning:".
std::vector<std::string> describe_placement(const MeshShape& shape, const std::vector<std::string>& node_of_rank);

// The nodes a token's experts can sit on when routing is limited to
// group_top_k of num_groups expert groups: with the routed experts split over
// ep ranks in order, and each ep rank's node known, the largest number of
// distinct nodes any choice of group_top_k groups spans. DeepSeek-V3 bounds
// it at 4 (M) with 8 groups, one per node.
int max_nodes_per_token(const MeshShape& shape, const std::vector<std::string>& node_of_rank, int num_experts, int num_groups,
                        int group_top_k);

}  // namespace fmoe::parallel

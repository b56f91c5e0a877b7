// The device mesh: world = pp x dp x tp ranks with tp fastest (rank order
// tp-dp-pp), expert parallelism carved out of dp. A Mesh is a value passed to
// whatever communicates; there is no global parallel state.
//
//   world rank = tp_rank + tp * (dp_rank + dp * pp_rank)
//   ep_rank    = dp_rank % ep      (ep groups are ep consecutive dp ranks)
//   edp_rank   = dp_rank / ep      (expert-data-parallel: the dp ranks holding the same experts)
//
// Groups: tp (same dp, pp), dp (same tp, pp), pp (same tp, dp), ep (same tp, pp
// and dp_rank / ep), edp (same tp, pp and dp_rank % ep), world.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace fmoe::parallel {

struct MeshShape {
  int64_t dp = 1, pp = 1, tp = 1, ep = 1;
  int64_t world_size() const { return dp * pp * tp; }
  int64_t edp() const { return dp / ep; }
  // Empty when valid for world_size ranks, else "<degree>: why".
  std::string validate(int64_t world_size) const;
  std::string describe() const;  // "dp2 pp1 tp2 ep2"
};

struct MeshCoords {
  int64_t dp = 0, pp = 0, tp = 0, ep = 0, edp = 0;
};
MeshCoords coords_of(const MeshShape& shape, int64_t world_rank);

class Mesh {
 public:
  // Collective over world: every rank calls it with the same shape. Throws
  // std::invalid_argument naming the bad degree.
  Mesh(std::shared_ptr<Communicator> world, const MeshShape& shape);
  // One process, every group of size 1 (no MPI needed).
  static Mesh single();

  const MeshShape& shape() const { return shape_; }
  const MeshCoords& coords() const { return coords_; }
  Communicator& world() const { return *world_; }
  Communicator& tp() const { return *tp_; }
  Communicator& dp() const { return *dp_; }
  Communicator& pp() const { return *pp_; }
  Communicator& ep() const { return *ep_; }
  Communicator& edp() const { return *edp_; }

  // The same mesh with a second lane: collective over world. Every group of the
  // result routes each operation by the calling thread's lane (CommLane): lane 0
  // to this mesh's groups, lane 1 to a duplicate of each, so two threads of a
  // rank (DualPipeV's overlapped forward and backward) communicate at once,
  // each in an order every rank of a group shares.
  Mesh with_second_lane() const;

 private:
  Mesh() = default;
  MeshShape shape_;
  MeshCoords coords_;
  std::shared_ptr<Communicator> world_, tp_, dp_, pp_, ep_, edp_;
};

// The lane of the calling thread's communication (0 unless a CommLane says
// otherwise): what laned groups (Mesh::with_second_lane) route by.
int current_comm_lane();
class CommLane {
 public:
  explicit CommLane(int lane);
  ~CommLane();
  CommLane(const CommLane&) = delete;
  CommLane& operator=(const CommLane&) = delete;

 private:
  int previous_;
};

// Each op to lanes[current_comm_lane()]; both span the same ranks.
std::unique_ptr<Communicator> make_laned_communicator(std::shared_ptr<Communicator> lane0, std::shared_ptr<Communicator> lane1);

// A group of one: collectives copy or leave their input, send/recv throw.
std::unique_ptr<Communicator> make_self_communicator();

}  // namespace fmoe::parallel

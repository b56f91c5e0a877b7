#include "parallel/mesh.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace fmoe::parallel {
namespace {

class SelfCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend_name() const override { return "self"; }
  std::unique_ptr<Work> all_reduce(at::Tensor&, const AllReduceOptions&) override { return done(); }
  std::unique_ptr<Work> broadcast(at::Tensor&, const BroadcastOptions&) override { return done(); }
  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions&) override {
    output.view(-1).copy_(input.reshape(-1));
    return done();
  }
  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions&) override {
    output.view(-1).copy_(input.reshape(-1));
    return done();
  }
  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>&,
                                   const std::vector<int64_t>&, const AllToAllOptions&) override {
    if (output.sizes() != input.sizes()) throw std::invalid_argument("self communicator: all_to_all output must match input");
    output.copy_(input);
    return done();
  }
  std::unique_ptr<Work> send(const at::Tensor&, int, const SendRecvOptions&) override {
    throw std::invalid_argument("self communicator: send needs a peer rank");
  }
  std::unique_ptr<Work> recv(at::Tensor&, int, const SendRecvOptions&) override {
    throw std::invalid_argument("self communicator: recv needs a peer rank");
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int color, int) override {
    return color < 0 ? nullptr : std::make_unique<SelfCommunicator>();
  }

 private:
  static std::unique_ptr<Work> done() { return std::make_unique<CompletedWork>(); }
};

thread_local int comm_lane = 0;

class LanedCommunicator : public Communicator {
 public:
  LanedCommunicator(std::shared_ptr<Communicator> lane0, std::shared_ptr<Communicator> lane1) : lanes_{std::move(lane0), std::move(lane1)} {
    if (lanes_[0]->size() != lanes_[1]->size() || lanes_[0]->rank() != lanes_[1]->rank()) {
      throw std::invalid_argument("laned communicator: the two lanes' groups differ");
    }
    default_timeout_ = lanes_[0]->default_timeout();
  }
  int rank() const override { return lanes_[0]->rank(); }
  int size() const override { return lanes_[0]->size(); }
  std::string backend_name() const override { return lanes_[0]->backend_name(); }
  double wait_seconds() const override { return lanes_[0]->wait_seconds() + lanes_[1]->wait_seconds(); }
  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override { return lane().all_reduce(tensor, options); }
  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override { return lane().broadcast(tensor, options); }
  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    return lane().all_gather(output, input, options);
  }
  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& options) override {
    return lane().reduce_scatter(output, input, options);
  }
  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, const AllToAllOptions& options) override {
    return lane().all_to_all(output, input, output_splits, input_splits, options);
  }
  std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) override { return lane().send(tensor, dst, options); }
  std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) override { return lane().recv(tensor, src, options); }
  std::unique_ptr<Work> send_recv(const std::vector<P2POp>& ops, std::chrono::milliseconds timeout) override {
    return lane().send_recv(ops, timeout);
  }
  void barrier() override { lane().barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    // Collective over both lanes, in this order on every rank.
    std::shared_ptr<Communicator> a = lanes_[0]->split(color, key);
    std::shared_ptr<Communicator> b = lanes_[1]->split(color, key);
    if (!a || !b) return nullptr;
    return std::make_unique<LanedCommunicator>(std::move(a), std::move(b));
  }

 private:
  // Each lane keeps the timeout its group had when the lanes were made.
  Communicator& lane() const { return *lanes_[comm_lane == 1 ? 1 : 0]; }
  std::shared_ptr<Communicator> lanes_[2];
};

}  // namespace

int current_comm_lane() { return comm_lane; }
CommLane::CommLane(int lane) : previous_(comm_lane) { comm_lane = lane; }
CommLane::~CommLane() { comm_lane = previous_; }

std::unique_ptr<Communicator> make_laned_communicator(std::shared_ptr<Communicator> lane0, std::shared_ptr<Communicator> lane1) {
  return std::make_unique<LanedCommunicator>(std::move(lane0), std::move(lane1));
}

Mesh Mesh::with_second_lane() const {
  // A duplicate of every group: the world split again, and the mesh's groups of it.
  const Mesh second(std::shared_ptr<Communicator>(world_->split(0, world_->rank())), shape_);
  Mesh m;
  m.shape_ = shape_;
  m.coords_ = coords_;
  m.world_ = make_laned_communicator(world_, second.world_);
  m.tp_ = make_laned_communicator(tp_, second.tp_);
  m.dp_ = make_laned_communicator(dp_, second.dp_);
  m.pp_ = make_laned_communicator(pp_, second.pp_);
  m.ep_ = make_laned_communicator(ep_, second.ep_);
  m.edp_ = make_laned_communicator(edp_, second.edp_);
  return m;
}

std::string MeshShape::validate(int64_t world_size) const {
  for (const auto& [name, degree] : {std::pair{"dp", dp}, {"pp", pp}, {"tp", tp}, {"ep", ep}}) {
    if (degree < 1) return std::string(name) + ": " + std::to_string(degree) + " must be >= 1";
  }
  if (dp % ep != 0) return "ep: " + std::to_string(ep) + " does not divide dp " + std::to_string(dp) + " (experts are sharded inside data parallelism)";
  if (this->world_size() != world_size) {
    return "dp: dp x pp x tp = " + std::to_string(dp) + " x " + std::to_string(pp) + " x " + std::to_string(tp) + " = " +
           std::to_string(this->world_size()) + ", but the job has " + std::to_string(world_size) + " ranks";
  }
  return {};
}

std::string MeshShape::describe() const {
  return "dp" + std::to_string(dp) + " pp" + std::to_string(pp) + " tp" + std::to_string(tp) + " ep" + std::to_string(ep);
}

MeshCoords coords_of(const MeshShape& s, int64_t rank) {
  MeshCoords c;
  c.tp = rank % s.tp;
  c.dp = (rank / s.tp) % s.dp;
  c.pp = rank / (s.tp * s.dp);
  c.ep = c.dp % s.ep;
  c.edp = c.dp / s.ep;
  return c;
}

Mesh::Mesh(std::shared_ptr<Communicator> world, const MeshShape& shape) : shape_(shape), world_(std::move(world)) {
  const std::string why = shape.validate(world_->size());
  if (!why.empty()) throw std::invalid_argument("parallel." + why);
  const int rank = world_->rank();
  coords_ = coords_of(shape, rank);
  const MeshCoords& c = coords_;
  // Colors number the groups (each below the world size); keys order ranks inside them.
  const int64_t tp_pp = c.pp * shape.tp + c.tp;
  tp_ = world_->split(static_cast<int>(c.pp * shape.dp + c.dp), static_cast<int>(c.tp));
  dp_ = world_->split(static_cast<int>(tp_pp), static_cast<int>(c.dp));
  pp_ = world_->split(static_cast<int>(c.dp * shape.tp + c.tp), static_cast<int>(c.pp));
  ep_ = world_->split(static_cast<int>(tp_pp * shape.edp() + c.edp), static_cast<int>(c.ep));
  edp_ = world_->split(static_cast<int>(tp_pp * shape.ep + c.ep), static_cast<int>(c.edp));
}

Mesh Mesh::single() {
  Mesh m;
  m.world_ = make_self_communicator();
  m.tp_ = m.dp_ = m.pp_ = m.ep_ = m.edp_ = m.world_;
  return m;
}

std::unique_ptr<Communicator> make_self_communicator() { return std::make_unique<SelfCommunicator>(); }

}  // namespace fmoe::parallel

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

}  // namespace

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

#include "parallel/autograd.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <numeric>

namespace fmoe::parallel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The group travels through the autograd context as an address: it outlives the graph.
void remember(AutogradContext* ctx, Communicator& group) {
  ctx->saved_data["group"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(&group));
}
Communicator& group_of(AutogradContext* ctx) {
  return *reinterpret_cast<Communicator*>(static_cast<intptr_t>(ctx->saved_data["group"].toInt()));
}

at::Tensor all_reduce_copy(const at::Tensor& x, Communicator& group) {
  at::Tensor out = x.contiguous().clone();
  group.all_reduce(out, {ReduceOp::kSum})->wait();
  return out;
}

at::Tensor own_slice(const at::Tensor& x, int64_t dim, Communicator& group) {
  const int64_t n = group.size();
  TORCH_CHECK(x.size(dim) % n == 0, "dimension ", dim, " of size ", x.size(dim), " does not split over ", n, " ranks");
  const int64_t part = x.size(dim) / n;
  return x.narrow(dim, group.rank() * part, part).contiguous();
}

class CopyToGroup : public torch::autograd::Function<CopyToGroup> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, Communicator* group) {
    remember(ctx, *group);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {all_reduce_copy(grad[0], group_of(ctx)), at::Tensor()};
  }
};

class ReduceFromGroup : public torch::autograd::Function<ReduceFromGroup> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, Communicator* group) { return all_reduce_copy(x, *group); }
  static variable_list backward(AutogradContext*, variable_list grad) { return {grad[0], at::Tensor()}; }
};

class AllGatherAlong : public torch::autograd::Function<AllGatherAlong> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, Communicator* group, bool reduce_scatter_grad) {
    remember(ctx, *group);
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["rs"] = reduce_scatter_grad;
    return gather_along_dim(x, dim, *group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const int64_t dim = ctx->saved_data["dim"].toInt();
    Communicator& group = group_of(ctx);
    at::Tensor g = ctx->saved_data["rs"].toBool() ? reduce_scatter_dim(grad[0], dim, group) : own_slice(grad[0], dim, group);
    return {g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ScatterAlong : public torch::autograd::Function<ScatterAlong> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, Communicator* group) {
    remember(ctx, *group);
    ctx->saved_data["dim"] = dim;
    return own_slice(x, dim, *group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {gather_along_dim(grad[0], ctx->saved_data["dim"].toInt(), group_of(ctx)), at::Tensor(), at::Tensor()};
  }
};

class ReduceScatterAlong : public torch::autograd::Function<ReduceScatterAlong> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, Communicator* group) {
    remember(ctx, *group);
    ctx->saved_data["dim"] = dim;
    return reduce_scatter_dim(x, dim, *group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {gather_along_dim(grad[0], ctx->saved_data["dim"].toInt(), group_of(ctx)), at::Tensor(), at::Tensor()};
  }
};

class AllToAllRows : public torch::autograd::Function<AllToAllRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::vector<int64_t>& output_splits,
                            const std::vector<int64_t>& input_splits, Communicator* group) {
    remember(ctx, *group);
    ctx->saved_data["out"] = output_splits;
    ctx->saved_data["in"] = input_splits;
    return exchange_rows(x, output_splits, input_splits, *group);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    // The adjoint of a permutation of rows across ranks is the reverse exchange.
    const auto out = ctx->saved_data["out"].toIntVector();
    const auto in = ctx->saved_data["in"].toIntVector();
    return {exchange_rows(grad[0], in, out, group_of(ctx)), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// What the two halves of an overlapped exchange share: the exchange in flight in
// either direction, and the reverse exchange's output until start's backward takes it.
struct PendingExchange {
  Communicator* group = nullptr;
  std::vector<int64_t> output_splits, input_splits;
  std::unique_ptr<Work> forward, backward;
  at::Tensor backward_output;
};

namespace {

class PendingHolder : public torch::CustomClassHolder {
 public:
  explicit PendingHolder(std::shared_ptr<PendingExchange> p) : pending(std::move(p)) {}
  std::shared_ptr<PendingExchange> pending;
};

void remember(AutogradContext* ctx, const std::shared_ptr<PendingExchange>& pending) {
  ctx->saved_data["pending"] = c10::IValue::make_capsule(c10::make_intrusive<PendingHolder>(pending));
}
PendingExchange& pending_of(AutogradContext* ctx) {
  return *c10::static_intrusive_pointer_cast<PendingHolder>(ctx->saved_data["pending"].toCapsule())->pending;
}

at::Tensor rows_buffer(const at::Tensor& like, const std::vector<int64_t>& splits) {
  std::vector<int64_t> shape = like.sizes().vec();
  shape[0] = std::accumulate(splits.begin(), splits.end(), int64_t{0});
  return at::empty(shape, like.options());
}

class StartRows : public torch::autograd::Function<StartRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, std::shared_ptr<PendingExchange> pending) {
    remember(ctx, pending);
    at::Tensor out = rows_buffer(x, pending->output_splits);
    pending->forward = pending->group->all_to_all(out, x.contiguous(), pending->output_splits, pending->input_splits, {});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    // The gradient for x is the output of the reverse exchange finish's backward issued.
    PendingExchange& p = pending_of(ctx);
    TORCH_CHECK(p.backward, "start_all_to_all_rows: backward reached before the reverse exchange was issued");
    p.backward->wait();
    p.backward.reset();
    return {std::move(p.backward_output), at::Tensor()};
  }
};

class FinishRows : public torch::autograd::Function<FinishRows> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& buffer, std::shared_ptr<PendingExchange> pending) {
    remember(ctx, pending);
    TORCH_CHECK(pending->forward, "finish_all_to_all_rows: the exchange was finished already");
    pending->forward->wait();
    pending->forward.reset();
    return buffer.view_as(buffer);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    PendingExchange& p = pending_of(ctx);
    const at::Tensor g = grad[0].contiguous();
    p.backward_output = rows_buffer(g, p.input_splits);
    p.backward = p.group->all_to_all(p.backward_output, g, p.input_splits, p.output_splits, {});
    // Autograd wants this gradient in the received buffer's shape: pass the
    // incoming one on untouched; start's backward, its only consumer, returns the
    // reverse exchange's output instead.
    return {g, at::Tensor()};
  }
};

}  // namespace

RowsInFlight start_all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, Communicator& group) {
  if (group.size() == 1) return {x, nullptr};
  auto pending = std::make_shared<PendingExchange>();
  pending->group = &group;
  pending->output_splits = output_splits;
  pending->input_splits = input_splits;
  at::Tensor buffer = StartRows::apply(x, pending);
  return {std::move(buffer), std::move(pending)};
}

at::Tensor finish_all_to_all_rows(const RowsInFlight& rows) {
  return rows.pending ? FinishRows::apply(rows.buffer, rows.pending) : rows.buffer;
}

at::Tensor gather_along_dim(const at::Tensor& x, int64_t dim, Communicator& group) {
  const int64_t n = group.size();
  if (n == 1) return x;
  dim = at::maybe_wrap_dim(dim, x.dim());
  const at::Tensor in = x.contiguous();
  std::vector<int64_t> stacked = {n};
  for (int64_t s : in.sizes()) stacked.push_back(s);
  at::Tensor out = at::empty(stacked, in.options());
  group.all_gather(out, in, {})->wait();
  if (dim == 0) return out.view([&] {
    std::vector<int64_t> shape = in.sizes().vec();
    shape[0] *= n;
    return shape;
  }());
  // [n, ..., d_dim, ...] -> [..., n, d_dim, ...] -> merge.
  std::vector<int64_t> shape = in.sizes().vec();
  shape[dim] *= n;
  return out.movedim(0, dim).reshape(shape);
}

at::Tensor reduce_scatter_dim(const at::Tensor& x, int64_t dim, Communicator& group) {
  const int64_t n = group.size();
  if (n == 1) return x;
  dim = at::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(x.size(dim) % n == 0, "reduce-scatter: dimension ", dim, " of size ", x.size(dim), " does not split over ", n, " ranks");
  // Rank-major blocks: [..., n * part, ...] -> [n, ..., part, ...].
  std::vector<int64_t> split_shape = x.sizes().vec();
  split_shape[dim] /= n;
  split_shape.insert(split_shape.begin() + dim, n);
  const at::Tensor blocks = x.reshape(split_shape).movedim(dim, 0).contiguous();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape[dim] /= n;
  at::Tensor out = at::empty(out_shape, x.options());
  group.reduce_scatter(out, blocks, {ReduceOp::kSum})->wait();
  return out;
}

at::Tensor exchange_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                         Communicator& group) {
  if (group.size() == 1) return x;
  at::Tensor out = rows_buffer(x, output_splits);
  const at::Tensor in = x.contiguous();
  group.all_to_all(out, in, output_splits, input_splits, {})->wait();
  return out;
}

at::Tensor copy_to_group(const at::Tensor& x, Communicator& group) {
  return group.size() == 1 ? x : CopyToGroup::apply(x, &group);
}
at::Tensor reduce_from_group(const at::Tensor& x, Communicator& group) {
  return group.size() == 1 ? x : ReduceFromGroup::apply(x, &group);
}
at::Tensor all_gather_along(const at::Tensor& x, int64_t dim, Communicator& group, bool reduce_scatter_grad) {
  return group.size() == 1 ? x : AllGatherAlong::apply(x, dim, &group, reduce_scatter_grad);
}
at::Tensor scatter_along(const at::Tensor& x, int64_t dim, Communicator& group) {
  return group.size() == 1 ? x : ScatterAlong::apply(x, dim, &group);
}
at::Tensor reduce_scatter_along(const at::Tensor& x, int64_t dim, Communicator& group) {
  return group.size() == 1 ? x : ReduceScatterAlong::apply(x, dim, &group);
}
at::Tensor all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                           Communicator& group) {
  return group.size() == 1 ? x : AllToAllRows::apply(x, output_splits, input_splits, &group);
}

}  // namespace fmoe::parallel

#include "parallel/autograd.h"

#include <torch/torch.h>

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
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = std::accumulate(output_splits.begin(), output_splits.end(), int64_t{0});
  at::Tensor out = at::empty(shape, x.options());
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

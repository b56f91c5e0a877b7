#include "parallel/nccl/nccl_communicator.h"
#include "common/timing.h"

#define OMPI_SKIP_MPICXX 1
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <ATen/ATen.h>

#include <cstring>
#include <numeric>
#include <stdexcept>
#include <thread>

namespace fmoe::parallel {
namespace {

void check_cuda(cudaError_t status, int rank, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error("rank " + std::to_string(rank) + ": " + what + ": " + cudaGetErrorString(status));
  }
}

void check_nccl(ncclResult_t status, int rank, const char* what) {
  if (status != ncclSuccess) {
    throw std::runtime_error("rank " + std::to_string(rank) + ": " + what + ": " + ncclGetErrorString(status));
  }
}

ncclDataType_t nccl_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: return ncclUint8;
    default: throw std::invalid_argument(std::string("nccl backend: unsupported dtype ") + c10::toString(t.scalar_type()));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return ncclAvg;
    case ReduceOp::kMax: return ncclMax;
  }
  return ncclSum;
}

void check_cuda_tensor(const at::Tensor& t, const char* op) {
  if (!t.is_cuda() || !t.is_contiguous()) throw std::invalid_argument(std::string("nccl backend: ") + op + " needs a contiguous CUDA tensor");
}

class NcclWork : public Work {
 public:
  NcclWork(cudaEvent_t done, ncclComm_t comm, int rank, std::string op, std::chrono::milliseconds timeout,
           std::vector<at::Tensor> keep_alive, std::shared_ptr<double> wait_seconds)
      : done_(done), comm_(comm), rank_(rank), op_(std::move(op)), timeout_(timeout), keep_alive_(std::move(keep_alive)),
        wait_seconds_(std::move(wait_seconds)) {}
  ~NcclWork() override { cudaEventDestroy(done_); }

  bool is_completed() override { return cudaEventQuery(done_) == cudaSuccess; }

  void wait() override {
    const auto start = std::chrono::steady_clock::now();
    // Stream order first: work the caller enqueues next sees the result.
    check_cuda(cudaStreamWaitEvent(nullptr, done_, 0), rank_, "cudaStreamWaitEvent");
    auto pause = std::chrono::microseconds(1);
    while (cudaEventQuery(done_) == cudaErrorNotReady) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        throw std::runtime_error("rank " + std::to_string(rank_) + ": " + op_ + " failed: " + ncclGetErrorString(async));
      }
      if (std::chrono::steady_clock::now() - start > timeout_) {
        ncclCommAbort(comm_);  // frees the GPU from the stuck kernel; the communicator is unusable after
        throw std::runtime_error("rank " + std::to_string(rank_) + ": " + op_ + " did not complete within " +
                                 std::to_string(timeout_.count()) + " ms (a peer rank exited or ranks disagree)");
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
    if (wait_seconds_) *wait_seconds_ += common::seconds_since(start);
  }

 private:
  cudaEvent_t done_;
  ncclComm_t comm_;
  int rank_;
  std::string op_;
  std::chrono::milliseconds timeout_;
  std::vector<at::Tensor> keep_alive_;
  std::shared_ptr<double> wait_seconds_;
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device) : comm_(comm), rank_(rank), size_(size), device_(device) {
    check_cuda(cudaSetDevice(device_), rank_, "cudaSetDevice");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), rank_, "cudaStreamCreate");
  }
  ~NcclCommunicator() override {
    cudaStreamDestroy(stream_);
    ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "nccl"; }

  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override {
    check_cuda_tensor(tensor, "all_reduce");
    return launch("all_reduce", options.timeout, {tensor}, [&] {
      return ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor), nccl_op(options.op), comm_, stream_);
    });
  }
  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override {
    check_cuda_tensor(tensor, "broadcast");
    return launch("broadcast", options.timeout, {tensor}, [&] {
      return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor), options.root, comm_, stream_);
    });
  }
  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    check_cuda_tensor(output, "all_gather");
    check_cuda_tensor(input, "all_gather");
    if (output.numel() != input.numel() * size_) throw std::invalid_argument("nccl backend: all_gather output must hold size() x input");
    return launch("all_gather", options.timeout, {output, input}, [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), nccl_type(input), comm_, stream_);
    });
  }
  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& options) override {
    check_cuda_tensor(output, "reduce_scatter");
    check_cuda_tensor(input, "reduce_scatter");
    if (input.numel() != output.numel() * size_) throw std::invalid_argument("nccl backend: reduce_scatter input must hold size() x output");
    return launch("reduce_scatter", options.timeout, {output, input}, [&] {
      return ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(), nccl_type(input), nccl_op(options.op), comm_, stream_);
    });
  }
  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, const AllToAllOptions& options) override {
    check_cuda_tensor(output, "all_to_all");
    check_cuda_tensor(input, "all_to_all");
    const int64_t row = input.dim() == 0 ? 1 : input.numel() / std::max<int64_t>(1, input.size(0));
    const auto splits = [&](const std::vector<int64_t>& given, int64_t rows) {
      std::vector<int64_t> s = given.empty() ? std::vector<int64_t>(size_, rows / size_) : given;
      if (static_cast<int>(s.size()) != size_ || std::accumulate(s.begin(), s.end(), int64_t{0}) != rows) {
        throw std::invalid_argument("nccl backend: all_to_all splits must have one entry per rank and sum to the rows");
      }
      return s;
    };
    const auto send = splits(input_splits, input.size(0)), recv = splits(output_splits, output.size(0));
    const size_t element = input.element_size();
    return launch("all_to_all", options.timeout, {output, input}, [&] {
      ncclGroupStart();
      int64_t send_offset = 0, recv_offset = 0;
      for (int r = 0; r < size_; ++r) {
        if (send[r] > 0) {
          ncclSend(static_cast<const char*>(input.data_ptr()) + send_offset * row * element, send[r] * row, nccl_type(input), r, comm_, stream_);
        }
        if (recv[r] > 0) {
          ncclRecv(static_cast<char*>(output.data_ptr()) + recv_offset * row * element, recv[r] * row, nccl_type(output), r, comm_, stream_);
        }
        send_offset += send[r];
        recv_offset += recv[r];
      }
      return ncclGroupEnd();
    });
  }
  std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) override {
    check_cuda_tensor(tensor, "send");
    return launch("send to rank " + std::to_string(dst), options.timeout, {tensor}, [&] {
      return ncclSend(tensor.data_ptr(), tensor.numel(), nccl_type(tensor), dst, comm_, stream_);
    });
  }
  std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) override {
    check_cuda_tensor(tensor, "recv");
    return launch("recv from rank " + std::to_string(src), options.timeout, {tensor}, [&] {
      return ncclRecv(tensor.data_ptr(), tensor.numel(), nccl_type(tensor), src, comm_, stream_);
    });
  }
  std::unique_ptr<Work> send_recv(const std::vector<P2POp>& ops, std::chrono::milliseconds timeout) override {
    std::vector<at::Tensor> tensors;
    for (const P2POp& op : ops) {
      check_cuda_tensor(op.tensor, op.send ? "send" : "recv");
      if (op.peer < 0 || op.peer >= size_ || op.peer == rank_) {
        throw std::invalid_argument("nccl backend: send/recv peer " + std::to_string(op.peer) + " is not another rank of a group of " + std::to_string(size_));
      }
      tensors.push_back(op.tensor);
    }
    if (ops.empty()) return std::make_unique<CompletedWork>();
    return launch("send/recv group of " + std::to_string(ops.size()), timeout, std::move(tensors), [&] {
      ncclGroupStart();
      for (const P2POp& op : ops) {
        if (op.send) {
          ncclSend(op.tensor.data_ptr(), op.tensor.numel(), nccl_type(op.tensor), op.peer, comm_, stream_);
        } else {
          ncclRecv(op.tensor.data_ptr(), op.tensor.numel(), nccl_type(op.tensor), op.peer, comm_, stream_);
        }
      }
      return ncclGroupEnd();
    });
  }
  void barrier() override {
    float* one = nullptr;
    check_cuda(cudaMalloc(&one, sizeof(float)), rank_, "cudaMalloc");
    const ncclResult_t status = ncclAllReduce(one, one, 1, ncclFloat32, ncclSum, comm_, stream_);
    const cudaError_t sync = cudaStreamSynchronize(stream_);
    cudaFree(one);
    check_nccl(status, rank_, "barrier");
    check_cuda(sync, rank_, "barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t child = nullptr;
    check_nccl(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr), rank_, "ncclCommSplit");
    if (child == nullptr) return nullptr;
    int rank = 0, size = 0;
    ncclCommUserRank(child, &rank);
    ncclCommCount(child, &size);
    auto group = std::make_unique<NcclCommunicator>(child, rank, size, device_);
    group->set_default_timeout(default_timeout_);
    return group;
  }

 private:
  template <typename Op>
  std::unique_ptr<Work> launch(const std::string& name, std::chrono::milliseconds timeout, std::vector<at::Tensor> tensors, Op&& op) {
    check_cuda(cudaSetDevice(device_), rank_, "cudaSetDevice");
    // Inputs are produced on the caller's (legacy default) stream: order the NCCL stream after them.
    cudaEvent_t ready = nullptr, done = nullptr;
    check_cuda(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), rank_, "cudaEventCreate");
    check_cuda(cudaEventRecord(ready, nullptr), rank_, "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, ready, 0), rank_, "cudaStreamWaitEvent");
    cudaEventDestroy(ready);
    check_nccl(op(), rank_, name.c_str());
    check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), rank_, "cudaEventCreate");
    check_cuda(cudaEventRecord(done, stream_), rank_, "cudaEventRecord");
    return std::make_unique<NcclWork>(done, comm_, rank_, name, resolve(timeout), std::move(tensors), wait_seconds_);
  }

  ncclComm_t comm_;
  int rank_, size_, device_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& mpi_group) {
  const int rank = mpi_group.rank(), size = mpi_group.size();
  const int devices = cuda_device_count();
  if (devices == 0) throw std::runtime_error("rank " + std::to_string(rank) + ": nccl backend: no CUDA device visible");
  // The node-local rank picks the GPU.
  MPI_Comm local = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);
  int local_rank = 0;
  MPI_Comm_rank(local, &local_rank);
  MPI_Comm_free(&local);
  const int device = local_rank % devices;
  check_cuda(cudaSetDevice(device), rank, "cudaSetDevice");
  // Rank 0's unique id reaches every rank over MPI.
  ncclUniqueId id;
  if (rank == 0) check_nccl(ncclGetUniqueId(&id), rank, "ncclGetUniqueId");
  at::Tensor bytes = at::empty({static_cast<int64_t>(sizeof(id))}, at::kByte);
  if (rank == 0) std::memcpy(bytes.data_ptr(), &id, sizeof(id));
  mpi_group.broadcast(bytes, {0})->wait();
  std::memcpy(&id, bytes.data_ptr(), sizeof(id));
  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, size, id, rank), rank, "ncclCommInitRank");
  auto communicator = std::make_unique<NcclCommunicator>(comm, rank, size, device);
  communicator->set_default_timeout(mpi_group.default_timeout());
  return communicator;
}

}  // namespace fmoe::parallel

#include "parallel/mpi/mpi_communicator.h"

// The C API only: Open MPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <ATen/ATen.h>

#include <stdexcept>
#include <thread>

namespace fmoe::parallel {
namespace {

MPI_Datatype mpi_type(const at::Tensor& tensor, bool reducing) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBFloat16:
      if (!reducing) return MPI_UINT16_T;  // moved as raw 16-bit words
      [[fallthrough]];
    default:
      throw std::invalid_argument(std::string("mpi backend: unsupported dtype ") + c10::toString(tensor.scalar_type()) +
                                  (reducing ? " for a reduction" : ""));
  }
}

void check_cpu_contiguous(const at::Tensor& tensor, const char* op) {
  if (!tensor.device().is_cpu() || !tensor.is_contiguous()) {
    throw std::invalid_argument(std::string("mpi backend: ") + op + " needs a contiguous CPU tensor");
  }
}

class MpiWork : public Work {
 public:
  MpiWork(MPI_Request request, int rank, std::string op, std::chrono::milliseconds timeout,
          std::function<void()> on_complete = {})
      : request_(request), rank_(rank), op_(std::move(op)), timeout_(timeout), on_complete_(std::move(on_complete)) {}

  bool is_completed() override {
    if (done_) return true;
    int flag = 0;
    MPI_Test(&request_, &flag, MPI_STATUS_IGNORE);
    if (flag) finish();
    return done_;
  }

  void wait() override {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    // Poll rather than MPI_Wait: a peer that died or diverged must not hang us.
    auto pause = std::chrono::microseconds(1);
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() > deadline) {
        throw std::runtime_error("rank " + std::to_string(rank_) + ": " + op_ + " did not complete within " +
                                 std::to_string(timeout_.count()) + " ms (a peer rank exited or ranks disagree)");
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }

 private:
  void finish() {
    done_ = true;
    if (on_complete_) on_complete_();
  }
  MPI_Request request_;
  int rank_;
  std::string op_;
  std::chrono::milliseconds timeout_;
  std::function<void()> on_complete_;
  bool done_ = false;
};

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }

  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override {
    check_cpu_contiguous(tensor, "all_reduce");
    const MPI_Op op = options.op == ReduceOp::kMax ? MPI_MAX : MPI_SUM;
    MPI_Request request;
    MPI_Iallreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(tensor.numel()), mpi_type(tensor, true), op, comm_, &request);
    std::function<void()> finish;
    if (options.op == ReduceOp::kAvg) finish = [tensor, n = size_]() mutable { tensor.div_(n); };
    return std::make_unique<MpiWork>(request, rank_, "all_reduce", options.timeout, std::move(finish));
  }

  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override {
    check_cpu_contiguous(tensor, "broadcast");
    MPI_Request request;
    MPI_Ibcast(tensor.data_ptr(), static_cast<int>(tensor.numel()), mpi_type(tensor, false), options.root, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "broadcast", options.timeout);
  }

  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    check_cpu_contiguous(output, "all_gather");
    check_cpu_contiguous(input, "all_gather");
    if (output.numel() != input.numel() * size_ || output.scalar_type() != input.scalar_type()) {
      throw std::invalid_argument("mpi backend: all_gather output must hold size() x input elements of the same dtype");
    }
    MPI_Request request;
    const MPI_Datatype type = mpi_type(input, false);
    MPI_Iallgather(input.data_ptr(), static_cast<int>(input.numel()), type, output.data_ptr(),
                   static_cast<int>(input.numel()), type, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "all_gather", options.timeout);
  }

  void barrier() override { MPI_Barrier(comm_); }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiRuntime::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::unique_ptr<Communicator> make_mpi_world_communicator() { return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD); }

}  // namespace fmoe::parallel

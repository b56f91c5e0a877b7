#include "parallel/mpi/mpi_communicator.h"
#include "common/timing.h"

// The C API only: Open MPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace fmoe::parallel {
namespace {

// BF16 travels as raw 16-bit words; its reductions are user-defined MPI ops that
// widen to FP32, combine and round back (round to nearest even).
float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}
uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}
void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = float_to_bf16(std::max(bf16_to_float(a[i]), bf16_to_float(b[i])));
}

MPI_Datatype mpi_type(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBFloat16: return MPI_UINT16_T;
    default:
      throw std::invalid_argument(std::string("mpi backend: unsupported dtype ") + c10::toString(tensor.scalar_type()));
  }
}

MPI_Op mpi_op(const at::Tensor& tensor, ReduceOp op) {
  if (tensor.scalar_type() == at::kBFloat16) {
    static MPI_Op sum = MPI_OP_NULL, max = MPI_OP_NULL;
    if (sum == MPI_OP_NULL) {
      MPI_Op_create(&bf16_sum, /*commute=*/1, &sum);
      MPI_Op_create(&bf16_max, /*commute=*/1, &max);
    }
    return op == ReduceOp::kMax ? max : sum;
  }
  if (op == ReduceOp::kAvg && !at::isFloatingType(tensor.scalar_type())) {
    throw std::invalid_argument(std::string("mpi backend: average of integer dtype ") + c10::toString(tensor.scalar_type()));
  }
  if (tensor.scalar_type() == at::kByte && op != ReduceOp::kMax) {
    throw std::invalid_argument("mpi backend: uint8 tensors reduce only with max");
  }
  return op == ReduceOp::kMax ? MPI_MAX : MPI_SUM;
}

int mpi_count(int64_t n, const char* op) {
  if (n > std::numeric_limits<int>::max()) {
    throw std::invalid_argument(std::string("mpi backend: ") + op + " of " + std::to_string(n) + " elements exceeds MPI's int count");
  }
  return static_cast<int>(n);
}

std::function<void()> average_after(at::Tensor tensor, ReduceOp op, int size) {
  if (op != ReduceOp::kAvg) return {};
  return [tensor, size]() mutable { tensor.div_(size); };
}

void check_cpu_contiguous(const at::Tensor& tensor, const char* op) {
  if (!tensor.device().is_cpu() || !tensor.is_contiguous()) {
    throw std::invalid_argument(std::string("mpi backend: ") + op + " needs a contiguous CPU tensor");
  }
}

// ---- The progress thread. Open MPI advances a non-blocking operation only
// inside MPI calls of the process, so a gradient bucket's all-reduce started
// during backward would otherwise wait for the step's next MPI call. When on,
// one thread per process owns every request issued after that and tests them
// (MPI_Testsome) until they complete, while the compute threads go on; a Work
// then only waits for its flag. It sleeps while nothing is outstanding and
// polls every kPoll while something is. Needs MPI_THREAD_MULTIPLE.
struct Outstanding {
  MPI_Request request = MPI_REQUEST_NULL;
  std::atomic<bool> done{false};
};

class ProgressThread {
 public:
  static ProgressThread& instance() {
    static ProgressThread engine;
    return engine;
  }
  bool set(bool on) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (on) {
      int level = MPI_THREAD_SINGLE, initialized = 0;
      MPI_Initialized(&initialized);
      if (initialized) MPI_Query_thread(&level);
      if (level != MPI_THREAD_MULTIPLE) return false;
      if (!thread_.joinable()) {
        stop_ = false;
        thread_ = std::thread([this] { loop(); });
      }
    } else if (thread_.joinable()) {
      stop_ = true;
      cv_.notify_all();
      lock.unlock();
      thread_.join();
      lock.lock();
    }
    on_ = on;
    return true;
  }
  bool on() const { return on_.load(); }
  std::shared_ptr<Outstanding> add(MPI_Request request) {
    auto entry = std::make_shared<Outstanding>();
    entry->request = request;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      incoming_.push_back(entry);
    }
    cv_.notify_one();
    return entry;
  }
  // Wakes whoever waits for a request (Work::wait).
  std::mutex& done_mutex() { return done_mutex_; }
  std::condition_variable& done_cv() { return done_cv_; }

 private:
  static constexpr std::chrono::microseconds kPoll{20};
  ~ProgressThread() {
    if (thread_.joinable()) set(false);
  }
  void loop() {
    std::vector<std::shared_ptr<Outstanding>> active;
    std::vector<MPI_Request> requests;
    std::vector<int> indices;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || !incoming_.empty() || !active.empty(); });
        // Stopping abandons what is still outstanding (a request a timed-out
        // wait gave up on), as a process without the thread would.
        if (stop_) return;
        for (auto& entry : incoming_) active.push_back(std::move(entry));
        incoming_.clear();
      }
      requests.resize(active.size());
      indices.resize(active.size());
      for (size_t i = 0; i < active.size(); ++i) requests[i] = active[i]->request;
      int completed = 0;
      MPI_Testsome(static_cast<int>(requests.size()), requests.data(), &completed, indices.data(), MPI_STATUSES_IGNORE);
      if (completed > 0 && completed != MPI_UNDEFINED) {
        {
          std::lock_guard<std::mutex> lock(done_mutex_);
          for (int k = 0; k < completed; ++k) active[static_cast<size_t>(indices[static_cast<size_t>(k)])]->done = true;
        }
        done_cv_.notify_all();
        active.erase(std::remove_if(active.begin(), active.end(), [](const auto& e) { return e->done.load(); }), active.end());
      }
      if (!active.empty()) std::this_thread::sleep_for(kPoll);
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Outstanding>> incoming_;
  std::thread thread_;
  bool stop_ = false;
  std::atomic<bool> on_{false};
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
};

class MpiWork : public Work {
 public:
  MpiWork(MPI_Request request, int rank, std::string op, std::chrono::milliseconds timeout,
          std::function<void()> on_complete = {}, std::shared_ptr<double> wait_seconds = nullptr)
      : request_(request), rank_(rank), op_(std::move(op)), timeout_(timeout), on_complete_(std::move(on_complete)),
        wait_seconds_(std::move(wait_seconds)) {
    if (ProgressThread::instance().on()) outstanding_ = ProgressThread::instance().add(request_);
  }

  bool is_completed() override {
    if (done_) return true;
    if (outstanding_) {
      if (outstanding_->done) finish();
      return done_;
    }
    int flag = 0;
    MPI_Test(&request_, &flag, MPI_STATUS_IGNORE);
    if (flag) finish();
    return done_;
  }

  void wait() override {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + timeout_;
    struct Account {  // blocked time counts even when the wait throws
      std::chrono::steady_clock::time_point start;
      double* total;
      ~Account() {
        if (total) *total += common::seconds_since(start);
      }
    } account{start, wait_seconds_.get()};
    if (outstanding_) {  // the progress thread completes it: sleep until it does, or the deadline
      ProgressThread& engine = ProgressThread::instance();
      std::unique_lock<std::mutex> lock(engine.done_mutex());
      if (!engine.done_cv().wait_until(lock, deadline, [&] { return outstanding_->done.load(); })) {
        throw timed_out();
      }
      lock.unlock();
      finish();
      return;
    }
    // Poll rather than MPI_Wait: a peer that died or diverged must not hang us.
    auto pause = std::chrono::microseconds(1);
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() > deadline) {
        throw timed_out();
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
  std::runtime_error timed_out() const {
    return std::runtime_error("rank " + std::to_string(rank_) + ": " + op_ + " did not complete within " +
                              std::to_string(timeout_.count()) + " ms (a peer rank exited or ranks disagree)");
  }
  MPI_Request request_;
  int rank_;
  std::string op_;
  std::chrono::milliseconds timeout_;
  std::function<void()> on_complete_;
  std::shared_ptr<double> wait_seconds_;
  std::shared_ptr<Outstanding> outstanding_;  // set when the progress thread owns the request
  bool done_ = false;
};

// Point-to-point messages matched in issue order only (one tag per peer pair):
// how NCCL matches them, for tests of code that must run over NCCL.
std::atomic<bool>& issue_order_matching() {
  static std::atomic<bool> on{false};
  return on;
}

class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool owned = false) : comm_(comm), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }

  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override {
    check_cpu_contiguous(tensor, "all_reduce");
    MPI_Request request;
    MPI_Iallreduce(MPI_IN_PLACE, tensor.data_ptr(), mpi_count(tensor.numel(), "all_reduce"), mpi_type(tensor),
                   mpi_op(tensor, options.op), comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "all_reduce", resolve(options.timeout), average_after(tensor, options.op, size_), wait_seconds_);
  }

  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override {
    check_cpu_contiguous(tensor, "broadcast");
    MPI_Request request;
    MPI_Ibcast(tensor.data_ptr(), mpi_count(tensor.numel(), "broadcast"), mpi_type(tensor), options.root, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "broadcast", resolve(options.timeout), nullptr, wait_seconds_);
  }

  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    check_cpu_contiguous(output, "all_gather");
    check_cpu_contiguous(input, "all_gather");
    if (output.numel() != input.numel() * size_ || output.scalar_type() != input.scalar_type()) {
      throw std::invalid_argument("mpi backend: all_gather output must hold size() x input elements of the same dtype");
    }
    MPI_Request request;
    const MPI_Datatype type = mpi_type(input);
    const int count = mpi_count(input.numel(), "all_gather");
    MPI_Iallgather(input.data_ptr(), count, type, output.data_ptr(), count, type, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "all_gather", resolve(options.timeout), nullptr, wait_seconds_);
  }

  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& options) override {
    check_cpu_contiguous(output, "reduce_scatter");
    check_cpu_contiguous(input, "reduce_scatter");
    if (input.numel() != output.numel() * size_ || output.scalar_type() != input.scalar_type()) {
      throw std::invalid_argument("mpi backend: reduce_scatter input must hold size() x output elements of the same dtype");
    }
    MPI_Request request;
    MPI_Ireduce_scatter_block(input.data_ptr(), output.data_ptr(), mpi_count(output.numel(), "reduce_scatter"), mpi_type(input),
                              mpi_op(input, options.op), comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "reduce_scatter", resolve(options.timeout), average_after(output, options.op, size_), wait_seconds_);
  }

  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, const AllToAllOptions& options) override {
    check_cpu_contiguous(output, "all_to_all");
    check_cpu_contiguous(input, "all_to_all");
    if (input.dim() == 0 || output.dim() == 0 || output.scalar_type() != input.scalar_type() ||
        input.sizes().slice(1) != output.sizes().slice(1)) {
      throw std::invalid_argument("mpi backend: all_to_all needs input and output of one dtype and equal trailing dims");
    }
    int64_t row = 1;
    for (int64_t i = 1; i < input.dim(); ++i) row *= input.size(i);
    const auto layout = [&](const std::vector<int64_t>& splits, int64_t rows, const char* which) {
      std::vector<int> counts(size_), displs(size_);
      int64_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        int64_t n = rows / size_;
        if (!splits.empty()) {
          if (static_cast<int>(splits.size()) != size_) {
            throw std::invalid_argument(std::string("mpi backend: all_to_all ") + which + " splits need one entry per rank");
          }
          n = splits[r];
        } else if (rows % size_ != 0) {
          throw std::invalid_argument(std::string("mpi backend: all_to_all ") + which + " rows do not divide evenly");
        }
        if (n < 0) throw std::invalid_argument("mpi backend: all_to_all split sizes must be >= 0");
        counts[r] = mpi_count(n * row, "all_to_all");
        displs[r] = mpi_count(offset * row, "all_to_all");
        offset += n;
      }
      if (offset != rows) {
        throw std::invalid_argument(std::string("mpi backend: all_to_all ") + which + " splits sum to " + std::to_string(offset) +
                                    " rows, the tensor has " + std::to_string(rows));
      }
      return std::make_pair(counts, displs);
    };
    auto [send_counts, send_displs] = layout(input_splits, input.size(0), "input");
    auto [recv_counts, recv_displs] = layout(output_splits, output.size(0), "output");
    // The count arrays must outlive the non-blocking call: the Work owns them.
    auto arrays = std::make_shared<std::vector<std::vector<int>>>(
        std::vector<std::vector<int>>{std::move(send_counts), std::move(send_displs), std::move(recv_counts), std::move(recv_displs)});
    MPI_Request request;
    const MPI_Datatype type = mpi_type(input);
    MPI_Ialltoallv(input.data_ptr(), (*arrays)[0].data(), (*arrays)[1].data(), type, output.data_ptr(), (*arrays)[2].data(),
                   (*arrays)[3].data(), type, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "all_to_all", resolve(options.timeout), [arrays, input, output] {}, wait_seconds_);
  }

  std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) override {
    check_cpu_contiguous(tensor, "send");
    check_peer(dst, "send");
    MPI_Request request;
    // Under NCCL's rules a send completes only once its receive is posted: a synchronous-mode send.
    if (issue_order_matching()) {
      MPI_Issend(tensor.data_ptr(), mpi_count(tensor.numel(), "send"), mpi_type(tensor), dst, 0, comm_, &request);
    } else {
      MPI_Isend(tensor.data_ptr(), mpi_count(tensor.numel(), "send"), mpi_type(tensor), dst, options.tag, comm_, &request);
    }
    return std::make_unique<MpiWork>(request, rank_, "send to rank " + std::to_string(dst), resolve(options.timeout), [tensor] {}, wait_seconds_);
  }

  std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) override {
    check_cpu_contiguous(tensor, "recv");
    check_peer(src, "recv");
    MPI_Request request;
    MPI_Irecv(tensor.data_ptr(), mpi_count(tensor.numel(), "recv"), mpi_type(tensor), src, issue_order_matching() ? 0 : options.tag, comm_, &request);
    return std::make_unique<MpiWork>(request, rank_, "recv from rank " + std::to_string(src), resolve(options.timeout), [tensor] {}, wait_seconds_);
  }

  void barrier() override {
    MPI_Request request;
    MPI_Ibarrier(comm_, &request);
    MpiWork(request, rank_, "barrier", default_timeout_, nullptr, wait_seconds_).wait();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm child = MPI_COMM_NULL;
    MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &child);
    if (child == MPI_COMM_NULL) return nullptr;
    MPI_Comm_set_errhandler(child, MPI_ERRORS_RETURN);
    auto group = std::make_unique<MpiCommunicator>(child, /*owned=*/true);
    group->set_default_timeout(default_timeout_);
    return group;
  }

 private:
  void check_peer(int peer, const char* op) const {
    if (peer < 0 || peer >= size_ || peer == rank_) {
      throw std::invalid_argument(std::string("mpi backend: ") + op + " peer " + std::to_string(peer) + " is not another rank of a group of " +
                                  std::to_string(size_));
    }
  }
  MPI_Comm comm_;
  bool owned_ = false;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    // MPI_THREAD_MULTIPLE where the library gives it: the progress thread needs it.
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiRuntime::~MpiRuntime() {
  set_mpi_progress_thread(false);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void MpiRuntime::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::unique_ptr<Communicator> make_mpi_world_communicator() { return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD); }

bool set_mpi_progress_thread(bool on) { return ProgressThread::instance().set(on); }

void set_mpi_issue_order_matching(bool on) { issue_order_matching() = on; }
bool mpi_issue_order_matching() { return issue_order_matching(); }

bool mpi_thread_multiple() {
  int level = MPI_THREAD_SINGLE, initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Query_thread(&level);
  return level == MPI_THREAD_MULTIPLE;
}

bool mpi_progress_thread() { return ProgressThread::instance().on(); }

}  // namespace fmoe::parallel

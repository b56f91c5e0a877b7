// Self-describing, atomic checkpoints.
//
//   <run_dir>/checkpoints/step_00000100/
//       model.safetensors      parameters and persistent buffers (router biases)
//       optimizer.safetensors  AdamW moments and step counts, RNG state (rank 0's)
//       optimizer.rankNNNNN.safetensors  the other ranks' when tp or ep shard the model
//       index.json             every tensor: file, global shape, the slice stored
//       trainer_state.json     step, tokens seen, loader state, file checksums
//       config.yaml            the resolved config of the run
//   <run_dir>/checkpoints/latest   the name of the newest complete checkpoint
//
// A checkpoint is written into a temporary directory, fsynced and renamed into
// place; "latest" moves only afterwards, so a crash mid-save leaves the previous
// checkpoint current and loadable. Loading verifies every file's CRC32.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/safetensors.h"

namespace fmoe::parallel {
class Communicator;
}

namespace fmoe::checkpoint {

struct TrainerState {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens_seen = 0;
  uint64_t loader_seed = 0;    // the loader is stateless: (seed, step) is its whole state
  double elapsed_seconds = 0;  // training wall time so far, carried over on resume
  std::string precision;       // the GEMM dtype the run chose (training.precision: auto), kept on resume
  // A schedule sized by the budget (training.steps: 0): the decision, fixed once.
  int64_t total_steps = 0;     // 0: not fixed yet
  double calibrated_step_seconds = 0;
  double calibrated_eval_seconds = 0;
};

struct CheckpointContents {
  TensorMap model;       // full tensors, whatever the layout
  TensorMap optimizer;   // rank 0's optimizer state
  TrainerState state;
  std::string config_yaml;
  std::string layout;    // the mesh that wrote it ("dp2 pp1 tp2 ep2")
  // Saving: writes further files (other ranks' optimizer shards) into the
  // temporary directory and records their CRC32s; they become part of the atomic save.
  std::function<void(const std::string& tmp_dir, std::map<std::string, uint32_t>& checksums)> write_extra;
  // Loading: the CRC32 of every file the checkpoint lists.
  std::map<std::string, uint32_t> checksums;
};

// Writes a checkpoint for state.step; returns its directory. Removes the
// oldest complete checkpoints beyond the newest `keep`, except those whose step
// is a multiple of keep_every (kept for good; 0: none).
std::string save_checkpoint(const std::string& run_dir, const CheckpointContents& contents, int64_t keep, int64_t keep_every = 0);

// The directory named by <run_dir>/checkpoints/latest, if any.
std::optional<std::string> latest_checkpoint(const std::string& run_dir);

// Every complete checkpoint directory of a run (step_N, no save in progress),
// oldest first.
std::vector<std::string> complete_checkpoints(const std::string& run_dir);

// What resume tries, in order: the latest, then the other complete checkpoints, newest first.
std::vector<std::string> resume_candidates(const std::string& run_dir);

// Reads every file the checkpoint lists (rank shards included) and checks its
// CRC32; throws the loader's one-line error naming the first bad file.
void verify_checkpoint(const std::string& directory);

// Reads and verifies a checkpoint directory. Throws a one-line error naming the
// bad file. Without read_tensors the model and optimizer files are left for a
// CheckpointTensors to read piece by piece (contents.model / .optimizer empty).
CheckpointContents load_checkpoint(const std::string& directory, bool read_tensors = true);

// The bytes of a checkpoint's tensors carry a CRC32 per chunk of this size (index.json).
inline constexpr size_t kChunkBytes = size_t{4} << 20;

// The tensors of a checkpoint's model.safetensors and optimizer.safetensors,
// read piece by piece: a rank reads the rows it needs and checks the CRC32 of
// every chunk they touch (and each file's header against index.json), never the
// whole state. A checkpoint written before chunk checksums is read whole and
// checked file by file.
class CheckpointTensors {
 public:
  CheckpointTensors(const std::string& directory, const CheckpointContents& contents);
  std::vector<std::string> names(const std::string& file) const;  // "model.safetensors" | "optimizer.safetensors"
  bool contains(const std::string& name) const { return sources_.count(name) > 0; }
  at::ScalarType dtype(const std::string& name) const;
  std::vector<int64_t> shape(const std::string& name) const;
  at::Tensor read(const std::string& name) const;
  // Rows [begin, end) of the tensor viewed as `view` (its element count; dim 0 split).
  at::Tensor read_rows(const std::string& name, at::IntArrayRef view, int64_t begin, int64_t end) const;
  size_t bytes_read() const { return bytes_read_; }

 private:
  struct Source {
    std::string file;
    SafetensorsEntry entry;        // where its bytes lie
    std::vector<uint32_t> chunks;  // CRC32 per chunk_bytes_ of them
    at::Tensor whole;              // read whole (older checkpoints)
  };
  const Source& source(const std::string& name) const;
  std::string directory_;
  size_t chunk_bytes_ = kChunkBytes;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Source> sources_;
  mutable size_t bytes_read_ = 0;
};

// Optimizer state sharded over ranks (tensor / expert parallelism, ZeRO-1):
// rank 0 writes its own as optimizer.safetensors, every other rank's goes to
// rank_state_file(rank) inside the same atomic save. The other ranks call
// send_rank_state while rank 0 saves with write_extra = receive_rank_states(world),
// which receives them one at a time and streams each to disk.
std::string rank_state_file(int rank);
void send_rank_state(const TensorMap& state, parallel::Communicator& world);
// The map send_rank_state sent to rank 0 of group from group rank source.
TensorMap receive_state(parallel::Communicator& group, int source);
std::function<void(const std::string&, std::map<std::string, uint32_t>&)> receive_rank_states(parallel::Communicator& world);
// For a save written in the background: the other ranks' states received now,
// at the step boundary (every collective stays on the training thread), and a
// write_extra that writes them from memory later.
std::function<void(const std::string&, std::map<std::string, uint32_t>&)> receive_rank_states_now(parallel::Communicator& world);
// Reads and verifies rank's file of a loaded checkpoint.
TensorMap load_rank_state(const std::string& directory, const CheckpointContents& contents, int rank);

// training.async_checkpoint: one save at a time written on a background thread.
// start() waits for the previous save first (at most one in flight); wait()
// blocks until the current one is durable and rethrows its error, if any. The
// destructor waits too, so a run never ends with a save half written.
class BackgroundSaver {
 public:
  BackgroundSaver() = default;
  ~BackgroundSaver();
  BackgroundSaver(const BackgroundSaver&) = delete;
  BackgroundSaver& operator=(const BackgroundSaver&) = delete;
  void start(std::function<void()> job);
  void wait();
  bool busy() const { return thread_.joinable(); }

 private:
  std::thread thread_;
  std::exception_ptr error_;
};

}  // namespace fmoe::checkpoint

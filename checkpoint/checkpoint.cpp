#include "checkpoint/checkpoint.h"

#include <ATen/ATen.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

#include "common/test_hooks.h"
#include "common/file_util.h"
#include "common/json_file.h"
#include "parallel/communicator.h"

namespace fmoe::checkpoint {
namespace fs = std::filesystem;
namespace {

std::string step_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step_%08lld", static_cast<long long>(step));
  return name;
}

// Test hook: FMOE_CRASH_AFTER_CHECKPOINT_FILES=n kills the process after n files
// of a save, to prove that a save interrupted midway spoils nothing.
void maybe_crash(int files_written) {
  const int limit = common::test_hooks().crash_after_checkpoint_files;
  if (limit > 0 && files_written >= limit) {
    std::fprintf(stderr, "checkpoint: simulated crash after %d files\n", files_written);
    std::_Exit(9);
  }
}

// Every tensor of a written file: its global shape, the slice stored (all of
// it), where its bytes lie, and a CRC32 per kChunkBytes of them, so a reader
// can take a few rows and check just the chunks it touched.
nlohmann::json index_of(const TensorMap& tensors, const std::string& file, const SafetensorsFile& written) {
  nlohmann::json index = nlohmann::json::object();
  for (const auto& [name, tensor] : tensors) {
    std::vector<std::vector<int64_t>> slice;
    for (int64_t size : tensor.sizes()) slice.push_back({0, size});
    const at::Tensor bytes = tensor.detach().to(at::kCPU).contiguous();
    const char* data = static_cast<const char*>(bytes.data_ptr());
    const size_t size = static_cast<size_t>(bytes.numel()) * bytes.element_size();
    std::vector<uint32_t> chunks;
    for (size_t at = 0; at < size; at += kChunkBytes) chunks.push_back(common::crc32_update(0, data + at, std::min(kChunkBytes, size - at)));
    const SafetensorsEntry& entry = written.entries().at(name);
    index[name] = {{"file", file}, {"shape", tensor.sizes().vec()}, {"slice", slice}, {"offsets", {entry.begin, entry.end}}, {"chunk_crc32", chunks}};
  }
  return index;
}

}  // namespace

std::string save_checkpoint(const std::string& run_dir, const CheckpointContents& contents, int64_t keep, int64_t keep_every) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_name(contents.state.step);
  const fs::path final_dir = root / name;
  const fs::path tmp_dir = root / (name + ".tmp." + std::to_string(::getpid()));
  // Saves are one at a time: any temporary directory left is a killed save's.
  for (const auto& entry : fs::directory_iterator(root)) {
    if (entry.path().filename().string().find(".tmp.") != std::string::npos) fs::remove_all(entry.path());
  }
  fs::create_directories(tmp_dir);

  // Tensors stream to disk one at a time: saving never holds a second copy of the state.
  nlohmann::json checksums = nlohmann::json::object();
  int written = 0;
  checksums["model.safetensors"] = write_safetensors((tmp_dir / "model.safetensors").string(), contents.model, {{"format", "pt"}});
  maybe_crash(++written);
  checksums["optimizer.safetensors"] =
      write_safetensors((tmp_dir / "optimizer.safetensors").string(), contents.optimizer, {{"format", "pt"}});
  maybe_crash(++written);
  common::write_file_atomic((tmp_dir / "config.yaml").string(), contents.config_yaml);
  checksums["config.yaml"] = common::crc32_of(contents.config_yaml);
  maybe_crash(++written);
  if (contents.write_extra) {
    std::map<std::string, uint32_t> extra;
    contents.write_extra(tmp_dir.string(), extra);
    for (const auto& [file, crc] : extra) checksums[file] = crc;
  }
  const SafetensorsFile model_file((tmp_dir / "model.safetensors").string());
  const SafetensorsFile optimizer_file((tmp_dir / "optimizer.safetensors").string());
  nlohmann::json index = index_of(contents.model, "model.safetensors", model_file);
  index.update(index_of(contents.optimizer, "optimizer.safetensors", optimizer_file));
  const nlohmann::json files = {{"model.safetensors", {{"header_crc32", model_file.header_crc()}}},
                                {"optimizer.safetensors", {{"header_crc32", optimizer_file.header_crc()}}}};
  // Tensors are stored whole: any layout takes its slices of them.
  const std::string index_bytes =
      nlohmann::json{{"layout", contents.layout}, {"chunk_bytes", kChunkBytes}, {"files", files}, {"tensors", index}}.dump(1) + "\n";
  common::write_file_atomic((tmp_dir / "index.json").string(), index_bytes);
  checksums["index.json"] = common::crc32_of(index_bytes);

  const nlohmann::json state = {
      {"layout", contents.layout},
      {"step", contents.state.step},
      {"tokens_seen", contents.state.tokens_seen},
      {"loader_seed", contents.state.loader_seed},
      {"elapsed_seconds", contents.state.elapsed_seconds},
      {"precision", contents.state.precision},
      {"schedule", {{"total_steps", contents.state.total_steps},
                    {"step_seconds", contents.state.calibrated_step_seconds},
                    {"eval_seconds", contents.state.calibrated_eval_seconds}}},
      {"checksums", checksums},
  };
  // The state file checks itself: a CRC32 of its own text without this field.
  nlohmann::json sealed = state;
  sealed["self_crc32"] = common::crc32_of(state.dump(2));
  common::write_file_atomic((tmp_dir / "trainer_state.json").string(), sealed.dump(2) + "\n");
  maybe_crash(++written);

  // Swap the directory in; an older save of the same step is replaced only now.
  const fs::path old_dir = root / (name + ".old." + std::to_string(::getpid()));
  if (fs::exists(final_dir)) fs::rename(final_dir, old_dir);
  fs::rename(tmp_dir, final_dir);
  common::fsync_directory(root.string());
  common::write_file_atomic((root / "latest").string(), name + "\n");
  fs::remove_all(old_dir);

  // Retention: the newest `keep` complete checkpoints, and every keep_every-th step for good.
  std::vector<std::string> rotating;
  for (const std::string& dir : complete_checkpoints(run_dir)) {
    const std::string base = fs::path(dir).filename().string();  // step_%08lld
    const int64_t step = std::stoll(base.substr(5));
    if (keep_every > 0 && step % keep_every == 0) continue;
    rotating.push_back(dir);
  }
  for (size_t i = 0; i + static_cast<size_t>(keep) < rotating.size(); ++i) {
    if (fs::path(rotating[i]) != final_dir) fs::remove_all(rotating[i]);
  }
  return final_dir.string();
}

std::vector<std::string> complete_checkpoints(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::vector<std::string> complete;
  if (!fs::is_directory(root)) return complete;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string entry_name = entry.path().filename().string();
    if (entry.is_directory() && entry_name.rfind("step_", 0) == 0 && entry_name.find('.') == std::string::npos) {
      complete.push_back(entry.path().string());
    }
  }
  std::sort(complete.begin(), complete.end());  // step_%08lld: name order is step order
  return complete;
}

std::vector<std::string> resume_candidates(const std::string& run_dir) {
  std::vector<std::string> out;
  std::optional<std::string> latest;
  try {
    latest = latest_checkpoint(run_dir);
  } catch (const std::runtime_error&) {
    // A damaged pointer: the complete checkpoints still order themselves.
  }
  if (latest && fs::is_directory(*latest)) out.push_back(*latest);
  const std::vector<std::string> complete = complete_checkpoints(run_dir);
  for (auto it = complete.rbegin(); it != complete.rend(); ++it) {
    if (!latest || fs::path(*it) != fs::path(*latest)) out.push_back(*it);
  }
  return out;
}

void verify_checkpoint(const std::string& directory) {
  const CheckpointContents contents = load_checkpoint(directory);
  for (const auto& [file, crc] : contents.checksums) {
    const std::string path = directory + "/" + file;
    if (!fs::exists(path)) throw std::runtime_error(path + ": missing from the checkpoint");
    if (common::crc32_of_file(path) != crc) throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
  }
}

std::optional<std::string> latest_checkpoint(const std::string& run_dir) {
  const fs::path latest = fs::path(run_dir) / "checkpoints" / "latest";
  if (!fs::exists(latest)) return std::nullopt;
  std::string name = common::read_file(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  if (name.empty() || name.find('/') != std::string::npos) {
    throw std::runtime_error(latest.string() + ": corrupt (expected a checkpoint directory name)");
  }
  return (latest.parent_path() / name).string();
}

CheckpointContents load_checkpoint(const std::string& directory, bool read_tensors) {
  const fs::path dir(directory);
  const std::string state_path = (dir / "trainer_state.json").string();
  if (!fs::exists(state_path)) throw std::runtime_error(state_path + ": missing: not a complete checkpoint");
  nlohmann::json state = common::read_json_file(state_path, "checkpoint state");
  if (state.is_object() && state.contains("self_crc32")) {  // absent from checkpoints of earlier versions
    const nlohmann::json sealed = state["self_crc32"];
    state.erase("self_crc32");
    if (!sealed.is_number_unsigned() || sealed.get<uint32_t>() != common::crc32_of(state.dump(2))) {
      throw std::runtime_error(state_path + ": checksum mismatch: the file is truncated or corrupt");
    }
  }
  CheckpointContents contents;
  try {
    contents.state.step = state.at("step").get<int64_t>();
    contents.state.tokens_seen = state.at("tokens_seen").get<int64_t>();
    contents.state.loader_seed = state.at("loader_seed").get<uint64_t>();
    contents.state.elapsed_seconds = state.at("elapsed_seconds").get<double>();
    contents.layout = state.value("layout", std::string());
    contents.state.precision = state.value("precision", std::string());
    if (state.contains("schedule")) {
      const nlohmann::json& schedule = state.at("schedule");
      contents.state.total_steps = schedule.at("total_steps").get<int64_t>();
      contents.state.calibrated_step_seconds = schedule.at("step_seconds").get<double>();
      contents.state.calibrated_eval_seconds = schedule.at("eval_seconds").get<double>();
    }
    for (const auto& [file, crc] : state.at("checksums").items()) contents.checksums[file] = crc.get<uint32_t>();
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error(state_path + ": corrupt (missing or mistyped fields)");
  }
  const auto check = [&](const char* file, uint32_t crc) {
    if (crc != state["checksums"].value(file, uint32_t{0})) {
      throw std::runtime_error((dir / file).string() + ": checksum mismatch: the file is truncated or corrupt");
    }
  };
  for (const char* file : {"model.safetensors", "optimizer.safetensors", "config.yaml", "index.json"}) {
    if (!fs::exists(dir / file)) throw std::runtime_error((dir / file).string() + ": missing from the checkpoint");
  }
  // A damaged file is reported as a checksum mismatch, whatever part of it the damage hit first.
  const auto read_checked = [&](const char* file) {
    const std::string path = (dir / file).string();
    uint32_t crc = 0;
    TensorMap tensors;
    try {
      tensors = read_safetensors(path, &crc);
    } catch (const std::runtime_error&) {
      check(file, common::crc32_of_file(path));
      throw;
    }
    check(file, crc);
    return tensors;
  };
  if (read_tensors) {
    contents.model = read_checked("model.safetensors");
    contents.optimizer = read_checked("optimizer.safetensors");
  }
  contents.config_yaml = common::read_file((dir / "config.yaml").string());
  check("config.yaml", common::crc32_of(contents.config_yaml));
  check("index.json", common::crc32_of_file((dir / "index.json").string()));
  return contents;
}

std::string rank_state_file(int rank) {
  char name[48];
  std::snprintf(name, sizeof(name), "optimizer.rank%05d.safetensors", rank);
  return name;
}

void send_rank_state(const TensorMap& state, parallel::Communicator& world) {
  const std::string serialized = to_safetensors(state, {{"format", "pt"}});
  at::Tensor size = at::full({1}, static_cast<int64_t>(serialized.size()), at::kLong);
  world.send(size, 0, {})->wait();
  const at::Tensor bytes = at::from_blob(const_cast<char*>(serialized.data()), {static_cast<int64_t>(serialized.size())}, at::kByte);
  world.send(bytes, 0, {})->wait();
}

namespace {

// What send_rank_state sent from source: its safetensors bytes.
std::string receive_bytes(parallel::Communicator& group, int source) {
  at::Tensor size = at::empty({1}, at::kLong);
  group.recv(size, source, {})->wait();
  std::string bytes(static_cast<size_t>(size.item<int64_t>()), '\0');
  at::Tensor view = at::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, at::kByte);
  group.recv(view, source, {})->wait();
  return bytes;
}

void write_rank_file(const std::string& tmp_dir, int rank, std::string_view bytes, std::map<std::string, uint32_t>& checksums) {
  common::write_file_atomic(tmp_dir + "/" + rank_state_file(rank), bytes);
  checksums[rank_state_file(rank)] = common::crc32_of(bytes);
}

}  // namespace

std::function<void(const std::string&, std::map<std::string, uint32_t>&)> receive_rank_states(parallel::Communicator& world) {
  return [&world](const std::string& tmp_dir, std::map<std::string, uint32_t>& checksums) {
    for (int r = 1; r < world.size(); ++r) write_rank_file(tmp_dir, r, receive_bytes(world, r), checksums);
  };
}

TensorMap receive_state(parallel::Communicator& group, int source) {
  return from_safetensors(receive_bytes(group, source), "optimizer state of pipeline rank " + std::to_string(source));
}

std::function<void(const std::string&, std::map<std::string, uint32_t>&)> receive_rank_states_now(parallel::Communicator& world) {
  auto files = std::make_shared<std::vector<std::string>>();
  for (int r = 1; r < world.size(); ++r) files->push_back(receive_bytes(world, r));
  return [files](const std::string& tmp_dir, std::map<std::string, uint32_t>& checksums) {
    for (size_t i = 0; i < files->size(); ++i) write_rank_file(tmp_dir, static_cast<int>(i) + 1, (*files)[i], checksums);
  };
}

BackgroundSaver::~BackgroundSaver() {
  if (thread_.joinable()) thread_.join();
}

void BackgroundSaver::start(std::function<void()> job) {
  wait();
  thread_ = std::thread([this, job = std::move(job)] {
    try {
      job();
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

void BackgroundSaver::wait() {
  if (thread_.joinable()) thread_.join();
  if (error_) {
    std::exception_ptr error = error_;
    error_ = nullptr;
    std::rethrow_exception(error);
  }
}

TensorMap load_rank_state(const std::string& directory, const CheckpointContents& contents, int rank) {
  const std::string path = directory + "/" + rank_state_file(rank);
  uint32_t crc = 0;
  TensorMap state = read_safetensors(path, &crc);
  const auto expected = contents.checksums.find(rank_state_file(rank));
  if (expected == contents.checksums.end() || crc != expected->second) {
    throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
  }
  return state;
}

CheckpointTensors::CheckpointTensors(const std::string& directory, const CheckpointContents& contents) : directory_(directory) {
  const std::string index_path = directory + "/index.json";
  const nlohmann::json index = common::read_json_file(index_path, "checkpoint index");
  for (const std::string file : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string path = directory + "/" + file;
    if (!index.contains("chunk_bytes")) {  // written before chunk checksums: read whole, checked file by file
      uint32_t crc = 0;
      TensorMap tensors = read_safetensors(path, &crc);
      const auto expected = contents.checksums.find(file);
      if (expected == contents.checksums.end() || expected->second != crc) {
        throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
      }
      for (auto& [name, tensor] : tensors) {
        Source& source = sources_[name];
        source.file = file;
        source.whole = std::move(tensor);
      }
      continue;
    }
    if (!fs::exists(path)) throw std::runtime_error(path + ": missing from the checkpoint");
    std::shared_ptr<SafetensorsFile> opened;
    try {
      opened = std::make_shared<SafetensorsFile>(path);
    } catch (const std::runtime_error&) {  // a damaged header, whatever it broke first
      throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
    }
    if (opened->header_crc() != index.at("files").at(file).at("header_crc32").get<uint32_t>()) {
      throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
    }
    files_[file] = opened;
    chunk_bytes_ = index.at("chunk_bytes").get<size_t>();
    for (const auto& [name, entry] : opened->entries()) {
      const auto recorded = index.at("tensors").find(name);
      if (recorded == index.at("tensors").end() || recorded->at("offsets").get<std::vector<uint64_t>>() != std::vector<uint64_t>{entry.begin, entry.end}) {
        throw std::runtime_error(path + ": checksum mismatch: the file is truncated or corrupt");
      }
      Source& source = sources_[name];
      source.file = file;
      source.entry = entry;
      source.chunks = recorded->at("chunk_crc32").get<std::vector<uint32_t>>();
    }
  }
}

std::vector<std::string> CheckpointTensors::names(const std::string& file) const {
  std::vector<std::string> out;
  for (const auto& [name, source] : sources_) {
    if (source.file == file) out.push_back(name);
  }
  return out;
}

const CheckpointTensors::Source& CheckpointTensors::source(const std::string& name) const {
  const auto it = sources_.find(name);
  if (it == sources_.end()) throw std::runtime_error(directory_ + ": tensor '" + name + "' is missing");
  return it->second;
}

at::ScalarType CheckpointTensors::dtype(const std::string& name) const {
  const Source& s = source(name);
  return s.whole.defined() ? s.whole.scalar_type() : s.entry.dtype;
}

std::vector<int64_t> CheckpointTensors::shape(const std::string& name) const {
  const Source& s = source(name);
  return s.whole.defined() ? s.whole.sizes().vec() : s.entry.shape;
}

at::Tensor CheckpointTensors::read(const std::string& name) const {
  const std::vector<int64_t> full = shape(name);
  if (full.empty()) {  // a scalar
    const Source& s = source(name);
    if (s.whole.defined()) return s.whole;
    return read_rows(name, {1}, 0, 1).reshape({});
  }
  std::vector<int64_t> view = full;
  return read_rows(name, view, 0, view[0]);
}

at::Tensor CheckpointTensors::read_rows(const std::string& name, at::IntArrayRef view, int64_t begin, int64_t end) const {
  const Source& s = source(name);
  std::vector<int64_t> rows = view.vec();
  rows[0] = end - begin;
  if (s.whole.defined()) return s.whole.reshape(view).narrow(0, begin, end - begin).contiguous();
  const SafetensorsFile& file = *files_.at(s.file);
  const size_t total = s.entry.end - s.entry.begin;
  const size_t row_bytes = view[0] > 0 ? total / static_cast<size_t>(view[0]) : 0;
  const size_t lo = static_cast<size_t>(begin) * row_bytes, hi = static_cast<size_t>(end) * row_bytes;
  at::Tensor out = at::empty(rows, at::TensorOptions().dtype(s.entry.dtype));
  char* dst = static_cast<char*>(out.data_ptr());
  file.read(s.entry.begin + lo, dst, hi - lo);
  bytes_read_ += hi - lo;
  // Each chunk the rows touch: its bytes outside the rows are read into scratch, then its CRC32 checked.
  std::vector<char> scratch;
  const auto crc_of_file_range = [&](uint32_t crc, size_t from, size_t to) {
    scratch.resize(to - from);
    file.read(s.entry.begin + from, scratch.data(), to - from);
    bytes_read_ += to - from;
    return common::crc32_update(crc, scratch.data(), to - from);
  };
  if (hi == lo) return out;
  for (size_t c = lo / chunk_bytes_; c * chunk_bytes_ < hi; ++c) {
    const size_t cs = c * chunk_bytes_, ce = std::min(cs + chunk_bytes_, total);
    uint32_t crc = 0;
    if (cs < lo) crc = crc_of_file_range(crc, cs, lo);
    const size_t inside_from = std::max(cs, lo), inside_to = std::min(ce, hi);
    crc = common::crc32_update(crc, dst + (inside_from - lo), inside_to - inside_from);
    if (ce > hi) crc = crc_of_file_range(crc, hi, ce);
    if (c >= s.chunks.size() || crc != s.chunks[c]) {
      throw std::runtime_error(file.path() + ": checksum mismatch: the file is truncated or corrupt");
    }
  }
  return out;
}

}  // namespace fmoe::checkpoint

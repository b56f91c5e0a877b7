// moe-convert: FrugalMoE checkpoints to and from Hugging Face model folders.
//
//   moe-convert import --hf DIR --out RUN_DIR [--set key.path=value]...
//       RUN_DIR/config.yaml (the equivalent config) and RUN_DIR/checkpoints/step_00000000;
//       train from it with training.init_from: RUN_DIR
//   moe-convert export --checkpoint PATH --hf DIR [--shard-mb N]
//       config.json and the weights with Hugging Face's names (one tensor per expert)
//   moe-convert logits --checkpoint PATH --tokens "1 2 3;4 5 6" --out FILE.safetensors
//       the next-token logits [B, T, V] and each MoE layer's chosen experts, FP32, one process
//
// PATH is a checkpoint directory or a run directory (its latest checkpoint).
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <ATen/ATen.h>
#include <torch/torch.h>

#include "launch/cli.h"
#include "moe/model.h"
#include "checkpoint/checkpoint.h"
#include "config/config.h"
#include "checkpoint/hf_convert.h"

namespace {

using namespace fmoe;

constexpr const char* kUsage =
    "usage: moe-convert import --hf DIR --out RUN_DIR [--set key.path=value]...\n"
    "       moe-convert export --checkpoint PATH --hf DIR [--shard-mb N]\n"
    "       moe-convert logits --checkpoint PATH --tokens \"1 2 3;4 5 6\" --out FILE.safetensors\n"
    "  PATH: a checkpoint directory, or a run directory (its latest checkpoint).\n";

std::string checkpoint_dir(const std::string& path) {
  if (std::filesystem::exists(path + "/trainer_state.json")) return path;
  if (const auto latest = checkpoint::latest_checkpoint(path)) return *latest;
  throw std::runtime_error(path + ": neither a checkpoint (trainer_state.json) nor a run directory with checkpoints/latest");
}

// The checkpoint's model, built from its config in one process with its weights.
std::shared_ptr<moe::MoEModel> load_model(const std::string& dir, checkpoint::TensorMap* tensors_out = nullptr) {
  const checkpoint::CheckpointContents contents = checkpoint::load_checkpoint(dir);
  const config::Config config = config::parse_config(contents.config_yaml, dir + "/config.yaml");
  auto model = std::make_shared<moe::MoEModel>(config.model);
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  const auto fill = [&](const std::string& name, at::Tensor& target) {
    const auto it = contents.model.find(name);
    if (it == contents.model.end()) throw std::runtime_error(dir + "/model.safetensors: tensor '" + name + "' is missing");
    if (!it->second.sizes().equals(target.sizes())) {
      throw std::runtime_error(dir + "/model.safetensors: tensor '" + name + "' has shape " + c10::str(it->second.sizes()) +
                               ", the model expects " + c10::str(target.sizes()));
    }
    target.copy_(it->second);
    used.insert(name);
  };
  for (auto& item : model->named_parameters()) fill(item.key(), item.value());
  for (auto& item : model->named_buffers()) {
    if (item.key().find("step_load") == std::string::npos) fill(item.key(), item.value());
  }
  if (tensors_out) *tensors_out = contents.model;
  return model;
}

at::Tensor parse_tokens(const std::string& text) {
  std::vector<std::vector<int64_t>> rows(1);
  std::string token;
  for (size_t i = 0; i <= text.size(); ++i) {
    const char c = i < text.size() ? text[i] : ';';
    if (c == ' ' || c == ',' || c == ';') {
      if (!token.empty()) rows.back().push_back(std::stoll(token)), token.clear();
      if (c == ';' && !rows.back().empty()) rows.emplace_back();
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      token += c;
    } else {
      throw std::invalid_argument("--tokens: unexpected character '" + std::string(1, c) + "' (token ids, rows separated by ';')");
    }
  }
  if (rows.back().empty()) rows.pop_back();
  if (rows.empty()) throw std::invalid_argument("--tokens: no tokens");
  std::vector<int64_t> flat;
  for (const auto& row : rows) {
    if (row.size() != rows.front().size()) throw std::invalid_argument("--tokens: rows of different lengths");
    flat.insert(flat.end(), row.begin(), row.end());
  }
  return at::tensor(flat, at::kLong).view({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows.front().size())});
}

int run(const std::string& command, const launch::Args& args) {
  if (command == "import") {
    if (!args.has("hf") || !args.has("out")) throw std::invalid_argument("import needs --hf DIR and --out RUN_DIR");
    const std::string out = args.get("out");
    checkpoint::HfModel hf = checkpoint::import_hf(args.get("hf"));
    config::Config config = config::parse_config("{}", "defaults");
    config.model = hf.config;
    config.training.seq_len = std::min(config.training.seq_len, config.model.max_seq_len);
    config.training.run_dir = out;
    std::vector<std::string> overrides = args.all("set");
    config = config::parse_config(config::to_yaml(config), out + "/config.yaml", overrides);
    if (const std::string error = config.validate(); !error.empty()) throw std::runtime_error(out + "/config.yaml: " + error);
    // The model must build from this config and take every tensor.
    {
      auto model = std::make_shared<moe::MoEModel>(config.model);
      for (const auto& item : model->named_parameters()) {
        const auto it = hf.tensors.find(item.key());
        if (it == hf.tensors.end() || !it->second.sizes().equals(item.value().sizes())) {
          throw std::runtime_error("import: the model built from the converted config has no matching tensor for '" + item.key() + "'");
        }
      }
    }
    std::filesystem::create_directories(out);
    const std::string yaml = config::to_yaml(config);
    {
      std::ofstream file(out + "/config.yaml");
      file << yaml;
    }
    checkpoint::CheckpointContents contents;
    contents.model = std::move(hf.tensors);
    contents.config_yaml = yaml;
    contents.layout = "imported";
    const std::string dir = checkpoint::save_checkpoint(out, contents, /*keep=*/1);
    int64_t parameters = 0;
    for (const auto& [name, t] : contents.model) parameters += t.numel();
    std::printf("imported %s: %.2fM parameters -> %s (config %s/config.yaml)\n", hf.model_type.c_str(), parameters / 1e6, dir.c_str(), out.c_str());
    for (const std::string& note : hf.notes) std::printf("note: %s\n", note.c_str());
    return 0;
  }
  if (command == "export") {
    if (!args.has("checkpoint") || !args.has("hf")) throw std::invalid_argument("export needs --checkpoint PATH and --hf DIR");
    const std::string dir = checkpoint_dir(args.get("checkpoint"));
    const checkpoint::CheckpointContents contents = checkpoint::load_checkpoint(dir);
    const config::Config config = config::parse_config(contents.config_yaml, dir + "/config.yaml");
    const double shard_mb = std::stod(args.get("shard-mb", "4096"));
    if (!(shard_mb > 0)) throw std::invalid_argument("--shard-mb: must be > 0");
    checkpoint::export_hf(config.model, contents.model, args.get("hf"), static_cast<int64_t>(shard_mb * (1 << 20)));
    std::printf("exported %s as %s to %s\n", dir.c_str(), checkpoint::hf_model_type(config.model).c_str(), args.get("hf").c_str());
    return 0;
  }
  if (command == "logits") {
    if (!args.has("checkpoint") || !args.has("tokens") || !args.has("out")) {
      throw std::invalid_argument("logits needs --checkpoint PATH, --tokens and --out FILE");
    }
    const auto model = load_model(checkpoint_dir(args.get("checkpoint")));
    const at::Tensor tokens = parse_tokens(args.get("tokens"));
    if (tokens.max().item<int64_t>() >= model->config().vocab_size) throw std::invalid_argument("--tokens: an id beyond model.vocab_size");
    checkpoint::TensorMap out{{"logits", model->logits(tokens).contiguous()}};
    const auto moes = model->moe_layers();
    for (size_t i = 0; i < moes.size(); ++i) out["experts." + std::to_string(i)] = moes[i]->last_experts_TK.contiguous();
    checkpoint::write_safetensors(args.get("out"), out);
    std::printf("logits %s -> %s\n", c10::str(out["logits"].sizes()).c_str(), args.get("out").c_str());
    return 0;
  }
  throw std::invalid_argument("unknown command '" + command + "' (import, export, logits)");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  try {
    torch::set_num_threads(1);
    return run(argv[1], launch::parse_args(argc, argv, 2, {}));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-convert: error: %s\n", launch::error_message(e).c_str());
    return 1;
  }
}

# Parity with Hugging Face transformers (CPU, FP32): tiny DeepseekV3, DeepseekV2,
# Mixtral and Qwen2-MoE models built from a fixed seed with every weight drawn wide (so routing
# decisions are not ties), saved with save_pretrained, imported by moe-convert;
# the experts each MoE layer picks, the logits and the loss must equal
# transformers'. Then moe-convert's export of the imported model (sharded) and
# of a FrugalMoE-trained model must load in transformers and give FrugalMoE's logits.
#   python3 hf_parity.py BIN_DIR WORK_DIR [TRAINED_RUN_DIR]
import json, os, subprocess, sys
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM)

BIN, WORK = sys.argv[1], sys.argv[2]
CONVERT = os.path.join(BIN, "moe-convert")
TOKENS = torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11, 40, 17, 33, 6], [4, 8, 15, 16, 23, 42, 8, 1, 0, 63, 31, 20]])
TOKEN_TEXT = ";".join(" ".join(str(int(t)) for t in row) for row in TOKENS)


def run(*args):
    out = subprocess.run([CONVERT, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("FAIL: moe-convert %s: %s" % (" ".join(args), out.stderr.strip()))
    return out.stdout


def widen(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def hf_forward(model, tokens):
    """Logits and each router's chosen experts (sorted per token)."""
    picks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: picks.append(out[2].reshape(-1, out[2].shape[-1]).sort(-1).values))
             for name, m in model.named_modules()
             if type(m).__name__ in ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter", "MixtralTopKRouter", "Qwen2MoeTopKRouter")]
    with torch.no_grad():
        logits = model(tokens).logits
    for h in hooks:
        h.remove()
    return logits, picks


def loss_of(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


def ours(path, name):
    out = os.path.join(WORK, name + "_logits.safetensors")
    run("logits", "--checkpoint", path, "--tokens", TOKEN_TEXT, "--out", out)
    t = load_file(out)
    experts = [t["experts.%d" % i].sort(-1).values for i in range(len([k for k in t if k.startswith("experts.")]))]
    return t["logits"], experts


def compare(name, ref_logits, ref_picks, got_logits, got_picks):
    assert len(ref_picks) == len(got_picks), (name, len(ref_picks), len(got_picks))
    for i, (a, b) in enumerate(zip(ref_picks, got_picks)):
        same = (a == b).all(-1).float().mean().item()
        assert same == 1.0, "%s: MoE layer %d picks other experts for %.0f%% of tokens" % (name, i, 100 * (1 - same))
    diff = (got_logits - ref_logits).abs().max().item()
    loss_diff = abs(loss_of(got_logits, TOKENS) - loss_of(ref_logits, TOKENS))
    assert diff <= 1e-4 and loss_diff <= 1e-5, (name, diff, loss_diff)
    print("ok: %-38s experts equal in %d MoE layers, logits within %.1e (max |logit| %.2f), loss within %.1e"
          % (name, len(ref_picks), diff, ref_logits.abs().max().item(), loss_diff))


def v3(q_lora_rank, yarn, vocab=64):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=64, tie_word_embeddings=False, rope_parameters=rope))


def v2(topk_method):
    return DeepseekV2ForCausalLM(DeepseekV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=2.0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8, n_group=4, topk_group=2, topk_method=topk_method, num_experts_per_tok=3,
        first_k_dense_replace=1, max_position_embeddings=64, tie_word_embeddings=False))


def qwen2_moe():
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
        max_position_embeddings=64, tie_word_embeddings=False))


def mixtral():
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


torch.manual_seed(0)
cases = [("deepseek_v3 q_lora yarn", v3(24, True)), ("deepseek_v3 full-rank q", v3(None, False)),
         ("deepseek_v2 group-limited", v2("group_limited_greedy")), ("deepseek_v2 greedy", v2("greedy")), ("mixtral", mixtral()),
         ("qwen2_moe", qwen2_moe())]
for i, (name, model) in enumerate(cases):
    slug = name.replace(" ", "_").replace("-", "_")
    hf_dir, run_dir = os.path.join(WORK, "hf_" + slug), os.path.join(WORK, "imported_" + slug)
    widen(model.eval(), 100 + i).save_pretrained(hf_dir)
    subprocess.run(["rm", "-rf", run_dir])
    run("import", "--hf", hf_dir, "--out", run_dir)
    ref_logits, ref_picks = hf_forward(model, TOKENS)
    got_logits, got_picks = ours(run_dir, slug)
    compare("import " + name, ref_logits, ref_picks, got_logits, got_picks)
    # Back out, in shards of ~20 KB, and into transformers again.
    back = os.path.join(WORK, "exported_" + slug)
    subprocess.run(["rm", "-rf", back])
    run("export", "--checkpoint", run_dir, "--hf", back, "--shard-mb", "0.02")
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json")), "expected a sharded export"
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    compare("export " + name + " (sharded)", *hf_forward(reloaded, TOKENS), got_logits, got_picks)

if len(sys.argv) > 3:  # a model FrugalMoE trained (from an imported one): transformers must reproduce it
    trained = sys.argv[3]
    back = os.path.join(WORK, "exported_trained")
    subprocess.run(["rm", "-rf", back])
    run("export", "--checkpoint", trained, "--hf", back)
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    compare("export trained deepseek_v3", *hf_forward(model, TOKENS), *ours(trained, "trained"))

#!/usr/bin/env bash
# Hugging Face checkpoints in and out (tests/e2e/hf_parity.py): tiny DeepseekV3
# (with and without a query latent, with YaRN), DeepseekV2 (group-limited and
# greedy routing), Mixtral and Qwen2-MoE models from transformers imported by
# moe-convert give transformers' experts, logits and loss; their sharded exports load back into transformers alike. Then a tiny V3
# with the fixture tokenizer's vocabulary is imported, fine-tuned by moe-train
# from it (training.init_from) on the fixture corpus, and exported: transformers
# reproduces the trained model's logits. Needs transformers and safetensors
# (scripts/setup.sh installs them); skips with the reason where they are missing.
source "$(dirname "$0")/common.sh"
if ! python3 -c "import transformers, safetensors" 2>/dev/null; then
  skip "python3 cannot import transformers and safetensors (scripts/setup.sh installs them)"
fi
dir="$WORK_DIR/hf"; rm -rf "$dir"; mkdir -p "$dir"
CONVERT="$BIN_DIR/moe-convert"

# A model for the fixture corpus (512 tokens), saved by transformers, imported, fine-tuned.
python3 - "$dir/hf_trainable" <<'PY' 2>/dev/null
import sys, torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
torch.manual_seed(3)
DeepseekV3ForCausalLM(DeepseekV3Config(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
    qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
    max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(sys.argv[1])
PY
"$CONVERT" import --hf "$dir/hf_trainable" --out "$dir/imported" > "$dir/import.log" 2>&1 || { cat "$dir/import.log"; fail "import failed"; }
"$TRAIN" --config "$dir/imported/config.yaml" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" \
  --set "training.run_dir=$dir/finetune" --set "training.init_from=$dir/imported" --set training.steps=6 --set training.seq_len=32 \
  --set training.micro_batch_size=4 --set training.grad_accum_steps=1 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
  --set training.precision=fp32 --set training.threads=1 --set training.log_interval=1 --set optimizer.warmup_steps=1 \
  > "$dir/finetune.log" 2>&1 || { cat "$dir/finetune.log"; fail "fine-tune from the imported model failed"; }
grep -q "initialized the model from $dir/imported" "$dir/finetune.log" || fail "the fine-tune did not start from the imported weights"
python3 - "$dir/finetune/metrics.jsonl" <<'PY' || fail "fine-tune metrics"
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows), rows
# From a random 512-token model the first loss is near ln 512 = 6.24; it must fall.
assert abs(rows[0]["loss"] - math.log(512)) < 0.5 and rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
print("ok: fine-tuned the imported DeepseekV3 for 6 steps: loss %.3f -> %.3f" % (rows[0]["loss"], rows[-1]["loss"]))
PY
python3 "$(dirname "$0")/hf_parity.py" "$BIN_DIR" "$dir" "$dir/finetune" 2>&1 | grep -v "Writing model\|Loading weights\|^\[transformers\]" \
  | tee "$dir/parity.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "Hugging Face parity"
[ "$(grep -c '^ok:' "$dir/parity.log")" -eq 13 ] || fail "expected 13 parity checks"

ERROR_PREFIX=moe-convert: expect_error "config.json: key 'model_type': 'llama' is not supported (deepseek_v3, deepseek_v2, mixtral, qwen2_moe)" \
  bash -c "mkdir -p '$dir/llama' && echo '{\"model_type\": \"llama\"}' > '$dir/llama/config.json' && '$CONVERT' import --hf '$dir/llama' --out '$dir/x'"
cp -r "$dir/hf_trainable" "$dir/broken"
python3 - "$dir/broken/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1]); del t["model.layers.1.mlp.experts.3.up_proj.weight"]; save_file(t, sys.argv[1], metadata={"format": "pt"})
PY
ERROR_PREFIX=moe-convert: expect_error "tensor 'model.layers.1.mlp.experts.3.up_proj.weight' is missing" \
  "$CONVERT" import --hf "$dir/broken" --out "$dir/y"

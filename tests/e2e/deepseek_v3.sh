#!/usr/bin/env bash
# configs/deepseek-v3-mini.yaml (MLA, YaRN, MTP) shrunk to the fixture corpus:
# 30 steps on one rank, where the main loss and the MTP module's loss both fall
# and every metrics line reports the MTP loss; 20 steps with FP8 GEMMs (MLA's
# projections included) within 5% of that run; then DualPipeV at pp 2 — whose
# first rank holds the embedding, the head and the MTP module — and tp 2 against
# one process over 6 steps (first loss within 1e-5, all within 1e-4); MTP under
# a pipeline that splits the embedding from the head is refused in one line.
# Then every family's CPU-scale config (configs/*-mini.yaml) trains.
source "$(dirname "$0")/common.sh"
CONFIG="$(dirname "$0")/../../configs/deepseek-v3-mini.yaml"
SMALL=(--set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" --set model.vocab_size=512 --set model.hidden_size=64
       --set model.num_layers=3 --set model.ffn_hidden_size=128 --set model.moe_ffn_hidden_size=32 --set model.q_lora_rank=32
       --set model.kv_lora_rank=16 --set model.qk_nope_head_dim=8 --set model.qk_rope_head_dim=8 --set model.v_head_dim=8
       --set model.max_seq_len=256 --set model.rope_scaling.original_max_position_embeddings=64 --set training.seq_len=64
       --set training.precision=fp32 --set training.threads=1 --set budget.max_minutes=0 --set training.eval_sequences=16
       --set training.checkpoint_interval=0 --set training.log_interval=10)
dir="$WORK_DIR/v3mini"; rm -rf "$dir"
"$TRAIN" --config "$CONFIG" "${SMALL[@]}" --set training.steps=30 --set training.micro_batch_size=8 --set training.run_dir="$dir" \
  > "$dir.log" 2>&1 || { cat "$dir.log"; fail "deepseek-v3-mini failed"; }
python3 - "$dir/metrics.jsonl" <<'PY' || fail "deepseek-v3-mini losses"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 30 and all(len(r["mtp_loss"]) == 1 for r in rows)
first = sum(r["loss"] for r in rows[:3]) / 3; last = sum(r["loss"] for r in rows[-3:]) / 3
mtp_first = sum(r["mtp_loss"][0] for r in rows[:3]) / 3; mtp_last = sum(r["mtp_loss"][0] for r in rows[-3:]) / 3
assert last < first - 0.5 and mtp_last < mtp_first - 0.5, (first, last, mtp_first, mtp_last)
print("ok: deepseek-v3-mini (MLA, YaRN, MTP): loss %.3f -> %.3f, MTP loss %.3f -> %.3f over 30 steps" % (first, last, mtp_first, mtp_last))
PY

# FP8 GEMMs in MLA's projections, the experts and the MTP module: it trains too.
fp8="$WORK_DIR/v3mini_fp8"; rm -rf "$fp8"
"$TRAIN" --config "$CONFIG" "${SMALL[@]}" --set training.steps=20 --set training.micro_batch_size=8 --set precision.fp8=true \
  --set training.run_dir="$fp8" > "$fp8.log" 2>&1 || { cat "$fp8.log"; fail "deepseek-v3-mini in FP8 failed"; }
python3 - "$dir/metrics.jsonl" "$fp8/metrics.jsonl" <<'PY' || fail "deepseek-v3-mini FP8 losses"
import json, sys
bf = [json.loads(l) for l in open(sys.argv[1])][:20]; f8 = [json.loads(l) for l in open(sys.argv[2])]
assert len(f8) == 20 and abs(f8[0]["loss"] - bf[0]["loss"]) / bf[0]["loss"] < 0.01, (f8[0]["loss"], bf[0]["loss"])
assert f8[-1]["loss"] < f8[0]["loss"] - 0.5 and abs(f8[-1]["loss"] - bf[-1]["loss"]) / bf[-1]["loss"] < 0.05, (f8[-1]["loss"], bf[-1]["loss"])
print("ok: deepseek-v3-mini in FP8: loss %.3f -> %.3f over 20 steps (FP32 GEMMs: %.3f)" % (f8[0]["loss"], f8[-1]["loss"], bf[-1]["loss"]))
PY

STEPS=(--set training.steps=6 --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.grad_accum_steps=4
       --set training.micro_batch_size=2)
one="$WORK_DIR/v3mini_one"; rm -rf "$one"
"$TRAIN" --config "$CONFIG" "${SMALL[@]}" "${STEPS[@]}" --set training.run_dir="$one" > "$one.log" 2>&1 || { cat "$one.log"; fail "one process"; }
for layout in "dualpipev_pp2 2 --set parallel.pp=2 --set parallel.virtual_pp=2 --set parallel.pipeline_schedule=dualpipev" \
              "tp2 2 --set parallel.tp=2" "dp2_ep2 2 --set parallel.ep=2 --set training.micro_batch_size=1"; do
  read -r name ranks extra <<< "$layout"
  run="$WORK_DIR/v3mini_$name"; rm -rf "$run"
  mpirun -np "$ranks" "$TRAIN" --config "$CONFIG" "${SMALL[@]}" "${STEPS[@]}" $extra --set training.run_dir="$run" > "$run.log" 2>&1 \
    || { cat "$run.log"; fail "$name failed"; }
  python3 - "$one/metrics.jsonl" "$run/metrics.jsonl" "$name" <<'PY' || fail "$name differs from one process"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 6
first = abs(a[0]["loss"] - b[0]["loss"]) / a[0]["loss"]
worst = max(max(abs(x["loss"] - y["loss"]) / x["loss"], abs(x["mtp_loss"][0] - y["mtp_loss"][0]) / x["mtp_loss"][0]) for x, y in zip(a, b))
assert first <= 1e-5 and worst <= 1e-4, (first, worst)
print("ok: deepseek-v3-mini %-14s first loss within %.1e, losses and MTP losses within %.1e of one process" % (sys.argv[3], first, worst))
PY
done
ERROR_PREFIX=moe-train: expect_error "model.mtp_depth: multi-token prediction needs the embedding on the head's rank" \
  mpirun -np 2 "$TRAIN" --config "$CONFIG" "${SMALL[@]}" "${STEPS[@]}" --set parallel.pp=2 --set training.run_dir="$WORK_DIR/v3mini_pp2"

# Every family's CPU-scale config (DeepSeek-V3, DeepSeek-V2-Lite, Mixtral, Qwen2-MoE) on the fixture vocabulary: its loss falls.
for mini in "$(dirname "$0")"/../../configs/*-mini.yaml; do
  name=$(basename "$mini" .yaml); run="$WORK_DIR/mini_$name"; rm -rf "$run"
  "$TRAIN" --config "$mini" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" --set model.vocab_size=512 \
    --set training.seq_len=64 --set training.micro_batch_size=8 --set training.steps=15 --set training.precision=fp32 \
    --set training.threads=1 --set budget.max_minutes=0 --set training.eval_sequences=16 --set training.checkpoint_interval=0 \
    --set optimizer.warmup_steps=3 --set training.run_dir="$run" > "$run.log" 2>&1 || { cat "$run.log"; fail "$name failed"; }
  python3 - "$run/metrics.jsonl" "$name" <<'PY' || fail "$name: the loss does not fall"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first = sum(r["loss"] for r in rows[:3]) / 3; last = sum(r["loss"] for r in rows[-3:]) / 3
assert len(rows) == 15 and last < first - 0.3, (first, last)
print("ok: %-24s loss %.3f -> %.3f over 15 steps" % (sys.argv[2], first, last))
PY
done

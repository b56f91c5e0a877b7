#!/usr/bin/env bash
# optimizer.name: muon in moe-train. Distributed Muon against one process from
# the same seed (20 steps' losses within 1e-4): dp2 + ep2 (each rank
# orthogonalizes its own experts' matrices), dp2 with ZeRO-1 (each matrix whole
# on its owner), dp2 + ep2 with ZeRO-1, pp2 (each stage its own), tp2 and
# dp2 x tp2 + ep2 with ZeRO-1 (split matrices gathered over tp), and dp2 + ep2
# with BF16 momentum against one process with it. Resume from a step-5
# checkpoint is bit-identical with BF16 momentum and stochastically rounded BF16
# master weights (and for AdamW with such weights), and under 4 bytes a parameter
# (FP4 gradients, FP8 momentum and moments); Muon state written under
# dp2 + ep2 resumes under one process like continuing under dp2 + ep2 (1e-5).
# QK-clip (optimizer.qk_clip_threshold) under dp2 + ep2, tp2 and dp2 x tp2 + ep2
# with ZeRO-1 against one process: the same losses, heads clipped and largest logits.
# Refused in one line: resuming an AdamW checkpoint with Muon.
source "$(dirname "$0")/common.sh"
ERROR_PREFIX="moe-train: error"
MUON=(--set optimizer.name=muon --set optimizer.adamw_lr=0.003 --set optimizer.lr=0.01)
ARGS=(--set training.steps=20 --set training.checkpoint_interval=0 "${MUON[@]}")
run() { local dir="$1"; shift; rm -rf "$dir"; mpirun --bind-to none "$@" > "$dir.log" 2>&1 || { cat "$dir.log"; fail "run $dir failed"; }; }
W="$WORK_DIR/muon"; mkdir -p "$W"
run "$W/single" -np 1 "$TRAIN" $(micro_args "$W/single") "${ARGS[@]}" --set training.grad_accum_steps=2
run "$W/single_bf16" -np 1 "$TRAIN" $(micro_args "$W/single_bf16") "${ARGS[@]}" --set training.grad_accum_steps=2 --set optimizer.exp_avg_dtype=bf16
run "$W/ep2" -np 2 "$TRAIN" $(micro_args "$W/ep2") "${ARGS[@]}" --set parallel.ep=2
run "$W/zero1" -np 2 "$TRAIN" $(micro_args "$W/zero1") "${ARGS[@]}" --set parallel.zero1=true
run "$W/ep2zero1" -np 2 "$TRAIN" $(micro_args "$W/ep2zero1") "${ARGS[@]}" --set parallel.ep=2 --set parallel.zero1=true
run "$W/pp2" -np 2 "$TRAIN" $(micro_args "$W/pp2") "${ARGS[@]}" --set parallel.pp=2 --set training.grad_accum_steps=2
# Tensor parallelism: each split matrix gathered over tp, orthogonalized by its owner, broadcast back.
run "$W/tp2" -np 2 "$TRAIN" $(micro_args "$W/tp2") "${ARGS[@]}" --set parallel.tp=2 --set training.grad_accum_steps=2
run "$W/mixed" -np 4 "$TRAIN" $(micro_args "$W/mixed") "${ARGS[@]}" --set parallel.tp=2 --set parallel.ep=2 --set parallel.zero1=true
run "$W/ep2_bf16" -np 2 "$TRAIN" $(micro_args "$W/ep2_bf16") "${ARGS[@]}" --set parallel.ep=2 --set optimizer.exp_avg_dtype=bf16
# QK-clip at a threshold the micro model's logits (about 0.13-0.2) pass: the largest logit is the max over the
# data-parallel replicas, so dp2 + ep2 clips the same heads as one process.
CLIP=(--set optimizer.qk_clip_threshold=0.15)
run "$W/single_clip" -np 1 "$TRAIN" $(micro_args "$W/single_clip") "${ARGS[@]}" "${CLIP[@]}" --set training.grad_accum_steps=2
run "$W/ep2_clip" -np 2 "$TRAIN" $(micro_args "$W/ep2_clip") "${ARGS[@]}" "${CLIP[@]}" --set parallel.ep=2
# Under tensor parallelism each rank records and clips its own heads; the metrics reduce over tp.
run "$W/tp2_clip" -np 2 "$TRAIN" $(micro_args "$W/tp2_clip") "${ARGS[@]}" "${CLIP[@]}" --set parallel.tp=2 --set training.grad_accum_steps=2
run "$W/mixed_clip" -np 4 "$TRAIN" $(micro_args "$W/mixed_clip") "${ARGS[@]}" "${CLIP[@]}" --set parallel.tp=2 --set parallel.ep=2 --set parallel.zero1=true
grep -q "optimizer muon" "$W/single.log" || fail "the run does not say it uses Muon"
python3 - "$W" <<'PY'
import json, sys
load = lambda name: [json.loads(l) for l in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
for ref_name, names in (("single", ["ep2", "zero1", "ep2zero1", "pp2", "tp2", "mixed"]), ("single_bf16", ["ep2_bf16"]), ("single_clip", ["ep2_clip", "tp2_clip", "mixed_clip"])):
    ref = load(ref_name)
    for name in names:
        other = load(name)
        assert len(other) == len(ref) == 20, (name, len(other))
        worst = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ref, other))
        print(f"ok: muon {name:<9} 20 losses within {worst:.1e} of one process")
        assert worst <= 1e-4, (name, worst)
# QK-clip: every line reports each layer's largest logit and the heads clipped;
# heads were clipped, and the clipped run differs from the unclipped one.
clip, plain = load("single_clip"), load("single")
assert all(len(r["max_attention_logit"]) == 3 for r in clip), clip[0]
clipped = sum(r["qk_clipped_heads"] for r in clip)
assert clipped > 0 and [r["loss"] for r in clip] != [r["loss"] for r in plain], clipped
for name in ("ep2_clip", "tp2_clip", "mixed_clip"):
    assert [r["qk_clipped_heads"] for r in clip] == [r["qk_clipped_heads"] for r in load(name)], name
    worst = max(abs(x - y) for a, b in zip(clip, load(name)) for x, y in zip(a["max_attention_logit"], b["max_attention_logit"]))
    assert worst <= 1e-4, (name, worst)
assert "max_attention_logit" not in plain[0]
print(f"ok: qk-clip: {clipped:.0f} head clips over 20 steps, the same heads and largest logits under dp2+ep2, tp2 and dp2 x tp2 + ep2")
first, last = load("single")[0]["loss"], load("single")[-1]["loss"]
assert last < first - 1.0, (first, last)
print(f"ok: muon trains: loss {first:.4f} -> {last:.4f} in 20 steps")
PY

# Resume: stopped at step 5 and resumed, bit-identical to the uninterrupted run:
# Muon with BF16 momentum and BF16 master weights rounded stochastically, AdamW
# with the same master weights, and Muon with those under 4 bytes a parameter
# (FP4 gradients, rounded stochastically too; FP8 momentum and second moments:
# 3.99 bytes on the micro model, whose embedding and head keep AdamW), the
# same with NVFP4 gradients (16-value tiles with E4M3 scales), and FP6
# gradients with FP6 momentum.
resume_check() {  # tag, extra flags...
  local tag=$1; shift
  local args=(--set training.steps=10 --set training.checkpoint_interval=5 "$@")
  rm -rf "$W/full_$tag" "$W/cut_$tag"
  "$TRAIN" $(micro_args "$W/full_$tag") "${args[@]}" > "$W/full_$tag.log" 2>&1 || { cat "$W/full_$tag.log"; fail "$tag: uninterrupted run failed"; }
  "$TRAIN" $(micro_args "$W/cut_$tag") "${args[@]}" --stop-at 5 > "$W/cut_$tag.log" 2>&1 || { cat "$W/cut_$tag.log"; fail "$tag: run stopped at 5 failed"; }
  "$TRAIN" $(micro_args "$W/cut_$tag") "${args[@]}" --resume > "$W/cut2_$tag.log" 2>&1 || { cat "$W/cut2_$tag.log"; fail "$tag: resume failed"; }
  [ "$(losses "$W/full_$tag/metrics.jsonl")" = "$(losses "$W/cut_$tag/metrics.jsonl")" ] || fail "$tag: resume is not bit-identical"
  echo "ok: $tag resumed at step 5 bit-identical"
}
SR=(--set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true)
resume_check muon_bf16_sr "${MUON[@]}" --set optimizer.exp_avg_dtype=bf16 "${SR[@]}"
resume_check adamw_bf16_sr "${SR[@]}"
resume_check muon_fp4_grads "${MUON[@]}" "${SR[@]}" --set optimizer.grad_dtype=fp4 --set optimizer.exp_avg_dtype=fp8 \
  --set optimizer.exp_avg_sq_dtype=fp8
python3 - "$W/full_muon_fp4_grads/metrics.jsonl" <<'PY' || fail "the FP4-gradient run's state is not under 4 bytes a parameter"
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
assert last["state_bytes_per_param"] < 4.0, last["state_bytes_per_param"]
print("ok: Muon with FP4 gradients holds %.2f bytes of state a parameter" % last["state_bytes_per_param"])
PY
resume_check muon_nvfp4_grads "${MUON[@]}" "${SR[@]}" --set optimizer.grad_dtype=nvfp4 --set optimizer.exp_avg_dtype=fp8 \
  --set optimizer.exp_avg_sq_dtype=fp8
[ "$(losses "$W/full_muon_nvfp4_grads/metrics.jsonl")" != "$(losses "$W/full_muon_fp4_grads/metrics.jsonl")" ] ||
  fail "NVFP4 gradients trained exactly as FP4 ones"
# FP6 gradients and FP6 momentum (E2M3, 32-value tiles, E8M0 scales), FP8 second moments: under 4 bytes a parameter.
resume_check muon_fp6 "${MUON[@]}" "${SR[@]}" --set optimizer.grad_dtype=fp6 --set optimizer.exp_avg_dtype=fp6 --set optimizer.exp_avg_sq_dtype=fp8
python3 - "$W/full_muon_fp6/metrics.jsonl" <<'PY' || fail "the FP6 run's state is not the expected bytes a parameter"
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
assert 3.5 < last["state_bytes_per_param"] < 4.0, last["state_bytes_per_param"]
print("ok: Muon with FP6 gradients and momentum holds %.2f bytes of state a parameter" % last["state_bytes_per_param"])
PY
# Stochastic rounding changes what a BF16 master keeps: the runs differ from round-to-nearest.
rm -rf "$W/rn"
"$TRAIN" $(micro_args "$W/rn") --set training.steps=10 --set training.checkpoint_interval=0 --set optimizer.main_params_dtype=bf16 > "$W/rn.log" 2>&1 ||
  { cat "$W/rn.log"; fail "round-to-nearest run failed"; }
[ "$(losses "$W/rn/metrics.jsonl")" != "$(losses "$W/full_adamw_bf16_sr/metrics.jsonl")" ] || fail "stochastic rounding changed nothing"

# Reshard: Muon state written under dp2 + ep2, resumed under one process, against continuing under dp2 + ep2.
RS=(--set training.steps=10 --set training.checkpoint_interval=0 --set training.eval_interval=0 "${MUON[@]}")
rm -rf "$W/rs_a" "$W/rs_b"
mpirun --bind-to none -np 2 "$TRAIN" $(micro_args "$W/rs_a") "${RS[@]}" --set parallel.ep=2 --stop-at 5 > "$W/rs_a.log" 2>&1 ||
  { cat "$W/rs_a.log"; fail "dp2+ep2 run stopped at 5 failed"; }
cp -r "$W/rs_a" "$W/rs_b"
mpirun --bind-to none -np 2 "$TRAIN" $(micro_args "$W/rs_a") "${RS[@]}" --set parallel.ep=2 --resume > "$W/rs_a2.log" 2>&1 ||
  { cat "$W/rs_a2.log"; fail "resuming under dp2+ep2 failed"; }
"$TRAIN" $(micro_args "$W/rs_b") "${RS[@]}" --set training.grad_accum_steps=2 --set training.micro_batch_size=8 --resume > "$W/rs_b2.log" 2>&1 ||
  { cat "$W/rs_b2.log"; fail "resuming dp2+ep2's Muon state under one process failed"; }
grep -q "optimizer state resharded: written under" "$W/rs_b2.log" || fail "the layout change is not printed"
python3 - "$W/rs_a/metrics.jsonl" "$W/rs_b/metrics.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])][5:]; b = [json.loads(l) for l in open(sys.argv[2])][5:]
assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6, 11)), ([r["step"] for r in a], [r["step"] for r in b])
worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
assert worst <= 1e-5, worst
print(f"ok: muon state dp2+ep2 -> one process: steps 6-10 within {worst:.1e} of continuing under dp2+ep2")
PY

# Refused in one line.
expect_error() {  # expected text, command...
  local want=$1; shift
  local out; out=$("$@" 2>&1) && fail "accepted: $*"
  [ "$(grep -c "^$ERROR_PREFIX" <<< "$out")" = 1 ] || { echo "$out"; fail "not one line: $*"; }
  grep -q "$want" <<< "$out" || { echo "$out"; fail "wrong error for: $*"; }
  echo "ok: refused: $(grep "^$ERROR_PREFIX" <<< "$out")"
}
rm -rf "$W/adamw"
"$TRAIN" $(micro_args "$W/adamw") --set training.steps=10 --set training.checkpoint_interval=5 --stop-at 5 > "$W/adamw.log" 2>&1 ||
  { cat "$W/adamw.log"; fail "AdamW run failed"; }
expect_error "was written by AdamW; this run's optimizer.name is muon" \
  "$TRAIN" $(micro_args "$W/adamw") --set training.steps=10 --set training.checkpoint_interval=5 "${MUON[@]}" --resume

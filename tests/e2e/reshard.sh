#!/usr/bin/env bash
# Optimizer state resharded on load: a run stopped at step 5 under layout A
# resumes under layout B, and its next 5 losses equal those of the same
# checkpoint resumed under A within 1e-5 relative; the layout change is printed.
# FP32 AdamW, A -> B: dp2 -> one process, one process -> dp4, dp2+ep2 -> dp4+ep4,
# dp4+ep4 -> dp2+ep2 (experts per rank doubling), dp2 x tp2 + ep2 -> dp4+ep4,
# tp2 -> one process, dp2+ep2 with ZeRO-1 -> dp4+ep2 with ZeRO-1, dp4+ep2 with
# ZeRO-1 -> one process; pipelines: pp2 (1F1B) -> one process, one process ->
# pp2 x dp2 with ZeRO-1, pp2 under DualPipeV (two stages a rank) -> dp2+ep2 and
# back with its F&B pairs overlapped (parallel.fb_overlap),
# dp2+ep2 -> dp4+ep4 with the expert exchanges overlapped (parallel.ep_overlap). Low precision: FP8 moments with BF16 master weights
# dp2+ep2 -> one process, BF16 moments dp2+ep2 -> dp4+ep4, and Muon's FP6
# momentum (with FP8 second moments) dp2+ep2 -> one process; the FP8 state
# written again by `moe-train --reshard` under one process and under dp4+ep4 is
# byte-identical to what dp2+ep2 wrote (the loaded tensors are the stored ones).
# Refused in one line: FP8 state under a tp split that would cut its tiles, and
# FP16 state (one scale per shard) written under ep2 resumed under another layout.
source "$(dirname "$0")/common.sh"
STEPS=(--set training.steps=10 --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0
       --set training.grad_accum_steps=1)
layout_args() {  # a layout name -> ranks and --set flags (8 sequences per step whatever dp is)
  case "$1" in
    one) echo "1 --set training.micro_batch_size=8" ;;
    dp2_ep2) echo "2 --set parallel.ep=2 --set training.micro_batch_size=4" ;;
    dp4_ep4) echo "4 --set parallel.ep=4 --set training.micro_batch_size=2" ;;
    dp2_tp2_ep2) echo "4 --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=4" ;;
    tp2) echo "2 --set parallel.tp=2 --set training.micro_batch_size=8" ;;
    dp4) echo "4 --set training.micro_batch_size=2" ;;
    dp2) echo "2 --set training.micro_batch_size=4" ;;
    pp2) echo "2 --set parallel.pp=2 --set training.grad_accum_steps=4 --set training.micro_batch_size=2" ;;
    pp2_dp2_zero1) echo "4 --set parallel.pp=2 --set parallel.zero1=true --set training.grad_accum_steps=4 --set training.micro_batch_size=1" ;;
    pp2_dualpipev) echo "2 --set parallel.pp=2 --set parallel.pipeline_schedule=dualpipev --set parallel.virtual_pp=2 --set training.grad_accum_steps=4 --set training.micro_batch_size=2" ;;
    pp2_dualpipev_fb) echo "2 --set parallel.pp=2 --set parallel.pipeline_schedule=dualpipev --set parallel.virtual_pp=2 --set training.grad_accum_steps=4 --set training.micro_batch_size=2 --set parallel.fb_overlap=true" ;;
    dp2_ep2_zero1) echo "2 --set parallel.ep=2 --set parallel.zero1=true --set training.micro_batch_size=4" ;;
    dp4_ep2_zero1) echo "4 --set parallel.ep=2 --set parallel.zero1=true --set training.micro_batch_size=2" ;;
  esac
}
train() {  # dir, layout, extra...
  local dir=$1 layout=$2; shift 2
  read -r ranks flags <<< "$(layout_args "$layout")"
  mpirun -np "$ranks" "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" $flags "$@"
}
reshard() {  # from, to, [tag, extra flags for every run...]
  local from=$1 to=$2 tag=${3:-}; shift 2; [ $# -gt 0 ] && shift
  local base="$WORK_DIR/reshard_${from}_to_${to}${tag}"
  rm -rf "$base".*
  train "$base.a" "$from" "$@" --stop-at 5 > "$base.a.log" 2>&1 || { cat "$base.a.log"; fail "$from: the first 5 steps failed"; }
  cp -r "$base.a" "$base.b"
  train "$base.a" "$from" "$@" --resume > "$base.a2.log" 2>&1 || { cat "$base.a2.log"; fail "$from: resuming under $from failed"; }
  train "$base.b" "$to" "$@" --resume > "$base.b2.log" 2>&1 || { cat "$base.b2.log"; fail "$from -> $to: resuming failed"; }
  [ "$from" = "$to" ] || grep -q "optimizer state resharded: written under" "$base.b2.log" || fail "$from -> $to: the layout change is not printed"
  python3 - "$base.a/metrics.jsonl" "$base.b/metrics.jsonl" "$from -> $to$tag" <<'PY' || fail "$from -> $to: losses differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])][5:]; b = [json.loads(l) for l in open(sys.argv[2])][5:]
assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6, 11))
worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
assert worst <= 1e-5, worst
print("ok: %-30s steps 6-10 within %.1e of continuing under the first layout" % (sys.argv[3], worst))
PY
}
reshard dp2 one
reshard dp2_ep2 dp4_ep4
reshard dp4_ep4 dp2_ep2
reshard dp2_tp2_ep2 dp4_ep4
reshard tp2 one
reshard one dp4
reshard dp2_ep2_zero1 dp4_ep2_zero1
reshard dp4_ep2_zero1 one
reshard pp2 one
reshard one pp2_dp2_zero1
reshard pp2_dualpipev dp2_ep2
reshard dp2_ep2 pp2_dualpipev_fb  # into DualPipeV with its F&B pairs overlapped
reshard dp2_ep2 dp4_ep4 _overlap --set parallel.ep_overlap=true  # expert exchanges overlapped in both

FP8=(--set optimizer.exp_avg_dtype=fp8 --set optimizer.exp_avg_sq_dtype=fp8 --set optimizer.main_params_dtype=bf16)
reshard dp2_ep2 one _fp8 "${FP8[@]}"
reshard dp2_ep2 dp4_ep4 _bf16 --set optimizer.exp_avg_dtype=bf16 --set optimizer.exp_avg_sq_dtype=bf16
reshard dp2_ep2 one _fp6 --set optimizer.name=muon --set optimizer.exp_avg_dtype=fp6 --set optimizer.grad_dtype=fp6 "${FP8[@]:2}"

# The FP8 state as loaded under other layouts, written again: the same bytes.
src="$WORK_DIR/reshard_dp2_ep2_to_one_fp8.a/checkpoints/step_00000005"
for layout in one dp4_ep4; do
  dir="$WORK_DIR/reshard_fp8_$layout"; rm -rf "$dir"
  train "$dir" "$layout" "${FP8[@]}" --resume="$src" --reshard > "$dir.log" 2>&1 || { cat "$dir.log"; fail "--reshard under $layout failed"; }
  for file in optimizer.safetensors model.safetensors; do
    cmp -s "$src/$file" "$dir/checkpoints/step_00000005/$file" || fail "FP8 state resharded dp2+ep2 -> $layout: $file differs"
  done
done
echo "ok: FP8 state written under dp2+ep2, loaded under one process and dp4+ep4 and written again: byte-identical"

ERROR_PREFIX=moe-train: expect_error "optimizer state 'exp_avg.embedding.weight.data' cannot be split exactly under layout dp1 pp1 tp2 ep1: its FP8 tiles of 128 values would cross" \
  train "$WORK_DIR/reshard_fp8_tp2" tp2 "${FP8[@]}" --resume="$src"
dir="$WORK_DIR/reshard_fp16"; rm -rf "$dir"
train "$dir" dp2_ep2 --set optimizer.exp_avg_sq_dtype=fp16 --stop-at 3 > "$dir.log" 2>&1 || { cat "$dir.log"; fail "fp16-state run failed"; }
ERROR_PREFIX=moe-train: expect_error "optimizer state was written under layout dp2 pp1 tp1 ep2; resume under that layout" \
  train "$dir" dp4_ep4 --set optimizer.exp_avg_sq_dtype=fp16 --resume

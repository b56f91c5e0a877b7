#!/usr/bin/env bash
# Stopping after step 17 and resuming reproduces the uninterrupted run's losses bit
# for bit: with FP32 state (and no checkpoint at the end), and with FP8 GEMMs plus
# FP16 / FP8 optimizer state.
source "$(dirname "$0")/common.sh"
check_resume() {
  local tag="$1"; shift
  local a="$WORK_DIR/resume_${tag}_a" b="$WORK_DIR/resume_${tag}_b"
  rm -rf "$a" "$b"
  "$TRAIN" $(micro_args "$a") --set training.steps=30 "$@" > "$a.log" 2>&1 || { cat "$a.log"; fail "$tag: run A failed"; }
  "$TRAIN" $(micro_args "$b") --set training.steps=30 "$@" --stop-at 17 > "$b.log" 2>&1 || { cat "$b.log"; fail "$tag: run B failed"; }
  grep -q "stopped at step 17" "$b.log" || fail "$tag: run B did not stop at 17"
  [ "$(cat "$b/checkpoints/latest")" = "step_00000017" ] || fail "$tag: no checkpoint at the stop"
  "$TRAIN" $(micro_args "$b") --set training.steps=30 "$@" --resume > "$b.resume.log" 2>&1 || { cat "$b.resume.log"; fail "$tag: resume failed"; }
  grep -q "resumed from" "$b.resume.log" || fail "$tag: did not resume"
  diff <(losses "$a/metrics.jsonl") <(losses "$b/metrics.jsonl") || fail "$tag: losses differ after resume"
  [ "$(wc -l < "$b/metrics.jsonl")" -eq 30 ] || fail "$tag: metrics should hold 30 steps"
  echo "ok: $tag: 30 losses identical"
}
# training.checkpoint_at_end: false: the stop at 17 and the interval's step 20 still
# save (so the resume works), the last step saves nothing.
check_resume fp32 --set training.checkpoint_at_end=false
for run in a b; do
  [ "$(cat "$WORK_DIR/resume_fp32_$run/checkpoints/latest")" = step_00000020 ] || fail "checkpoint_at_end: false: run $run's latest is not step 20"
  [ ! -e "$WORK_DIR/resume_fp32_$run/checkpoints/step_00000030" ] || fail "checkpoint_at_end: false saved after the last step"
done
echo "ok: checkpoint_at_end: false saves the stop and the interval, not the end"
check_resume fp8 --set precision.fp8=true --set optimizer.main_params_dtype=fp16 --set optimizer.grad_dtype=fp8 \
  --set optimizer.exp_avg_dtype=fp8 --set optimizer.exp_avg_sq_dtype=fp8

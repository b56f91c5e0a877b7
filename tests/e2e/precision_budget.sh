#!/usr/bin/env bash
# training.precision: auto follows the measured GEMM rates (injected here, so the
# outcome does not depend on the machine); an explicit bf16 on a machine where it
# is slower warns once and runs. A schedule sized by a wall-clock budget is fixed
# once after its calibration steps, ends with the decay finished, and a run
# stopped and resumed reproduces the uninterrupted one bit for bit.
source "$(dirname "$0")/common.sh"
unset FMOE_GEMM_GFLOPS  # each run below injects its own rates, or measures
SHORT=(--set training.steps=2 --set optimizer.warmup_steps=1 --set training.eval_interval=0 --set training.checkpoint_interval=0)
dir="$WORK_DIR/auto_avx2"; rm -rf "$dir"
FMOE_GEMM_GFLOPS="bf16=1.3,fp32=121" "$TRAIN" $(micro_args "$dir") --set training.precision=auto "${SHORT[@]}" > "$dir.log" 2>&1 \
  || { cat "$dir.log"; fail "auto run failed"; }
grep -qx "precision auto -> fp32 (bf16 GEMM 1.3 GFLOP/s, fp32 121 GFLOP/s, injected by FMOE_GEMM_GFLOPS, not measured)" "$dir.log" \
  || { cat "$dir.log"; fail "auto did not pick fp32, or the line does not say the rates were injected"; }
grep -q '"precision":"fp32"' "$dir/metrics.jsonl" || fail "metrics do not record fp32"
grep -q '"injected":\["FMOE_GEMM_GFLOPS"\]' "$dir/metrics.jsonl" || fail "metrics do not say the GEMM rates (and so MFU's peak) were injected"
dir="$WORK_DIR/auto_amx"; rm -rf "$dir"
FMOE_GEMM_GFLOPS="bf16=690,fp32=190" "$TRAIN" $(micro_args "$dir") --set training.precision=auto "${SHORT[@]}" > "$dir.log" 2>&1 \
  || { cat "$dir.log"; fail "auto run failed"; }
grep -qx "precision auto -> bf16 (bf16 GEMM 690 GFLOP/s, fp32 190 GFLOP/s, injected by FMOE_GEMM_GFLOPS, not measured)" "$dir.log" || { cat "$dir.log"; fail "auto did not pick bf16"; }
dir="$WORK_DIR/explicit_bf16"; rm -rf "$dir"
FMOE_GEMM_GFLOPS="bf16=1.3,fp32=121" "$TRAIN" $(micro_args "$dir") --set training.precision=bf16 "${SHORT[@]}" > "$dir.log" 2>&1 \
  || { cat "$dir.log"; fail "explicit bf16 run failed"; }
[ "$(grep -c '^warning: training.precision bf16 is slower than fp32 on this machine (bf16 GEMM 1.3 GFLOP/s' "$dir.log")" -eq 1 ] \
  || { cat "$dir.log"; fail "no single warning for a slow explicit bf16"; }
grep -q '"precision":"bf16"' "$dir/metrics.jsonl" || fail "explicit bf16 did not run in bf16"
echo "ok: precision follows the measured rates"

# A 30-second budget with injected calibration (0.25 s per step, 0.5 s per validation
# pass): 0.9 x 30 - (4 x 0.25 + 0.5) spent - 0.5 for the final pass = 25 s at
# 0.25 + 0.5 / 20 s per step: 90 steps after the 4 calibration steps, 94 in all.
export FMOE_CALIBRATION="step=0.25,eval=0.5"
BUDGETED=(--set training.steps=0 --set budget.max_minutes=0.5 --set budget.calibration_steps=4 --set optimizer.warmup_steps=5
          --set training.checkpoint_interval=50 --set optimizer.lr_schedule=cosine)
a="$WORK_DIR/sized_a"; b="$WORK_DIR/sized_b"; rm -rf "$a" "$b"
"$TRAIN" $(micro_args "$a") "${BUDGETED[@]}" > "$a.log" 2>&1 || { cat "$a.log"; fail "budget-sized run failed"; }
grep -q "^schedule: 94 steps, fixed at step 4 from 0.250 s/step and 0.50 s per validation pass .*; times injected by FMOE_CALIBRATION, not measured)" "$a.log" \
  || { cat "$a.log"; fail "no schedule decision saying its times were injected"; }
grep -q '"injected":\["FMOE_CALIBRATION"\]' "$a/metrics.jsonl" || fail "metrics do not say the calibration was injected"
python3 - "$a/metrics.jsonl" <<'PY' || fail "the budget-sized schedule is wrong"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert len(rows) == 94, len(rows)
decided = [r for r in rows if "schedule" in r]
assert len(decided) == 1 and decided[0]["step"] == 4 and decided[0]["schedule"]["total_steps"] == 94, decided
assert "val_loss" in decided[0] and "val_loss" in rows[-1]
# The decay is finished: the last step (index 93) takes the cosine's last value over the
# 89 steps after warmup, 0.3% above min_lr (0.0005); the peak was 0.005.
import math
expected = 0.0005 + 0.5 * 0.0045 * (1 + math.cos(math.pi * 88 / 89))
assert abs(rows[-1]["lr"] - expected) < 1e-15, (rows[-1]["lr"], expected)
assert abs(max(r["lr"] for r in rows) - 0.005) < 1e-15
print(f"budget-sized: 94 steps, last lr {rows[-1]['lr']:.3e}, final val_loss {rows[-1]['val_loss']:.4f}")
PY
# Stopped during calibration, then after the decision: both resumes land on the same run.
"$TRAIN" $(micro_args "$b") "${BUDGETED[@]}" --stop-at 2 > "$b.log" 2>&1 || { cat "$b.log"; fail "stop during calibration failed"; }
"$TRAIN" $(micro_args "$b") "${BUDGETED[@]}" --resume --stop-at 37 >> "$b.log" 2>&1 || { cat "$b.log"; fail "resume to 37 failed"; }
python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["schedule"]; assert s["total_steps"] == 94, s' \
  "$b/checkpoints/step_00000037/trainer_state.json" || fail "the checkpoint does not record the schedule"
"$TRAIN" $(micro_args "$b") "${BUDGETED[@]}" --resume >> "$b.log" 2>&1 || { cat "$b.log"; fail "final resume failed"; }
[ "$(grep -c '^schedule:' "$b.log")" -eq 1 ] || { cat "$b.log"; fail "the schedule was decided more than once"; }
diff <(losses "$a/metrics.jsonl") <(losses "$b/metrics.jsonl") || fail "the resumed budget-sized run differs"
echo "ok: a budget-sized schedule is fixed once and resumes bit for bit"

# Two ranks time their steps apart; they must still fix one length (measured, not injected).
unset FMOE_CALIBRATION
c="$WORK_DIR/sized_ranks"; rm -rf "$c"
mpirun --bind-to none -np 2 "$TRAIN" $(micro_args "$c") --set training.steps=0 --set budget.max_minutes=0.1 \
  --set budget.calibration_steps=4 --set optimizer.warmup_steps=5 --set parallel.ep=2 > "$c.log" 2>&1 \
  || { cat "$c.log"; fail "a budget-sized run on two ranks failed"; }
python3 - "$c" <<'PY' || fail "the two-rank budget-sized run is inconsistent"
import json, os, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
fixed = [r for r in rows if "schedule" in r][0]["schedule"]["total_steps"]
# The length the checkpoint carries: as fixed, or resized alike on both ranks if the machine's speed changed.
checkpoints = f"{sys.argv[1]}/checkpoints"
total = json.load(open(os.path.join(checkpoints, open(f"{checkpoints}/latest").read().strip(), "trainer_state.json")))["schedule"]["total_steps"]
assert len(rows) == total and rows[-1]["step"] == total, (len(rows), total, fixed)
print(f"two ranks: {fixed} steps fixed, {total} run")
PY

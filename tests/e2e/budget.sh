#!/usr/bin/env bash
# A budget stops the run with a checkpoint and exit 0; --resume with a raised
# budget continues and reproduces the uninterrupted run's losses; spend carries over.
source "$(dirname "$0")/common.sh"
a="$WORK_DIR/budget_a"; b="$WORK_DIR/budget_b"; c="$WORK_DIR/budget_c"; rm -rf "$a" "$b" "$c"
"$TRAIN" $(micro_args "$a") --set training.steps=20 > "$a.log" 2>&1 || { cat "$a.log"; fail "reference run failed"; }

# A token budget of 8 steps (8 x 8 x 64 tokens): stops at step 8 exactly.
"$TRAIN" $(micro_args "$b") --set training.steps=20 --set budget.max_tokens=4096 --set budget.usd_per_gpu_hour=2 > "$b.log" 2>&1 \
  || { cat "$b.log"; fail "budgeted run exited non-zero"; }
grep -q "budget warning: 10240 tokens planned" "$b.log" || fail "no warning at start"
grep -q "budget reached at step 8: spent 4096 of budget.max_tokens 4096 tokens" "$b.log" || { cat "$b.log"; fail "no budget stop message"; }
[ "$(cat "$b/checkpoints/latest")" = "step_00000008" ] || fail "no checkpoint at the budget stop"
python3 - "$b/metrics.jsonl" <<'PY' || fail "spend missing from metrics"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows[-1]["gpu_hours"] > 0 and abs(rows[-1]["usd"] - 2 * rows[-1]["gpu_hours"]) < 1e-12
PY
spent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["elapsed_seconds"])' "$b/checkpoints/step_00000008/trainer_state.json")
"$TRAIN" $(micro_args "$b") --set training.steps=20 --set budget.usd_per_gpu_hour=2 --resume > "$b.resume.log" 2>&1 \
  || { cat "$b.resume.log"; fail "resume with a raised budget failed"; }
diff <(losses "$a/metrics.jsonl") <(losses "$b/metrics.jsonl") || fail "losses differ after the budget stop"
python3 - "$b/checkpoints/step_00000020/trainer_state.json" "$spent" <<'PY' || fail "spend did not carry over"
import json, sys
assert json.load(open(sys.argv[1]))["elapsed_seconds"] > float(sys.argv[2])
PY

# A GPU-hour budget smaller than one step: stops after the first step, and resumes.
"$TRAIN" $(micro_args "$c") --set training.steps=20 --set budget.max_gpu_hours=1e-9 > "$c.log" 2>&1 || { cat "$c.log"; fail "GPU-hour budget run exited non-zero"; }
grep -q "budget reached at step 1: spent .* of budget.max_gpu_hours" "$c.log" || { cat "$c.log"; fail "no GPU-hour budget stop"; }
"$TRAIN" $(micro_args "$c") --set training.steps=20 --set budget.max_gpu_hours=1e-9 --resume > "$c.again.log" 2>&1 || fail "exhausted resume exited non-zero"
grep -q "budget already spent at step 1" "$c.again.log" || { cat "$c.again.log"; fail "an exhausted budget should not train"; }
"$TRAIN" $(micro_args "$c") --set training.steps=20 --set budget.max_gpu_hours=100 --resume > "$c.resume.log" 2>&1 || fail "resume failed"
diff <(losses "$a/metrics.jsonl") <(losses "$c/metrics.jsonl") || fail "losses differ after the GPU-hour stop"
echo "ok: budget stops, resumes and reproduces the losses"

# A schedule sized by a 60-second budget with real timing (no injected
# calibration): tiny on the fixture corpus fixes its step count from its own
# measured steps and ends inside the budget with the decay finished (shortened
# or lengthened on the way if the machine's speed changes: the schedule the checkpoint carries).
unset FMOE_CALIBRATION FMOE_GEMM_GFLOPS
d="$WORK_DIR/budget_real"; rm -rf "$d"
t0=$(date +%s)
"$TRAIN" --config "$(dirname "$0")/../../configs/tiny.yaml" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" \
  --set "training.run_dir=$d" --set training.steps=0 --set budget.max_minutes=1 --set training.eval_sequences=16 \
  --set training.checkpoint_interval=0 --set training.threads=2 > "$d.log" 2>&1 || { cat "$d.log"; fail "the 60-second budget run failed"; }
wall=$(( $(date +%s) - t0 ))
grep -q "^schedule: [0-9]* steps, fixed at step 20 from .* s/step" "$d.log" || { cat "$d.log"; fail "no measured schedule decision"; }
grep -q "injected" "$d.log" && fail "the real-timing run says something was injected"
python3 - "$d/metrics.jsonl" "$d/checkpoints" "$wall" <<'PY' || { cat "$d.log"; fail "the budget-sized run did not end inside its budget"; }
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
fixed = [r for r in rows if "schedule" in r][0]["schedule"]["total_steps"]
latest = open(os.path.join(sys.argv[2], "latest")).read().strip()
state = json.load(open(os.path.join(sys.argv[2], latest, "trainer_state.json")))
total = state["schedule"]["total_steps"]                                # as fixed, or resized as the speed changed
assert rows[-1]["step"] == total, (rows[-1]["step"], total, fixed)      # the schedule ran to its end
assert rows[-1]["injected"] == [], rows[-1]["injected"]
spent = rows[-1]["gpu_hours"] * 3600                                    # one rank: GPU-hours are the trainer's clock
assert state["elapsed_seconds"] <= 60, state["elapsed_seconds"]      # steps, validation and the final checkpoint
assert spent <= 60, spent
print("ok: 60 s budget: %d steps%s, %.1f s of training by the trainer's clock, %s s for the whole command"
      % (total, "" if total == fixed else " (fixed at %d, resized)" % fixed, state["elapsed_seconds"], sys.argv[3]))
PY

# The same with the machine slowed for a while after the schedule is fixed
# (FMOE_SLOW_STEPS: steps 21-29 sleep 1 s more; the schedule is fixed at
# step 20): the 10-step window projects past the 90 s limit and the schedule is
# shortened; once the steps are fast again a window projects well inside the
# limit and it is lengthened back; the run still ends inside the budget (90 s
# leave room for the slow steps and the steps after them on a machine whose
# FP32 steps take 0.85 s, as well as on one where they take 0.45 s).
d="$WORK_DIR/budget_slowed"; rm -rf "$d"
FMOE_SLOW_STEPS=21:1.0:30 "$TRAIN" --config "$(dirname "$0")/../../configs/tiny.yaml" --set "data.prefix=$CORPUS/gcide" \
  --set "data.tokenizer=$CORPUS/tok.model" --set "training.run_dir=$d" --set training.steps=0 --set budget.max_minutes=1.5 \
  --set training.eval_sequences=16 --set training.checkpoint_interval=0 --set training.threads=2 > "$d.log" 2>&1 ||
  { cat "$d.log"; fail "the slowed 90-second budget run failed"; }
grep -q "^test hook: every step from 21 to 29 sleeps 1.000 s more" "$d.log" || { cat "$d.log"; fail "the slow-steps hook did not announce itself"; }
python3 - "$d.log" "$d/metrics.jsonl" "$d/checkpoints" <<'PY' || { cat "$d.log"; fail "the slowed run's schedule was not resized as expected"; }
import json, os, re, sys
resized = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in
           re.finditer(r"^schedule: (shortened|lengthened) to (\d+) steps at step (\d+): steps take", open(sys.argv[1]).read(), re.M)]
rows = [json.loads(l) for l in open(sys.argv[2])]
fixed = [r for r in rows if "schedule" in r][0]["schedule"]["total_steps"]
latest = open(os.path.join(sys.argv[3], "latest")).read().strip()
state = json.load(open(os.path.join(sys.argv[3], latest, "trainer_state.json")))
total = state["schedule"]["total_steps"]
kinds = [k for k, _, _ in resized]
assert "shortened" in kinds, resized                                    # the slow steps shortened it ...
first_short = kinds.index("shortened")
assert resized[first_short][1] < fixed and resized[first_short][2] <= 30, (resized, fixed)
grown = [r for r in resized[first_short + 1:] if r[0] == "lengthened"]
assert grown and grown[0][2] > 30 and grown[0][1] > resized[first_short][1], resized  # ... the fast ones after lengthened it
assert resized[-1][1] == total and rows[-1]["step"] == total, (resized, rows[-1]["step"], total)
assert state["elapsed_seconds"] <= 90, state["elapsed_seconds"]
print("ok: 90 s budget slowed over steps 21-29: fixed at %d steps, then %s; ran %d steps in %.1f s by the trainer's clock"
      % (fixed, ", ".join("%s to %d at step %d" % r for r in resized), total, state["elapsed_seconds"]))
PY

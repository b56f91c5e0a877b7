#!/usr/bin/env bash
# moe-plan's memory estimate for the tiny config on cpu-local agrees within 15% with
# the peak resident memory moe-train measures (getrusage ru_maxrss, the largest rank)
# over a run with validation and a checkpoint, at 1 and 2 data-parallel ranks, in
# the precision the run chose (training.precision: auto: FP32 where BF16 GEMMs are
# slow, BF16 where they are fast), which the plan is then given.
source "$(dirname "$0")/common.sh"
unset FMOE_GEMM_GFLOPS  # the precision these runs choose is the measured one
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PLAN="$BIN_DIR/moe-plan"
TINY=(--config "$ROOT/configs/tiny.yaml" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model"
      --set training.micro_batch_size=16 --set training.steps=12 --set optimizer.warmup_steps=2 --set training.eval_interval=12 --set training.eval_sequences=32
      --set training.checkpoint_interval=12 --set training.log_interval=4)
for ranks in 1 2; do
  run="$WORK_DIR/memory$ranks"; rm -rf "$run"
  mpirun -np $ranks --bind-to none "$TRAIN" "${TINY[@]}" --set "training.run_dir=$run" > "$run.log" 2>&1 || { cat "$run.log"; fail "tiny run at $ranks ranks failed"; }
  measured=$(sed -n 's/^peak resident memory: \([0-9.]*\) GiB.*/\1/p' "$run.log")
  [ -n "$measured" ] || fail "no peak resident memory line in $run.log"
  precision=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])["precision"])' "$run/metrics.jsonl")
  echo "$ranks rank(s) ran in $precision: $(grep -m1 '^precision' "$run.log")"
  "$PLAN" "${TINY[@]}" --set training.precision="$precision" --cluster "$ROOT/configs/clusters/cpu-local.yaml" --gpus $ranks --json > "$run.plan.json" || fail "moe-plan failed"
  python3 - "$measured" "$run.plan.json" "$ranks" <<'PY'
import json, sys
measured = float(sys.argv[1])
planned = json.load(open(sys.argv[2]))["memory_bytes"]["total"] / 2**30
error = planned / measured - 1
print(f"{sys.argv[3]} rank(s): measured {measured:.2f} GiB, planned {planned:.2f} GiB ({100 * error:+.1f}%)")
assert abs(error) <= 0.15, error
PY
done
# moe-plan --measured on the last run: the step it sets beside the plan is the
# mean of the run's step lines after the skipped ones, term by term.
"$PLAN" "${TINY[@]}" --set training.precision="$precision" --cluster "$ROOT/configs/clusters/cpu-local.yaml" --gpus 2 --json \
  --measured "$run" --skip 1 > "$run.against.json" || fail "moe-plan --measured failed"
python3 - "$run.against.json" "$run/metrics.jsonl" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1])); against = plan["against_run"]
steps = [l for l in map(json.loads, open(sys.argv[2])) if "step_seconds" in l and "time" in l][1:]
assert against["steps"] == len(steps) > 0, (against["steps"], len(steps))
terms = {t["term"]: t for t in against["terms"]}
mean = lambda f: sum(map(f, steps)) / len(steps)
for term, f in [("step", lambda s: s["step_seconds"]), ("compute", lambda s: s["time"]["compute"]),
                ("blocked in communication", lambda s: s["time"]["communication"]), ("optimizer", lambda s: s["time"]["optimizer"])]:
    assert abs(terms[term]["measured"] - mean(f)) <= 1e-9 * max(1, mean(f)), (term, terms[term], mean(f))
assert terms["step"]["planned"] == plan["step_seconds"]
assert abs(terms["step"]["error"] - (plan["step_seconds"] / mean(lambda s: s["step_seconds"]) - 1)) < 1e-12
assert against["within"] == (abs(terms["step"]["error"]) <= 0.15)
print(f"--measured: {len(steps)} steps, step planned {plan['step_seconds']:.3f} s against {mean(lambda s: s['step_seconds']):.3f} s")
PY
"$PLAN" "${TINY[@]}" --cluster "$ROOT/configs/clusters/cpu-local.yaml" --gpus 2 --measured "$run" --skip x > "$run.err" 2>&1 && fail "--skip x accepted"
grep -q "^moe-plan: error: --skip: expected a whole number >= 0, got 'x'$" "$run.err" || { cat "$run.err"; fail "unclear --skip error"; }
"$PLAN" "${TINY[@]}" --cluster "$ROOT/configs/clusters/cpu-local.yaml" --gpus 2 --measured "$run/nothing" > "$run.err" 2>&1 && fail "a missing run accepted"
grep -q "^moe-plan: error: $run/nothing: cannot read the run's metrics$" "$run.err" || { cat "$run.err"; fail "unclear missing-run error"; }
"$PLAN" "${TINY[@]}" --cluster "$ROOT/configs/clusters/cpu-local.yaml" --gpus 2 --skip 1 > "$run.err" 2>&1 && fail "--skip without --measured accepted"
grep -q "^moe-plan: error: --skip and --tolerance go with --measured$" "$run.err" || { cat "$run.err"; fail "unclear --skip error"; }
echo "PASS"

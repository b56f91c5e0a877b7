#!/usr/bin/env bash
# Two data-parallel ranks under mpirun train the same model as one process that
# accumulates the same two micro-batches: losses agree within 1e-5 relative over 20 steps.
source "$(dirname "$0")/common.sh"
one="$WORK_DIR/dp1"; two="$WORK_DIR/dp2"; rm -rf "$one" "$two"
"$TRAIN" $(micro_args "$one") --set training.steps=20 --set training.grad_accum_steps=2 > "$one.log" 2>&1 || { cat "$one.log"; fail "single process failed"; }
mpirun -np 2 --bind-to none "$TRAIN" $(micro_args "$two") --set training.steps=20 > "$two.log" 2>&1 || { cat "$two.log"; fail "mpirun -np 2 failed"; }
grep -q "layout dp=2" "$two.log" || fail "not a dp=2 run"
python3 - "$one/metrics.jsonl" "$two/metrics.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 20
worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
print(f"worst relative loss difference over 20 steps: {worst:.2e}")
assert worst <= 1e-5, worst
assert a[-1]["tokens_seen"] == b[-1]["tokens_seen"]
assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) / a[-1]["val_loss"] <= 1e-5
PY

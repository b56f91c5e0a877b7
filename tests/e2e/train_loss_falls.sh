#!/usr/bin/env bash
# A 40-step run lowers the loss, writes metrics, the resolved config and checkpoints.
source "$(dirname "$0")/common.sh"
run="$WORK_DIR/loss_falls"; rm -rf "$run"
"$TRAIN" $(micro_args "$run") > "$run.log" 2>&1 || { cat "$run.log"; fail "training failed"; }
[ "$(wc -l < "$run/metrics.jsonl")" -eq 40 ] || fail "expected 40 metrics lines"
python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first = sum(r["loss"] for r in rows[:3]) / 3
last = sum(r["loss"] for r in rows[-5:]) / 5
print(f"loss first3={first:.4f} last5={last:.4f} val={rows[-1]['val_loss']:.4f}")
assert last < first - 0.5, "loss did not fall"
assert rows[-1]["val_loss"] < first, "validation loss did not fall"
for key in ("lr", "grad_norm", "tokens_seen", "tokens_per_second", "mfu", "expert_load_max", "expert_load_mean"):
    assert key in rows[-1], key
assert rows[-1]["tokens_seen"] == 40 * 8 * 64
assert len(rows[-1]["expert_load_max"]) == 2  # two MoE layers
PY
grep -q "num_experts: 8" "$run/config.yaml" || fail "resolved config missing"
[ "$(cat "$run/checkpoints/latest")" = "step_00000040" ] || fail "latest checkpoint is not step 40"

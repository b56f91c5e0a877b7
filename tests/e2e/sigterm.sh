#!/usr/bin/env bash
# SIGTERM finishes the step, saves a checkpoint and exits 0.
source "$(dirname "$0")/common.sh"
run="$WORK_DIR/sigterm"; rm -rf "$run"
"$TRAIN" $(micro_args "$run") --set training.steps=100000 --set training.checkpoint_interval=0 > "$run.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$run/metrics.jsonl" ] && [ "$(wc -l < "$run/metrics.jsonl")" -ge 3 ] && break
  sleep 0.1
done
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
[ "$rc" -eq 0 ] || { cat "$run.log"; fail "exit code $rc after SIGTERM"; }
grep -q "stopped at step" "$run.log" || fail "no stop message"
step=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$(cat "$run/checkpoints/latest" | sed "s|^|$run/checkpoints/|")/trainer_state.json")
[ "$step" -ge 3 ] && [ "$step" -lt 100000 ] || fail "checkpoint step $step"
echo "ok: stopped and saved at step $step"

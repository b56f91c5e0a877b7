#!/usr/bin/env bash
# Stopping after step 17 and resuming reproduces the uninterrupted run's losses bit for bit.
source "$(dirname "$0")/common.sh"
a="$WORK_DIR/resume_a"; b="$WORK_DIR/resume_b"; rm -rf "$a" "$b"
"$TRAIN" $(micro_args "$a") --set training.steps=30 > "$a.log" 2>&1 || { cat "$a.log"; fail "run A failed"; }
"$TRAIN" $(micro_args "$b") --set training.steps=30 --stop-at 17 > "$b.log" 2>&1 || { cat "$b.log"; fail "run B failed"; }
grep -q "stopped at step 17" "$b.log" || fail "run B did not stop at 17"
[ "$(cat "$b/checkpoints/latest")" = "step_00000017" ] || fail "no checkpoint at the stop"
"$TRAIN" $(micro_args "$b") --set training.steps=30 --resume > "$b.resume.log" 2>&1 || { cat "$b.resume.log"; fail "resume failed"; }
grep -q "resumed from" "$b.resume.log" || fail "did not resume"
diff <(losses "$a/metrics.jsonl") <(losses "$b/metrics.jsonl") || fail "losses differ after resume"
[ "$(wc -l < "$b/metrics.jsonl")" -eq 30 ] || fail "metrics should hold 30 steps"
echo "ok: 30 losses identical"

#!/usr/bin/env bash
# A process killed in the middle of writing a checkpoint leaves the previous one current and loadable.
source "$(dirname "$0")/common.sh"
run="$WORK_DIR/crash"; rm -rf "$run"
"$TRAIN" $(micro_args "$run") --set training.steps=20 --stop-at 10 > "$run.log" 2>&1 || { cat "$run.log"; fail "first run failed"; }
rc=0
FMOE_CRASH_AFTER_CHECKPOINT_FILES=1 "$TRAIN" $(micro_args "$run") --set training.steps=20 --resume > "$run.crash.log" 2>&1 || rc=$?
[ "$rc" -eq 9 ] || { cat "$run.crash.log"; fail "expected the simulated crash (exit 9), got $rc"; }
[ "$(cat "$run/checkpoints/latest")" = "step_00000010" ] || fail "latest moved despite the crash"
ls -d "$run"/checkpoints/step_00000020* >/dev/null 2>&1 && ! [ -d "$run/checkpoints/step_00000020" ] || fail "a partial step 20 checkpoint became visible"
"$TRAIN" $(micro_args "$run") --set training.steps=20 --resume > "$run.resume.log" 2>&1 || { cat "$run.resume.log"; fail "resume after crash failed"; }
grep -q "resumed from .*step_00000010 at step 10" "$run.resume.log" || fail "did not resume from step 10"
[ "$(cat "$run/checkpoints/latest")" = "step_00000020" ] || fail "final checkpoint missing"
echo "ok: previous checkpoint survived the crash"

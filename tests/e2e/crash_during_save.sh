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

# The same with saves written in the background: the process dies inside the
# step-15 save while step 16 trains; step 10 stays the latest, and the next
# save clears the dead save's temporary directory.
run="$WORK_DIR/crash_async"; rm -rf "$run"
ASYNC=(--set training.steps=20 --set training.checkpoint_interval=5 --set training.async_checkpoint=true)
"$TRAIN" $(micro_args "$run") "${ASYNC[@]}" --stop-at 10 > "$run.log" 2>&1 || { cat "$run.log"; fail "first async run failed"; }
rc=0
FMOE_CRASH_AFTER_CHECKPOINT_FILES=2 "$TRAIN" $(micro_args "$run") "${ASYNC[@]}" --resume > "$run.crash.log" 2>&1 || rc=$?
[ "$rc" -eq 9 ] || { cat "$run.crash.log"; fail "expected the simulated crash in the background save (exit 9), got $rc"; }
[ "$(cat "$run/checkpoints/latest")" = "step_00000010" ] || fail "latest moved despite the crash in the background save"
[ -d "$run/checkpoints/step_00000015" ] && fail "a partial step 15 checkpoint became visible"
ls -d "$run"/checkpoints/step_00000015.tmp.* > /dev/null 2>&1 || fail "the killed background save left nothing to clear (did it run?)"
"$TRAIN" $(micro_args "$run") "${ASYNC[@]}" --resume > "$run.resume.log" 2>&1 || { cat "$run.resume.log"; fail "resume after the async crash failed"; }
grep -q "resumed from .*step_00000010 at step 10" "$run.resume.log" || fail "did not resume from step 10"
[ "$(cat "$run/checkpoints/latest")" = "step_00000020" ] || fail "final async checkpoint missing"
ls -d "$run"/checkpoints/*.tmp.* > /dev/null 2>&1 && fail "a dead save's temporary directory was left behind"
echo "ok: a crash inside a background save leaves step 10 current; the resumed run clears it and finishes"

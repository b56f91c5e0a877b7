#!/usr/bin/env bash
# kill -9 at moments drawn from a fixed seed (a few steps into each attempt,
# plus a fraction of a second: inside a step or a save), resume, again and
# again until the run is done: one process, and dp2 + ep2 with ZeRO-1 (4 ranks; one rank is
# killed and mpirun takes the others down), each with synchronous saves and with
# saves written in the background while the next steps run. The finished run must match the
# uninterrupted one: every step recorded exactly once in metrics.jsonl with the
# same loss, bit for bit, and the same final weights (model.safetensors byte
# for byte). Also: a damaged latest checkpoint is skipped for the newest earlier
# one with a one-line warning naming the file; --resume=PATH takes exactly that
# checkpoint; moe-ckpt lists, verifies and shows checkpoints.
source "$(dirname "$0")/common.sh"
CKPT="$BIN_DIR/moe-ckpt"
STEPS=(--set training.steps=24 --set training.checkpoint_interval=3 --set training.keep_checkpoints=3 --set training.eval_interval=0
       --set optimizer.warmup_steps=2 --set training.log_interval=100)

final_model() { echo "$1/checkpoints/$(cat "$1/checkpoints/latest")/model.safetensors"; }

killed_run() {  # name, ranks, seed, extra args...
  local name=$1 ranks=$2 seed=$3; shift 3
  local ref="$WORK_DIR/kill_${name}_ref" dir="$WORK_DIR/kill_${name}"
  rm -rf "$ref" "$dir"
  mpirun -np "$ranks" "$TRAIN" $(micro_args "$ref") "${STEPS[@]}" "$@" > "$ref.log" 2>&1 || { cat "$ref.log"; fail "$name reference run failed"; }
  # Each kill: once the run has recorded `ahead` more steps than it had, after a further `delay` seconds
  # (during the next step, or the save that follows it). Both drawn from the seed.
  local plan kills=0 done=0 attempt=0
  plan=$(python3 -c "import random; r = random.Random($seed); print(' '.join('%d:%.2f' % (r.randint(1, 4), r.uniform(0.0, 0.4)) for _ in range(8)))")
  for kill_at in $plan ""; do
    attempt=$((attempt + 1))
    local resume=(); [ -f "$dir/checkpoints/latest" ] && resume=(--resume)
    local before=0; [ -f "$dir/metrics.jsonl" ] && [ -n "${resume[*]}" ] && before=$(grep -c . "$dir/metrics.jsonl" || true)
    # A time limit per attempt (a whole run takes seconds): Open MPI's mpirun can hang in its
    # PMIx teardown after a rank is killed, its other ranks already gone; it is then ended
    # here, and the attempt counts as a killed one.
    timeout -k 5 120 mpirun -np "$ranks" "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" "$@" "${resume[@]}" > "$dir.$attempt.log" 2>&1 &
    local pid=$!
    if [ -n "$kill_at" ]; then
      local target=$((before + ${kill_at%%:*})) recorded=0
      [ "$target" -gt 23 ] && target=23
      while kill -0 "$pid" 2>/dev/null; do
        recorded=$( { grep -c . "$dir/metrics.jsonl" 2>/dev/null || true; } | tail -1)
        [ "${recorded:-0}" -ge "$target" ] && break
        sleep 0.02
      done
      sleep "${kill_at##*:}"
      local victim; victim=$(pgrep -f "^$TRAIN .*training.run_dir=$dir( |\$)" | head -1 || true)
      [ -n "$victim" ] && kill -9 "$victim" 2>/dev/null && kills=$((kills + 1))
    fi
    if wait "$pid"; then done=1; break; fi
  done
  [ "$done" = 1 ] || { tail -5 "$dir.$attempt.log"; fail "$name never finished"; }
  python3 - "$ref/metrics.jsonl" "$dir/metrics.jsonl" <<'PY' || fail "$name: the resumed run's records differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
steps = [r["step"] for r in b]
assert steps == list(range(1, 25)), "steps recorded: %s" % steps
bad = [(x["step"], x["loss"], y["loss"]) for x, y in zip(a, b) if repr(x["loss"]) != repr(y["loss"])]
assert not bad, bad[:3]
PY
  cmp -s "$(final_model "$ref")" "$(final_model "$dir")" || fail "$name: final weights differ from the uninterrupted run"
  echo "ok: $name killed $kills times (kill -9, seed $seed), resumed each time: 24 steps recorded once, losses and final weights bit-identical"
}

killed_run one 1 7 --set training.micro_batch_size=32
killed_run dp2_ep2_zero1 4 11 --set parallel.ep=2 --set parallel.dp=4 --set parallel.zero1=true --set training.micro_batch_size=2
# Saves written in the background (training.async_checkpoint): kills land while a save is in flight too.
killed_run async_one 1 17 --set training.micro_batch_size=32 --set training.async_checkpoint=true
killed_run async_dp2_ep2_zero1 4 19 --set parallel.ep=2 --set parallel.dp=4 --set parallel.zero1=true --set training.micro_batch_size=2 \
  --set training.async_checkpoint=true

# A damaged latest checkpoint: --resume skips it for the newest earlier one, with a warning naming the file.
dir="$WORK_DIR/kill_one"
latest="$dir/checkpoints/$(cat "$dir/checkpoints/latest")"
"$CKPT" verify "$dir" > "$dir.verify.log" 2>&1 || { cat "$dir.verify.log"; fail "moe-ckpt verify of a sound run failed"; }
"$CKPT" list "$dir" | grep -q "(latest)" || fail "moe-ckpt list does not mark the latest checkpoint"
"$CKPT" show "$dir" | grep -q "^step        24$" || fail "moe-ckpt show does not print the step"
printf 'X' | dd of="$latest/optimizer.safetensors" bs=1 seek=200 conv=notrunc 2>/dev/null
ERROR_PREFIX=moe-ckpt: expect_error "optimizer.safetensors: checksum mismatch" "$CKPT" verify "$latest"
out=$("$TRAIN" $(micro_args "$dir") "${STEPS[@]}" --set training.steps=27 --resume 2>&1) || { echo "$out"; fail "resume past a damaged checkpoint failed"; }
[ "$(printf '%s\n' "$out" | grep -c 'moe-train: warning')" -eq 1 ] || { echo "$out"; fail "expected one warning line"; }
printf '%s\n' "$out" | grep -q "optimizer.safetensors: checksum mismatch.*resuming from .*step_00000021 instead" || { echo "$out"; fail "the warning does not name the file and the fallback"; }
python3 - "$dir/metrics.jsonl" <<'PY' || fail "records after the fallback"
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1])]
assert steps == list(range(1, 28)), steps
PY
echo "ok: a damaged latest checkpoint is skipped for step 21 with one warning; steps 22-27 recorded once"
# --resume=PATH: that checkpoint and no other (a damaged one is an error, not a fallback).
latest="$dir/checkpoints/$(cat "$dir/checkpoints/latest")"
printf 'X' | dd of="$latest/model.safetensors" bs=1 seek=300 conv=notrunc 2>/dev/null
ERROR_PREFIX=moe-train: expect_error "model.safetensors: checksum mismatch" \
  "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" --set training.steps=30 --resume="$latest"
"$TRAIN" $(micro_args "$dir") "${STEPS[@]}" --set training.steps=30 --resume="$dir/checkpoints/step_00000024" > "$dir.path.log" 2>&1 \
  || { cat "$dir.path.log"; fail "--resume=PATH of a sound checkpoint failed"; }
grep -q "moe-train: warning" "$dir.path.log" && fail "--resume=PATH warned"
python3 - "$dir/metrics.jsonl" <<'PY' || fail "records after --resume=PATH"
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1])]
assert steps == list(range(1, 31)), steps
PY
echo "ok: --resume=PATH takes that checkpoint (step 24; records 25-30 replace the later ones) and refuses a damaged one"

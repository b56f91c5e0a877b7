#!/usr/bin/env bash
# One flipped byte in each kind of file of the latest checkpoint in turn: the
# model, the optimizer state (rank 0's and another rank's file), the index, the
# trainer state and the saved config. Each time `moe-ckpt verify` names the file,
# and `--resume` falls back to the previous checkpoint with one warning naming
# the file, then finishes the run with every step recorded once. An edit that
# keeps trainer_state.json valid JSON is caught by the file's own checksum. A damaged
# `latest` pointer falls back to the newest complete checkpoint the same way.
source "$(dirname "$0")/common.sh"
CKPT="$BIN_DIR/moe-ckpt"
# dp2 + ep2 with FP16 second moments: per-rank optimizer files, so every kind of file exists.
RUN=(--set parallel.ep=2 --set training.micro_batch_size=4 --set optimizer.exp_avg_sq_dtype=fp16 --set training.eval_interval=0
     --set training.checkpoint_interval=3 --set training.keep_checkpoints=3 --set optimizer.warmup_steps=2 --set training.log_interval=100)
base="$WORK_DIR/corrupt"; rm -rf "$base" "$base".*
mpirun -np 2 "$TRAIN" $(micro_args "$base") "${RUN[@]}" --set training.steps=6 > "$base.log" 2>&1 || { cat "$base.log"; fail "first run failed"; }
[ -f "$base/checkpoints/step_00000006/optimizer.rank00001.safetensors" ] || fail "expected a per-rank optimizer file"

flip() {  # file, offset: xor one byte with 0x20
  python3 - "$1" "$2" <<'PY'
import sys
path, offset = sys.argv[1], int(sys.argv[2])
data = bytearray(open(path, "rb").read())
data[offset] ^= 0x20
open(path, "wb").write(bytes(data))
PY
}

for file in model.safetensors optimizer.safetensors optimizer.rank00001.safetensors index.json trainer_state.json config.yaml; do
  dir="$base.$file"; rm -rf "$dir"; cp -r "$base" "$dir"
  target="$dir/checkpoints/step_00000006/$file"
  flip "$target" $(( $(stat -c %s "$target") / 2 ))
  ERROR_PREFIX=moe-ckpt: expect_error "$file" "$CKPT" verify "$dir/checkpoints/step_00000006" > /dev/null
  out=$(mpirun -np 2 "$TRAIN" $(micro_args "$dir") "${RUN[@]}" --set training.steps=8 --resume 2>&1) || { echo "$out"; fail "$file: resume failed"; }
  warnings=$(printf '%s\n' "$out" | grep -c "moe-train: warning" || true)
  [ "$warnings" -ge 1 ] || { echo "$out"; fail "$file: no warning"; }
  printf '%s\n' "$out" | grep "moe-train: warning" | grep -v -q "$file" && { echo "$out"; fail "$file: a warning does not name the file"; }
  printf '%s\n' "$out" | grep -q "$file.*resuming from .*step_00000003 instead" || { echo "$out"; fail "$file: no fallback to step 3"; }
  printf '%s\n' "$out" | grep -q "resumed from .*step_00000003 at step 3" || { echo "$out"; fail "$file: did not resume from step 3"; }
  python3 -c "
import json, sys
steps = [json.loads(l)['step'] for l in open('$dir/metrics.jsonl')]
assert steps == list(range(1, 9)), steps" || fail "$file: steps recorded after the fallback"
  echo "ok: a flipped byte in $file: verify names it, --resume falls back to step 3 with a warning naming it"
done

# A change that leaves valid JSON (the step 6 -> 7): the state file's own checksum catches it.
dir="$base.state_value"; rm -rf "$dir"; cp -r "$base" "$dir"
sed -i 's/"step": 6,/"step": 7,/' "$dir/checkpoints/step_00000006/trainer_state.json"
ERROR_PREFIX=moe-ckpt: expect_error "trainer_state.json: checksum mismatch" "$CKPT" verify "$dir/checkpoints/step_00000006"

dir="$base.latest"; rm -rf "$dir"; cp -r "$base" "$dir"
printf 'step_0000\x01\n' > "$dir/checkpoints/latest"
out=$(mpirun -np 2 "$TRAIN" $(micro_args "$dir") "${RUN[@]}" --set training.steps=8 --resume 2>&1) || { echo "$out"; fail "damaged latest: resume failed"; }
printf '%s\n' "$out" | grep -q "resumed from .*step_00000006 at step 6" || { echo "$out"; fail "damaged latest: did not take the newest complete checkpoint"; }
echo "ok: a damaged latest pointer: --resume takes the newest complete checkpoint (step 6)"

#!/usr/bin/env bash
# Bad inputs end with one clear line naming the file or key, and a non-zero exit.
source "$(dirname "$0")/common.sh"
dir="$WORK_DIR/errors"; rm -rf "$dir"; mkdir -p "$dir"
printf 'model:\n  num_expert: 8\n' > "$dir/unknown.yaml"
expect_error "$dir/unknown.yaml:2:3: unknown key 'model.num_expert'; did you mean 'model.num_experts'?" "$TRAIN" --config "$dir/unknown.yaml"
printf 'training:\n  steps: many\n' > "$dir/type.yaml"
expect_error "$dir/type.yaml:2:10: training.steps: expected an integer, got 'many'" "$TRAIN" --config "$dir/type.yaml"
printf 'model:\n  top_k: 0\n' > "$dir/range.yaml"
expect_error "$dir/range.yaml: model.top_k: must be in [1, num_experts=16], got 0" "$TRAIN" --config "$dir/range.yaml"
expect_error "$dir/missing.yaml: cannot open config file" "$TRAIN" --config "$dir/missing.yaml"
expect_error "--set: unknown key 'training.stepz'" "$TRAIN" $(micro_args "$dir/run") --set training.stepz=3

# Corrupt data files are refused by name.
cp "$CORPUS/gcide.bin" "$CORPUS/gcide.idx" "$CORPUS/gcide.meta.json" "$dir/"
printf '\x01\x02' | dd of="$dir/gcide.bin" bs=1 seek=100 conv=notrunc status=none
expect_error "$dir/gcide.bin: checksum mismatch" "$TRAIN" $(micro_args "$dir/run") --set "data.prefix=$dir/gcide"
cp "$CORPUS/gcide.bin" "$dir/"; truncate -s -6 "$dir/gcide.idx"
expect_error "$dir/gcide.idx: truncated or corrupt index" "$TRAIN" $(micro_args "$dir/run") --set "data.prefix=$dir/gcide"
cp "$CORPUS/tok.model" "$CORPUS/tok.model.meta.json" "$dir/"; truncate -s 1000 "$dir/tok.model"
expect_error "$dir/tok.model: checksum mismatch" "$DATA" tokenize --input gcide --max-documents 10 --tokenizer "$dir/tok.model" --output "$dir/x"
expect_error "--resume" "$TRAIN" $(micro_args "$dir/fresh") --resume

# A corrupt checkpoint is refused by name on resume.
run="$dir/ckpt"
"$TRAIN" $(micro_args "$run") --set training.steps=6 --set training.eval_interval=0 > /dev/null 2>&1 || fail "setup run failed"
truncate -s -10 "$run/checkpoints/step_00000006/model.safetensors"
expect_error "$run/checkpoints/step_00000006/model.safetensors: checksum mismatch" "$TRAIN" $(micro_args "$run") --set training.steps=9 --resume
# A checkpoint from a different model shape is refused naming the tensor.
"$TRAIN" $(micro_args "$dir/shape") --set training.steps=6 > /dev/null 2>&1 || fail "setup run failed"
expect_error "has shape" "$TRAIN" $(micro_args "$dir/shape") --set training.steps=9 --set model.hidden_size=32 --resume
# Several ranks: a bad config is reported once (not once per rank) and the job fails.
rc=0; err=$(mpirun -np 2 --bind-to none "$TRAIN" --config "$dir/unknown.yaml" 2>&1 >/dev/null) || rc=$?
[ "$rc" -ne 0 ] || fail "mpirun with a bad config exited 0"
[ "$(printf '%s\n' "$err" | grep -c "moe-train: error: .*unknown key 'model.num_expert'")" -eq 1 ] || fail "expected one report: $err"
# A runtime error names the rank.
expect_error "moe-train: error (rank 0): $dir/nope.idx" "$TRAIN" $(micro_args "$dir/run") --set "data.prefix=$dir/nope"

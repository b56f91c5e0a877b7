#!/usr/bin/env bash
# Checkpoint cost per step: the tiny config with a checkpoint after every step,
# saves written synchronously and in the background (training.async_checkpoint),
# beside no checkpoints at all. Wall time per step is read from the budget's
# clock (gpu_hours), which counts the time a save blocks training; steps 3-N
# averaged. Needs a build and the corpus (moe-data prepare --config configs/tiny.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh moe-data moe-train >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
STEPS=${STEPS:-14}
isa=$(grep -o -w 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | xargs)
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ISA: $isa"
echo "== configs/tiny.yaml, $STEPS steps, steps 3-$STEPS averaged; checkpoint size from the last save"
run() {
  local name=$1; shift
  local dir; dir=$(mktemp -d)
  build/launch/moe-train --config configs/tiny.yaml --set training.steps="$STEPS" --set training.eval_interval=0 \
    --set training.eval_sequences=16 --set optimizer.warmup_steps=2 --set training.run_dir="$dir" --set training.keep_checkpoints=2 "$@" > "$dir/log" 2>&1 \
    || { cat "$dir/log"; exit 1; }
  local size; size=$(du -sm "$dir/checkpoints/$(cat "$dir/checkpoints/latest" 2>/dev/null || echo none)" 2>/dev/null | cut -f1 || echo 0)
  python3 - "$dir/metrics.jsonl" "$name" "${size:-0}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
wall = [(b["gpu_hours"] - a["gpu_hours"]) * 3600 for a, b in zip(rows[1:], rows[2:])]
step = [r["step_seconds"] for r in rows[2:]]
print(f"{sys.argv[2]:<28} wall/step {sum(wall)/len(wall):6.3f} s   step compute+sync {sum(step)/len(step):6.3f} s   ({sys.argv[3]} MB per checkpoint)")
PY
  rm -rf "$dir"
}
for threads in 0 1; do
  echo "-- training.threads=$threads ($([ $threads = 0 ] && echo "every core computes" || echo "one core computes, one is left to the writer"))"
  run "no checkpoints" --set training.threads=$threads --set training.checkpoint_interval=0
  run "checkpoint every step, sync" --set training.threads=$threads --set training.checkpoint_interval=1
  run "checkpoint every step, async" --set training.threads=$threads --set training.checkpoint_interval=1 --set training.async_checkpoint=true
done

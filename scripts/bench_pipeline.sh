#!/usr/bin/env bash
# The measured pipeline bubble beside the simulator's prediction: configs/tiny.yaml
# at pp 2 on two one-thread ranks (one per core of a 2-core machine, so neither
# waits for a core), 8 micro-batches of one sequence per step, for 1F1B, GPipe
# and interleaved (v 2). Measured: each rank's time blocked on the pipeline's
# receives and sends over its time in the step's schedule (blocked + forwards +
# backwards; medians of steps 4..STEPS). Predicted:
# the same schedule simulated (tests/bench/pipeline_sim) on each rank's measured
# forward and backward time per chunk. Prints a table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-16}
scripts/build.sh moe-train moe-data pipeline_sim > /dev/null
[ -f corpus/gcide.bin ] || build/launch/moe-data prepare --config configs/tiny.yaml
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo "($(nproc) cores)"
printf '| schedule | rank | measured idle | simulated idle | forward / backward per chunk |\n|---|---|---|---|---|\n'
for schedule in 1f1b gpipe "interleaved 2"; do
  name=${schedule%% *}; v=1; [ "$name" = interleaved ] && v=2
  dir=runs/bench_pipeline_$name; rm -rf "$dir"
  mpirun --oversubscribe --bind-to none -np 2 build/launch/moe-train --config configs/tiny.yaml --set training.steps="$STEPS" \
    --set budget.max_minutes=0 --set optimizer.warmup_steps=2 --set training.precision=fp32 --set training.threads=1 \
    --set parallel.pp=2 --set parallel.virtual_pp=$v --set parallel.pipeline_schedule="$name" --set training.grad_accum_steps=8 \
    --set training.micro_batch_size=1 --set training.eval_sequences=8 --set training.checkpoint_interval=0 \
    --set training.run_dir="$dir" > "$dir.log" 2>&1 || { tail -5 "$dir.log"; exit 1; }
  read -r f0 b0 f1 b1 w0 w1 step <<< "$(python3 - "$dir/metrics.jsonl" "$v" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][3:]
v = int(sys.argv[2])
med = lambda key, r: statistics.median(row["pipeline"][key][r] for row in rows)
chunks = 8 * v
busy = [med("forward_seconds", r) + med("backward_seconds", r) for r in (0, 1)]
print(med("forward_seconds", 0) / chunks, med("backward_seconds", 0) / chunks,
      med("forward_seconds", 1) / chunks, med("backward_seconds", 1) / chunks,
      med("wait_seconds", 0) / (med("wait_seconds", 0) + busy[0]), med("wait_seconds", 1) / (med("wait_seconds", 1) + busy[1]), 1.0)
PY
)"
  read -r _ makespan _ i0 i1 <<< "$(build/tests/bench/pipeline_sim "$name" 2 "$v" 8 0 "$f0,$b0" "$f1,$b1")"
  python3 - "$name" "$v" "$w0" "$w1" "$step" "$i0" "$i1" "$f0" "$b0" "$f1" "$b1" <<'PY'
import sys
name, v, w0, w1, step, i0, i1, f0, b0, f1, b1 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
label = name + (" (v %s)" % v if v != "1" else "")
for r, (w, i, f, b) in enumerate([(w0, i0, f0, b0), (w1, i1, f1, b1)]):
    print("| %s | %d | %.1f%% | %.1f%% | %.1f / %.1f ms |" % (label, r, 100 * w / step, 100 * i, 1e3 * f, 1e3 * b))
PY
done

#!/usr/bin/env bash
# The measured pipeline bubble beside the simulator's prediction: configs/tiny.yaml
# at pp 2 on two one-thread ranks (one per core of a 2-core machine, so neither
# waits for a core), 8 micro-batches of one sequence per step, for 1F1B, GPipe,
# interleaved (v 2), ZB-H1 and DualPipeV (v 2). Measured: each rank's time
# blocked on the pipeline's receives and sends over its time in the step's
# schedule (blocked + forwards + backwards + weight gradients; medians of steps
# 4..STEPS). Predicted: the same schedule simulated (tests/bench/pipeline_sim) on
# each rank's measured forward, backward and weight-gradient time. Prints a
# table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-16}
scripts/build.sh moe-train moe-data pipeline_sim > /dev/null
[ -f corpus/gcide.bin ] || build/launch/moe-data prepare --config configs/tiny.yaml
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' '; echo "($(nproc) cores)"
printf '| schedule | rank | measured idle | simulated idle | per step: forwards / backwards (B or I) / weight gradients |\n|---|---|---|---|---|\n'
for schedule in 1f1b gpipe "interleaved 2" zbh1 "dualpipev 2"; do
  name=${schedule%% *}; v=1; [ "$name" != "$schedule" ] && v=${schedule##* }
  dir=runs/bench_pipeline_$name; rm -rf "$dir"
  mpirun --oversubscribe --bind-to none -np 2 build/launch/moe-train --config configs/tiny.yaml --set training.steps="$STEPS" \
    --set budget.max_minutes=0 --set optimizer.warmup_steps=2 --set training.precision=fp32 --set training.threads=1 \
    --set parallel.pp=2 --set parallel.virtual_pp=$v --set parallel.pipeline_schedule="$name" --set training.grad_accum_steps=8 \
    --set training.micro_batch_size=1 --set training.eval_sequences=8 --set training.checkpoint_interval=0 \
    --set training.run_dir="$dir" > "$dir.log" 2>&1 || { tail -5 "$dir.log"; exit 1; }
  # Per rank: medians of steps 4.. of the blocked fraction and of the F, B, W seconds.
  read -r w0 w1 t0 t1 <<< "$(python3 - "$dir/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][3:]
med = lambda key, r: statistics.median(row["pipeline"][key][r] for row in rows)
out, times = [], []
for r in (0, 1):
    f, b, w = med("forward_seconds", r), med("backward_seconds", r), med("weight_seconds", r)
    out.append(med("wait_seconds", r) / (med("wait_seconds", r) + f + b + w))
    times.append("%.6f,%.6f,%.6f" % (f, b, w))
print(*out, *times)
PY
)"
  read -r _ makespan _ i0 i1 <<< "$(build/tests/bench/pipeline_sim "$name" 2 "$v" 8 0 "$t0" "$t1")"
  python3 - "$name" "$v" "$w0" "$w1" "$i0" "$i1" "$t0" "$t1" <<'PY'
import sys
name, v, w0, w1, i0, i1, t0, t1 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:7]), sys.argv[7], sys.argv[8]
label = name + (" (v %s)" % v if v != "1" else "")
for r, (w, i, t) in enumerate([(w0, i0, t0), (w1, i1, t1)]):
    f, b, wg = (1e3 * float(x) for x in t.split(","))
    print("| %s | %d | %.1f%% | %.1f%% | %.0f / %.0f / %.0f ms |" % (label, r, 100 * w, 100 * i, f, b, wg))
PY
done

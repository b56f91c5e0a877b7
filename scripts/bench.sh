#!/usr/bin/env bash
# Benchmarks on this machine: the tiny config's step breakdown, tokens/s and MFU
# (C++, BF16 and FP32), against the plain-PyTorch version of the same model on the
# same threads; MPI collective bandwidth at 2 and 4 ranks; the step-time breakdown
# of the tiny config under expert and tensor parallelism at 2 and 4 ranks.
# Needs the corpus (moe-data prepare) and a build. Results go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh bench_step bench_collectives moe-data moe-train >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== FrugalMoE C++ step, configs/tiny.yaml (seq 256 x batch 16)"
build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}"
build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}" --set training.precision=fp32
echo "== plain PyTorch, same model and threads"
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" --bf16
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "== MPI collectives (bus bandwidth as nccl-tests defines it)"
for ranks in 2 4; do mpirun --oversubscribe --bind-to none -np $ranks build/tests/bench/bench_collectives; done
echo "== tiny config step breakdown (global batch 16 x 256 tokens, BF16, steps 3-${BREAKDOWN_STEPS:-12} averaged)"
breakdown() {
  local ranks=$1 name=$2; shift 2
  local dir; dir=$(mktemp -d)
  mpirun --oversubscribe --bind-to none -np "$ranks" build/launch/moe-train --config configs/tiny.yaml \
    --set training.steps="${BREAKDOWN_STEPS:-12}" --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
    --set training.eval_batches=1 --set training.micro_batch_size=$((16 / ranks)) --set training.run_dir="$dir" "$@" > "$dir/log" 2>&1
  python3 - "$dir/metrics.jsonl" "$ranks" "$name" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])][2:]
mean = lambda key: sum(s["time"][key] for s in steps) / len(steps)
total = sum(s["step_seconds"] for s in steps) / len(steps)
print(f"{sys.argv[3]:<16} ranks {sys.argv[2]}  step {total:6.3f} s  compute {mean('compute'):6.3f}  communication {mean('communication'):6.3f}"
      f"  optimizer {mean('optimizer'):6.3f}  data {mean('data'):6.4f}  tokens/s {4096 / total:7.0f}")
PY
  rm -rf "$dir"
}
breakdown 1 "single" --set parallel.dp=1
breakdown 2 "dp2" 
breakdown 2 "dp2+ep2" --set parallel.ep=2
breakdown 2 "tp2" --set parallel.tp=2 --set training.micro_batch_size=16
breakdown 4 "dp4+ep4" --set parallel.ep=4
breakdown 4 "dp2xtp2+ep2" --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=8

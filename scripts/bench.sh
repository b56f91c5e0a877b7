#!/usr/bin/env bash
# Benchmarks on this machine: its ISA and both GEMM peaks; the tiny config's step
# breakdown, tokens/s and MFU at the precision training.precision: auto picks (and
# at the other one), against the plain-PyTorch version of the same model on the
# same threads, eager and torch.compile'd; MPI collective bandwidth at 2 and 4
# ranks; the step-time breakdown of the tiny config under expert and tensor
# parallelism at 2 and 4 ranks; moe-plan's step time against the measured one;
# the MPI progress thread off and on.
# SKIP_PARALLEL=1 stops after the single-process part.
# Needs the corpus (moe-data prepare) and a build. Results go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh bench_step bench_collectives moe-data moe-train >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
isa=$(grep -o -w 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | xargs)
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ISA: $isa"
echo "== FrugalMoE C++ step, configs/tiny.yaml at seq 256 x batch 16 (the plain-PyTorch batch); the first line is precision auto's choice"
auto_log=$(build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}" --set training.micro_batch_size=16 --set training.precision=auto)
echo "$auto_log"
chosen=$(echo "$auto_log" | sed -n 's/^precision auto -> \([a-z0-9]*\).*/\1/p')
other=$([ "$chosen" = fp32 ] && echo bf16 || echo fp32)
echo "-- the other precision ($other), for comparison"
build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}" --set training.micro_batch_size=16 --set training.precision="$other"
echo "== plain PyTorch, same model and threads, at the chosen precision ($chosen), eager then torch.compile"
flag=$([ "$chosen" = bf16 ] && echo --bf16 || true)
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" $flag
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" $flag --compile
[ -z "${SKIP_PARALLEL:-}" ] || exit 0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "== MPI collectives (bus bandwidth as nccl-tests defines it)"
for ranks in 2 4; do mpirun --oversubscribe --bind-to none -np $ranks build/tests/bench/bench_collectives; done
echo "== tiny config step breakdown (global batch 16 x 256 tokens, precision $chosen, steps 3-${BREAKDOWN_STEPS:-12} averaged)"
breakdown() {
  local ranks=$1 name=$2; shift 2
  local dir; dir=$(mktemp -d)
  mpirun --oversubscribe --bind-to none -np "$ranks" build/launch/moe-train --config configs/tiny.yaml \
    --set training.steps="${BREAKDOWN_STEPS:-12}" --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
    --set training.eval_sequences=16 --set training.micro_batch_size=$((16 / ranks)) --set training.run_dir="$dir" \
    --set training.precision="$chosen" "$@" > "$dir/log" 2>&1
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
echo "== moe-plan's step time against the measured one (cpu-local, gemm_efficiency calibrated on the single process)"
# This machine as one node holding every rank; the planner's efficiency is set so
# that it reproduces the single process's measured step, then it predicts the rest.
cluster=$(mktemp --suffix=.yaml); sed 's/^gpus_per_node: .*/gpus_per_node: 8/' configs/clusters/cpu-local.yaml > "$cluster"
measured_step() {  # ranks, args...: the mean step of steps 3-12, as breakdown measures it
  local ranks=$1; shift
  local dir; dir=$(mktemp -d)
  mpirun --oversubscribe --bind-to none -np "$ranks" build/launch/moe-train --config configs/tiny.yaml \
    --set training.steps="${BREAKDOWN_STEPS:-12}" --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
    --set training.eval_sequences=16 --set training.run_dir="$dir" --set training.precision="$chosen" "$@" > "$dir/log" 2>&1
  python3 -c 'import json,sys; s=[json.loads(l) for l in open(sys.argv[1])][2:]; print(sum(r["step_seconds"] for r in s)/len(s))' "$dir/metrics.jsonl"
  rm -rf "$dir"
}
planned_step() {  # ranks, efficiency, args...
  local ranks=$1 efficiency=$2; shift 2
  build/launch/moe-plan --config configs/tiny.yaml --cluster "$cluster" --gpus "$ranks" --json --set training.precision="$chosen" \
    --assume gemm_efficiency="$efficiency" "$@" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_seconds"])'
}
single=(--set parallel.dp=1 --set training.micro_batch_size=16)
one=$(measured_step 1 "${single[@]}")
efficiency=$(python3 -c "print(0.55 * $(planned_step 1 0.55 "${single[@]}") / $one)")
printf '%-14s %6s %10s %10s %8s\n' layout ranks measured planned error
for layout in "single 1 ${single[*]}" "dp2+ep2 2 --set parallel.ep=2 --set training.micro_batch_size=8" \
              "pp2 2 --set parallel.pp=2 --set training.micro_batch_size=4 --set training.grad_accum_steps=4" \
              "dp2xtp2+ep2 4 --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=8"; do
  read -r name ranks args <<< "$layout"
  m=$(measured_step "$ranks" $args); p=$(planned_step "$ranks" "$efficiency" $args)
  python3 -c "print('%-14s %6s %9.3fs %9.3fs %+7.1f%%' % ('$name', $ranks, $m, $p, 100 * ($p / $m - 1)))"
done
echo "(gemm_efficiency calibrated to $efficiency)"
rm -f "$cluster"

echo "== the MPI progress thread off, then on (parallel.mpi_progress_thread): gradient buckets launched during backward"
for layout in "dp2" "dp2+ep2 --set parallel.ep=2" "dp4+ep4 --set parallel.ep=4"; do
  name=${layout%% *}; ranks=${name:2:1}; args=(${layout#"$name"})
  breakdown "$ranks" "$name off" "${args[@]}" --set parallel.mpi_progress_thread=false
  breakdown "$ranks" "$name on" "${args[@]}" --set parallel.mpi_progress_thread=true
done

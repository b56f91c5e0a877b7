#!/usr/bin/env bash
# Benchmarks on this machine: the tiny config's step breakdown, tokens/s and MFU
# (C++, BF16 and FP32), against the plain-PyTorch version of the same model on the
# same threads. Needs the corpus (moe-data prepare) and a build. Results go to docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh bench_step moe-data >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== FrugalMoE C++ step, configs/tiny.yaml (seq 256 x batch 16)"
build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}"
build/tests/bench/bench_step --config configs/tiny.yaml --steps "${STEPS:-10}" --set training.precision=fp32
echo "== plain PyTorch, same model and threads"
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}" --bf16
python3 tests/bench/pytorch_baseline.py --steps "${STEPS:-10}"

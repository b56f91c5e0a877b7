#!/usr/bin/env bash
# The main job from a fresh machine: set up, build, prepare GCIDE, train configs/tiny.yaml on the CPU
# for its 8-minute budget (budget.max_minutes; the step count is fixed after 20 timed steps).
# By default one rank with a thread per core: on a 2-core machine that is faster than
# two one-thread ranks (docs/benchmarks.md). RANKS=N runs N ranks, data-parallel with
# the 16 routed experts split over EP of them (default EP=N: dp2 + ep2 for RANKS=2,
# tokens exchanged by all-to-all). The global batch stays 4 sequences: each rank
# takes 4 / RANKS. Extra args go to moe-train (e.g. --resume, --set k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh moe-train moe-data
build/launch/moe-data prepare --config configs/tiny.yaml
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RANKS=${RANKS:-1}
exec mpirun --oversubscribe -np "$RANKS" --bind-to none build/launch/moe-train --config configs/tiny.yaml \
  --set parallel.ep="${EP:-$RANKS}" --set training.micro_batch_size=$((4 / RANKS)) "$@"

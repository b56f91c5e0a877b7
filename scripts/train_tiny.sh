#!/usr/bin/env bash
# The main job from a fresh machine: set up, build, prepare GCIDE, train configs/tiny.yaml on the CPU.
# RANKS=2 runs two data-parallel ranks. Extra args go to moe-train (e.g. --resume, --set k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh moe-train moe-data
build/launch/moe-data prepare --config configs/tiny.yaml
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun --oversubscribe -np "${RANKS:-1}" --bind-to none build/launch/moe-train --config configs/tiny.yaml "$@"

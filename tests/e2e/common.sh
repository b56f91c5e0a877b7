# Shared helpers for the end-to-end tests. Sourced; expects BIN_DIR and WORK_DIR.
set -euo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# GEMM rates injected rather than timed: each moe-train start would otherwise
# spend about 1.5 s measuring BF16 and FP32 GEMMs (over half of a micro run),
# and `precision: auto` picks FP32 on every machine alike. The tests that check
# the measurement itself (memory_estimate, budget's real-timing run,
# gpu_check_rehearsal) unset it; precision_budget injects its own.
export FMOE_GEMM_GFLOPS="bf16=1,fp32=100"
TRAIN="$BIN_DIR/moe-train"
DATA="$BIN_DIR/moe-data"
CORPUS="$WORK_DIR/corpus"
CONFIG="$(dirname "${BASH_SOURCE[0]}")/micro.yaml"

fail() { echo "FAIL: $*" >&2; exit 1; }

# Common overrides pointing the micro config at the fixture corpus and a run dir.
micro_args() {
  echo --config "$CONFIG" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" --set "training.run_dir=$1"
}

# The "loss" of each metrics line, one per line, full precision.
losses() { python3 -c 'import json,sys; [print(repr(json.loads(l)["loss"])) for l in open(sys.argv[1])]' "$1"; }

# Runs a command expected to fail: checks exit code != 0 and a single error line
# containing $1. Under mpirun, whose own banner also goes to stderr, set
# ERROR_PREFIX=moe-train: to count only our lines.
expect_error() {
  local needle="$1"; shift
  local err rc=0
  err=$("$@" 2>&1 >/dev/null) || rc=$?
  [ "$rc" -ne 0 ] || fail "expected failure: $*"
  local ours
  ours=$(printf '%s\n' "$err" | grep "^${ERROR_PREFIX:-}" || true)
  [ "$(printf '%s\n' "$ours" | grep -c .)" -eq 1 ] || fail "expected one error line, got: $err"
  case "$ours" in *"$needle"*) ;; *) fail "error '$ours' does not mention '$needle'";; esac
  echo "ok: $needle"
}

# Ends a test that cannot run here as skipped (CTest's SKIP_RETURN_CODE, 77), with the reason.
skip() { echo "SKIPPED: $*"; exit 77; }

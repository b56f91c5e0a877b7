#!/usr/bin/env bash
# The device-generic step on the CPU: a device that is not there is refused in one
# line; each step reads its scalars back in exactly one device-to-host copy; the
# grouped-GEMM expert path (what a GPU runs, with group ends that never reach the
# host) trains like the per-expert loop; and a dp2+ep2 run whose collectives all
# go through the host-staging layer (how CUDA tensors cross MPI) reproduces the
# plain MPI run bit for bit.
source "$(dirname "$0")/common.sh"
SHORT=(--set training.steps=6 --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0)

if [ -e /proc/driver/nvidia/version ]; then
  echo "skip: a GPU driver is present (the cuda refusal is checked on machines without one)"
else
  dir="$WORK_DIR/no_gpu"; rm -rf "$dir"
  expect_error "training.device: cuda requested but no CUDA device is visible" \
    "$TRAIN" $(micro_args "$dir") --set training.device=cuda "${SHORT[@]}"
fi
dir="$WORK_DIR/bad_device"; rm -rf "$dir"
expect_error "training.device: must be auto, cpu or cuda, got 'tpu'" "$TRAIN" $(micro_args "$dir") --set training.device=tpu "${SHORT[@]}"

loop="$WORK_DIR/experts_loop"; grouped="$WORK_DIR/experts_grouped_mm"; rm -rf "$loop" "$grouped"
FMOE_GROUPED_MM=off "$TRAIN" $(micro_args "$loop") "${SHORT[@]}" > "$loop.log" 2>&1 || { cat "$loop.log"; fail "loop run failed"; }
FMOE_GROUPED_MM=on "$TRAIN" $(micro_args "$grouped") "${SHORT[@]}" > "$grouped.log" 2>&1 || { cat "$grouped.log"; fail "grouped run failed"; }
python3 - "$loop/metrics.jsonl" "$grouped/metrics.jsonl" <<'PY' || fail "grouped-GEMM experts differ from the loop"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 6
for x, y in zip(a, b):
    assert x["device"] == "cpu" and x["device_to_host_copies"] == 1, x
    assert y["device_to_host_copies"] == 1, y
    rel = abs(x["loss"] - y["loss"]) / x["loss"]
    assert rel <= 1e-5, (x["step"], x["loss"], y["loss"], rel)
print("ok: one device-to-host copy per step; grouped-GEMM experts within %.1e of the loop" %
      max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b)))
PY

plain="$WORK_DIR/mpi_plain"; staged="$WORK_DIR/mpi_staged"; rm -rf "$plain" "$staged"
LAYOUT=(--set parallel.dp=2 --set parallel.ep=2)
mpirun -np 2 "$TRAIN" $(micro_args "$plain") "${SHORT[@]}" "${LAYOUT[@]}" > "$plain.log" 2>&1 || { cat "$plain.log"; fail "plain dp2+ep2 failed"; }
mpirun -np 2 -x FMOE_HOST_STAGING=1 "$TRAIN" $(micro_args "$staged") "${SHORT[@]}" "${LAYOUT[@]}" > "$staged.log" 2>&1 \
  || { cat "$staged.log"; fail "staged dp2+ep2 failed"; }
grep -q "communication: MPI through host buffers" "$staged.log" || { cat "$staged.log"; fail "the staging layer was not used"; }
[ "$(losses "$plain/metrics.jsonl")" = "$(losses "$staged/metrics.jsonl")" ] || fail "host-staged collectives changed the losses"
echo "ok: dp2+ep2 through host staging is bit-identical to plain MPI"

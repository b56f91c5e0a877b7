#!/usr/bin/env bash
# Pipeline parallelism in moe-train against one process from the same seed: the
# micro model (3 layers: the stage split cannot be even, and a stage may hold
# only the dense layer) with 4 micro-batches per step, under 1F1B at pp2 and
# pp4, GPipe, interleaved (v2), ZB-H1 at pp2 and pp4 (split backwards),
# DualPipeV at pp2 and pp4 (8 micro-batches of one sequence: 8 stages for 5
# items, so three stages are empty), and pp2 composed with dp2 + ep2, dp2 +
# ZeRO-1 (also under ZB-H1 and DualPipeV), tp2 with sequence parallelism and
# dp2 x tp2 + ep2 (8 ranks): the first step's loss within 1e-5, each of 20
# AdamW steps' loss and the final validation loss within 1e-4, and every
# gradient of a first step within 1e-5 (pp2, pp4, interleaved, ZB-H1 at pp4,
# DualPipeV at pp2 and pp4). A pp2 run stopped and
# resumed is bit-identical; every metrics line reports the time blocked on the
# pipeline; validation runs through the pipeline (a one-process checkpoint
# validates alike at pp4); a DualPipeV without two chunks per rank is refused.
# Under ZB-H1 and DualPipeV with dp2 the gradient buckets launch during each
# stage's last backward actions. Each layout runs again under NCCL's
# point-to-point rules (FMOE_P2P_ISSUE_ORDER=1: messages matched in issue order
# only, sends that complete once received, the pipeline's sends and receives in
# groups, as moe-train runs them over NCCL): bit-identical losses. DualPipeV
# with its F&B pairs overlapped (parallel.fb_overlap) at pp2 and pp4, with dp2 +
# ep2 and with tp2: bit-identical to the pairs' halves in turn; any other schedule refuses it.
source "$(dirname "$0")/common.sh"
STEPS=(--set training.steps=20 --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0
       --set training.grad_accum_steps=4 --set training.micro_batch_size=2)
ref="$WORK_DIR/pp_reference"; rm -rf "$ref"
"$TRAIN" $(micro_args "$ref") "${STEPS[@]}" > "$ref.log" 2>&1 || { cat "$ref.log"; fail "reference run failed"; }

check() {  # name, ranks, extra args...
  local name=$1 ranks=$2; shift 2
  local dir="$WORK_DIR/pp_$name"; rm -rf "$dir"
  mpirun -np "$ranks" "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" "$@" > "$dir.log" 2>&1 || { cat "$dir.log"; fail "$name failed"; }
  python3 - "$ref/metrics.jsonl" "$dir/metrics.jsonl" "$name" <<'PY' || fail "$name differs from one process"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 20, (len(a), len(b))
first = abs(a[0]["loss"] - b[0]["loss"]) / a[0]["loss"]
worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
val = abs(a[-1]["val_loss"] - b[-1]["val_loss"]) / a[-1]["val_loss"]
# One step equal to 1e-5; reduction orders differ, so 20 AdamW steps drift further (1e-4).
assert first <= 1e-5 and worst <= 1e-4 and val <= 1e-4, (first, worst, val)
assert all(r["pipeline_wait_seconds"] >= 0 for r in b)
print("ok: %-28s first loss within %.1e, 20 within %.1e, validation within %.1e of one process" % (sys.argv[3], first, worst, val))
PY
  grep -h "^pipeline:" "$dir.log" | head -1
  # The same run under NCCL's point-to-point rules: every receive posted in its
  # sender's order, and the groups of sends and receives never waiting on each other in a cycle.
  local ordered="$dir.issue_order"; rm -rf "$ordered"
  FMOE_P2P_ISSUE_ORDER=1 mpirun -x FMOE_P2P_ISSUE_ORDER -np "$ranks" "$TRAIN" $(micro_args "$ordered") "${STEPS[@]}" "$@" > "$ordered.log" 2>&1 ||
    { cat "$ordered.log"; fail "$name failed with messages matched in issue order"; }
  grep -q "messages match in issue order" "$ordered.log" || fail "$name: FMOE_P2P_ISSUE_ORDER=1 did not take"
  grep -q "^pipeline: .*; sends and receives in groups" "$ordered.log" || fail "$name: the pipeline did not send and receive in groups"
  python3 - "$dir/metrics.jsonl" "$ordered/metrics.jsonl" "$name" <<'PY' || fail "$name differs when messages match in issue order"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert a == b, next((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else (len(a), len(b))
print("ok: %-28s bit-identical under NCCL's point-to-point rules (grouped)" % sys.argv[3])
PY
}
check pp2 2 --set parallel.pp=2
check pp4 4 --set parallel.pp=4
check gpipe_pp2 2 --set parallel.pp=2 --set parallel.pipeline_schedule=gpipe
check interleaved_pp2_v2 2 --set parallel.pp=2 --set parallel.virtual_pp=2
check pp2_dp2_ep2 4 --set parallel.pp=2 --set parallel.ep=2 --set training.micro_batch_size=1
check pp2_dp2_zero1 4 --set parallel.pp=2 --set parallel.zero1=true --set training.micro_batch_size=1
check pp2_tp2_sp 4 --set parallel.pp=2 --set parallel.tp=2 --set parallel.sequence_parallel=true
check pp2_dp2_tp2_ep2 8 --set parallel.pp=2 --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=1
check pp2_written_layout 2 --set parallel.pp=2 --set 'parallel.pipeline_layout=E t | t*2 L'
ZB=(--set parallel.pipeline_schedule=zbh1)
DPV=(--set parallel.pipeline_schedule=dualpipev --set parallel.virtual_pp=2)
check zbh1_pp2 2 --set parallel.pp=2 "${ZB[@]}"
check zbh1_pp4 4 --set parallel.pp=4 "${ZB[@]}"
check zbh1_pp2_dp2_zero1 4 --set parallel.pp=2 "${ZB[@]}" --set parallel.zero1=true --set training.micro_batch_size=1
check dualpipev_pp2 2 --set parallel.pp=2 "${DPV[@]}"
check dualpipev_pp4 4 --set parallel.pp=4 "${DPV[@]}" --set training.grad_accum_steps=8 --set training.micro_batch_size=1
check dualpipev_pp2_dp2_ep2 4 --set parallel.pp=2 "${DPV[@]}" --set parallel.ep=2 --set parallel.zero1=true --set training.micro_batch_size=1
check dualpipev_pp2_dp2_ep2_overlap 4 --set parallel.pp=2 "${DPV[@]}" --set parallel.ep=2 --set parallel.ep_overlap=true --set training.micro_batch_size=1 \
  --set parallel.bucket_mb=0.05
# DualPipeV's F&B pairs overlapped (the forward on a second thread with its own
# groups): bit-identical to the pairs' halves in turn, at pp2 and pp4.
same_losses() {  # name, run dir, run dir
  python3 - "$WORK_DIR/pp_$2/metrics.jsonl" "$WORK_DIR/pp_$3/metrics.jsonl" "$1" <<'PY' || fail "$1 differs from its run without it"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(a) == len(b) == 20 and a == b, next(((i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y), (len(a), len(b)))
# How long the pairs' halves ran at once (reported, not asserted: it is a timing).
overlapped = [sum(json.loads(l)["pipeline"]["overlapped_seconds"][r] for l in open(sys.argv[2])) for r in (0, 1)]
print("ok: %-28s bit-identical to its run without it (halves at once: %+.3f s, %+.3f s)" % (sys.argv[3], *overlapped))
PY
}
FB=(--set parallel.fb_overlap=true)
check dualpipev_pp2_fb 2 --set parallel.pp=2 "${DPV[@]}" "${FB[@]}"
grep -q "F&B pairs overlapped" "$WORK_DIR/pp_dualpipev_pp2_fb.log" || fail "dualpipev_pp2_fb: the pairs did not overlap"
same_losses "fb_overlap at pp2" dualpipev_pp2 dualpipev_pp2_fb
check dualpipev_pp4_fb 4 --set parallel.pp=4 "${DPV[@]}" --set training.grad_accum_steps=8 --set training.micro_batch_size=1 "${FB[@]}"
same_losses "fb_overlap at pp4" dualpipev_pp4 dualpipev_pp4_fb
check dualpipev_pp2_dp2_ep2_overlap_fb 4 --set parallel.pp=2 "${DPV[@]}" --set parallel.ep=2 --set parallel.ep_overlap=true --set training.micro_batch_size=1 \
  --set parallel.bucket_mb=0.05 "${FB[@]}"
same_losses "fb_overlap at pp2 dp2 ep2" dualpipev_pp2_dp2_ep2_overlap dualpipev_pp2_dp2_ep2_overlap_fb
check dualpipev_pp2_tp2_sp 4 --set parallel.pp=2 "${DPV[@]}" --set parallel.tp=2 --set parallel.sequence_parallel=true
check dualpipev_pp2_tp2_sp_fb 4 --set parallel.pp=2 "${DPV[@]}" --set parallel.tp=2 --set parallel.sequence_parallel=true "${FB[@]}"
same_losses "fb_overlap at pp2 tp2" dualpipev_pp2_tp2_sp dualpipev_pp2_tp2_sp_fb
check zbh1_pp2_dp2 4 --set parallel.pp=2 "${ZB[@]}" --set parallel.bucket_mb=0.05 --set training.micro_batch_size=1
# Gradient buckets start reducing during each stage's last backward actions (its
# last I for norms and the embedding, its last W for the rest): under ZB-H1 every
# bucket of rank 0 does; under DualPipeV, which mixes whole and split backwards
# on a stage, most do.
python3 - "$WORK_DIR/pp_zbh1_pp2_dp2/metrics.jsonl" "$WORK_DIR/pp_dualpipev_pp2_dp2_ep2_overlap/metrics.jsonl" <<'PY' || fail "gradient buckets wait for the end of backward"
import json, sys
for path, share in ((sys.argv[1], 1.0), (sys.argv[2], 0.5)):
    lines = [json.loads(l)["gradient_buckets"] for l in open(path)]
    total, early = lines[0]["total"], min(b["launched_in_backward"] for b in lines)
    assert total >= 4 and early >= share * total, (path, lines[0], early)
    print("ok: %s: %d of %d gradient buckets launched during backward" % (path.split("/")[-2], early, total))
PY

# Every gradient of the first step (reduced, before clipping) against one process:
# each pipeline rank writes its stages' gradients; together they are the model's.
ONE=(--set training.steps=1 --set optimizer.warmup_steps=1 --set training.eval_interval=0 --set training.checkpoint_interval=0
     --set training.grad_accum_steps=4 --set training.micro_batch_size=2)
grads() {  # name, ranks, extra args...
  local name=$1 ranks=$2; shift 2
  local dir="$WORK_DIR/grads_$name"; rm -rf "$dir" && mkdir -p "$dir"
  mpirun -np "$ranks" -x FMOE_DUMP_GRADIENTS="$dir" "$TRAIN" $(micro_args "$dir/run") "${ONE[@]}" "$@" > "$dir.log" 2>&1 \
    || { cat "$dir.log"; fail "$name gradient run failed"; }
}
grads reference 1
for layout in "pp2 2 --set parallel.pp=2" "pp4 4 --set parallel.pp=4" "interleaved_pp2_v2 2 --set parallel.pp=2 --set parallel.virtual_pp=2" \
              "zbh1_pp4 4 --set parallel.pp=4 ${ZB[*]}" "dualpipev_pp2 2 --set parallel.pp=2 ${DPV[*]}" \
              "dualpipev_pp4 4 --set parallel.pp=4 ${DPV[*]} --set training.grad_accum_steps=8 --set training.micro_batch_size=1"; do
  read -r name ranks extra <<< "$layout"
  grads "$name" "$ranks" $extra
  python3 - "$WORK_DIR/grads_reference" "$WORK_DIR/grads_$name" "$name" <<'PY' || fail "$name gradients differ from one process"
import array, glob, json, math, struct, sys
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        assert info["dtype"] == "F32", info
        begin, end = info["data_offsets"]
        values = array.array("f")
        values.frombytes(raw[8 + n + begin:8 + n + end])
        out[key] = values
    return out
ref = load(sys.argv[1] + "/gradients_rank0.safetensors")
got = {}
for path in sorted(glob.glob(sys.argv[2] + "/gradients_rank*.safetensors")):
    for key, values in load(path).items():
        assert key not in got, "two ranks hold " + key
        got[key] = values
assert sorted(got) == sorted(ref), set(ref) ^ set(got)
worst = 0.0
for key, r in ref.items():
    g = got[key]
    norm = math.sqrt(sum(x * x for x in r))
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(r, g)))
    rel = diff / norm if norm > 0 else diff
    assert rel <= 1e-5, (key, rel)
    worst = max(worst, rel)
print("ok: %-28s all %d gradients within %.1e of one process" % (sys.argv[3], len(ref), worst))
PY
done

# The single process's checkpoint validated through a pp4 pipeline (--eval-only): the same loss.
out=$(mpirun -np 4 "$TRAIN" $(micro_args "$ref") "${STEPS[@]}" --set parallel.pp=4 --eval-only 2>&1) || { echo "$out"; fail "pp4 eval-only failed"; }
python3 - "$ref/metrics.jsonl" "$(printf '%s\n' "$out" | grep -o 'val_loss [0-9.]*' | tail -1 | cut -d' ' -f2)" <<'PY' || fail "pp4 validation differs"
import json, sys
want = [json.loads(l) for l in open(sys.argv[1])][-1]["val_loss"]
got = float(sys.argv[2])
assert abs(got - want) / want <= 1e-5, (got, want)
print("ok: the one-process checkpoint validates to %.7f through a pp4 pipeline (%.7f)" % (got, want))
PY

# Stop at step 3, resume: bit-identical to the uninterrupted pp2 run.
dir="$WORK_DIR/pp_resume"; rm -rf "$dir"
# A checkpoint at step 2 too: training goes on after one (other stages' weights are gathered, then freed).
mpirun -np 2 "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" --set parallel.pp=2 --set training.checkpoint_interval=2 --stop-at 3 \
  > "$dir.1.log" 2>&1 || { cat "$dir.1.log"; fail "stop failed"; }
mpirun -np 2 "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" --set parallel.pp=2 --set training.checkpoint_interval=2 --resume \
  > "$dir.2.log" 2>&1 || { cat "$dir.2.log"; fail "resume failed"; }
[ "$(losses "$dir/metrics.jsonl")" = "$(losses "$WORK_DIR/pp_pp2/metrics.jsonl")" ] || fail "pp2 resume is not bit-identical"
echo "ok: pp2 stopped at 3 and resumed is bit-identical"

ERROR_PREFIX=moe-train: expect_error "parallel.pipeline_schedule: dualpipev runs two chunks per rank in a V (set virtual_pp: 2), got virtual_pp 1" \
  mpirun -np 2 "$TRAIN" $(micro_args "$WORK_DIR/pp_dpv") "${STEPS[@]}" --set parallel.pp=2 --set parallel.pipeline_schedule=dualpipev
ERROR_PREFIX=moe-train: expect_error "parallel.fb_overlap: overlaps DualPipeV's F&B pairs; pipeline_schedule is 'auto'" \
  mpirun -np 2 "$TRAIN" $(micro_args "$WORK_DIR/pp_fb") "${STEPS[@]}" --set parallel.pp=2 --set parallel.fb_overlap=true
ERROR_PREFIX=moe-train: expect_error "parallel.pipeline_layout: pipeline layout 'E t | t L': places 2 of the 3 layers: layer 2 is missing" \
  mpirun -np 2 "$TRAIN" $(micro_args "$WORK_DIR/pp_bad") "${STEPS[@]}" --set parallel.pp=2 --set 'parallel.pipeline_layout=E t | t L'

#!/usr/bin/env bash
# Optimizer state resharded on load (FP32 AdamW, with or without ZeRO-1): a run stopped
# at step 5 under layout A resumes under layout B, and its next 5 losses equal
# those of the same checkpoint resumed under A within 1e-5 relative; the layout
# change is printed. A -> B: dp2+ep2 -> dp4+ep4, dp4+ep4 -> dp2+ep2 (experts per
# rank doubling), dp2 x tp2 + ep2 -> dp4+ep4, tp2 -> one process, one process ->
# dp4, dp2+ep2 with ZeRO-1 -> dp4+ep2 with ZeRO-1, dp4+ep2 with ZeRO-1 -> one
# process. Low-precision state still resumes only under the layout that wrote
# it: refused in one line naming the layout.
source "$(dirname "$0")/common.sh"
STEPS=(--set training.steps=10 --set optimizer.warmup_steps=2 --set training.eval_interval=0 --set training.checkpoint_interval=0
       --set training.grad_accum_steps=1)
layout_args() {  # a layout name -> ranks and --set flags (8 sequences per step whatever dp is)
  case "$1" in
    one) echo "1 --set training.micro_batch_size=8" ;;
    dp2_ep2) echo "2 --set parallel.ep=2 --set training.micro_batch_size=4" ;;
    dp4_ep4) echo "4 --set parallel.ep=4 --set training.micro_batch_size=2" ;;
    dp2_tp2_ep2) echo "4 --set parallel.tp=2 --set parallel.ep=2 --set training.micro_batch_size=4" ;;
    tp2) echo "2 --set parallel.tp=2 --set training.micro_batch_size=8" ;;
    dp4) echo "4 --set training.micro_batch_size=2" ;;
    dp2_ep2_zero1) echo "2 --set parallel.ep=2 --set parallel.zero1=true --set training.micro_batch_size=4" ;;
    dp4_ep2_zero1) echo "4 --set parallel.ep=2 --set parallel.zero1=true --set training.micro_batch_size=2" ;;
  esac
}
train() {  # dir, layout, extra...
  local dir=$1 layout=$2; shift 2
  read -r ranks flags <<< "$(layout_args "$layout")"
  mpirun -np "$ranks" "$TRAIN" $(micro_args "$dir") "${STEPS[@]}" $flags "$@"
}
reshard() {  # from, to
  local from=$1 to=$2 base="$WORK_DIR/reshard_${1}_to_${2}"
  rm -rf "$base".*
  train "$base.a" "$from" --stop-at 5 > "$base.a.log" 2>&1 || { cat "$base.a.log"; fail "$from: the first 5 steps failed"; }
  cp -r "$base.a" "$base.b"
  train "$base.a" "$from" --resume > "$base.a2.log" 2>&1 || { cat "$base.a2.log"; fail "$from: resuming under $from failed"; }
  train "$base.b" "$to" --resume > "$base.b2.log" 2>&1 || { cat "$base.b2.log"; fail "$from -> $to: resuming failed"; }
  [ "$from" = "$to" ] || grep -q "optimizer state resharded: written under" "$base.b2.log" || fail "$from -> $to: the layout change is not printed"
  python3 - "$base.a/metrics.jsonl" "$base.b/metrics.jsonl" "$from -> $to" <<'PY' || fail "$from -> $to: losses differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])][5:]; b = [json.loads(l) for l in open(sys.argv[2])][5:]
assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6, 11))
worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a, b))
assert worst <= 1e-5, worst
print("ok: %-22s steps 6-10 within %.1e of continuing under the first layout" % (sys.argv[3], worst))
PY
}
reshard dp2_ep2 dp4_ep4
reshard dp4_ep4 dp2_ep2
reshard dp2_tp2_ep2 dp4_ep4
reshard tp2 one
reshard one dp4
reshard dp2_ep2_zero1 dp4_ep2_zero1
reshard dp4_ep2_zero1 one

dir="$WORK_DIR/reshard_bf16"; rm -rf "$dir"
train "$dir" dp2_ep2 --set optimizer.exp_avg_dtype=bf16 --stop-at 3 > "$dir.log" 2>&1 || { cat "$dir.log"; fail "bf16-state run failed"; }
ERROR_PREFIX=moe-train: expect_error "optimizer state was written under layout dp2 pp1 tp1 ep2; resume under that layout" \
  train "$dir" dp4_ep4 --set optimizer.exp_avg_dtype=bf16 --resume

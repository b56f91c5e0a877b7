#!/usr/bin/env bash
# The optimizer study of docs/optimizer.md: one config trained eighteen ways from the
# same seed and data, at equal steps: AdamW with FP32 state (the reference),
# AdamW at 5.09 bytes per parameter (FP16 master, FP8 gradients and moments),
# Muon with FP32 state, Muon with BF16 master weights (stochastic rounding) and
# FP8 gradients, momentum and AdamW second moments, and the same with FP4
# gradients (stochastically rounded; 1 x 128 tiles with FP32 scales, and
# NVFP4's 1 x 16 tiles with E4M3 scales, also rounded to nearest, and to
# nearest after a random Hadamard rotation of each tile): under 4 bytes per
# parameter; and with every gradient in FP6 (E2M3 in 1 x 32 tiles, to
# nearest), then the first moments (Muon's momentum) too, with BF16 master weights and with
# FP32 ones (which part of the small state's gap is the master's), and with one
# state in low precision at a time beside an FP32 master (FP6 gradients, FP6
# momentum, FP8 second moments: which of them costs the loss), and FP6 state with
# the AdamW parameters' second moments in BF16 instead of FP8, or in FP8 rounded
# stochastically (muon_fp6_sr; adamw_5_bytes_sr the same for AdamW's recipe). And Muon FP32 once more with a schedule SHORT (0.8) times
# as long: whether it reaches AdamW FP32's final loss in that fraction of its
# tokens when its learning rate decays over them (a run that decays over the
# full length is still at a high rate at 0.8x, so its curve understates this).
# Prints a markdown table (state bytes per parameter as the metrics report it,
# final validation loss, gap to its FP32 self, tokens to reach AdamW FP32's final
# validation loss, seconds per step) and draws the validation-loss curves with
# moe-report into runs/optimizer_study/<config>/report/.
#   scripts/optimizer_study.sh [CONFIG]   (default configs/tiny.yaml)
#   STEPS (300), EVERY (validation interval, 25), PRECISION (fp32: the GEMMs of
#   every run alike, on any CPU), MUON_LR (the matrices' peak lr; default three
#   times the config's, the better of 1x and 3x on tiny), ONLY=<run name>,
#   SHORT (0.8: the short run's fraction of STEPS),
#   SEED (training.seed: the initialization and the data order; the runs go to
#   runs/optimizer_study/<config>_seed<SEED>/, the config's own seed to <config>/),
#   ADAMW_LR (the AdamW runs' peak lr and Muon's adamw_lr; default the config's),
#   TAG (appended to the runs' folder name: a learning-rate search keeps each
#   setting apart, e.g. TAG=muon6x MUON_LR=0.009 ONLY=muon_fp32_short).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/tiny.yaml}
NAME=$(basename "$CONFIG" .yaml)${SEED:+_seed$SEED}${TAG:+_$TAG}
OUT=runs/optimizer_study/$NAME
mkdir -p "$OUT"
scripts/build.sh moe-train moe-data moe-report >/dev/null
build/launch/moe-data prepare --config "$CONFIG" >/dev/null
lr=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['optimizer']['lr'])" "$CONFIG" 2>/dev/null ||
     sed -n 's/^  lr: *//p' "$CONFIG" | head -1)
MUON_LR=${MUON_LR:-$(python3 -c "print(3 * $lr)")}
lr=${ADAMW_LR:-$lr}
COMMON=(--config "$CONFIG" --set training.steps="${STEPS:-300}" --set training.eval_interval="${EVERY:-25}"
        --set training.checkpoint_interval=0 --set budget.max_minutes=0 --set training.precision="${PRECISION:-fp32}"
        ${SEED:+--set training.seed="$SEED"} --set optimizer.lr="$lr" --set optimizer.min_lr="$(python3 -c "print($lr / 10)")")
SMALL=(--set optimizer.grad_dtype=fp8 --set optimizer.exp_avg_dtype=fp8 --set optimizer.exp_avg_sq_dtype=fp8)
MUON=(--set optimizer.name=muon --set optimizer.lr="$MUON_LR" --set optimizer.min_lr="$(python3 -c "print($MUON_LR / 10)")" --set optimizer.adamw_lr="$lr")
declare -A runs=(
  [adamw_fp32]=""
  [adamw_5_bytes]="--set optimizer.main_params_dtype=fp16 ${SMALL[*]}"
  [muon_fp32]="${MUON[*]}"
  [muon_fp32_short]="${MUON[*]} --set training.steps=$(python3 -c "print(round(${SHORT:-0.8} * ${STEPS:-300}))")"
  [muon_small]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]}"
  [muon_fp4_grads]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=fp4"
  [muon_nvfp4_grads]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=nvfp4"
  [muon_nvfp4_nearest]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=nvfp4 --set optimizer.grad_stochastic_rounding=false"
  [muon_nvfp4_hadamard]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=nvfp4 --set optimizer.grad_stochastic_rounding=false --set optimizer.grad_hadamard=true"
  [muon_fp6_grads]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=fp6"
  [muon_fp6]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=fp6 --set optimizer.exp_avg_dtype=fp6"
  [muon_fp6_fp32_master]="${MUON[*]} ${SMALL[*]} --set optimizer.grad_dtype=fp6 --set optimizer.exp_avg_dtype=fp6"
  [muon_fp32_fp6_grads_only]="${MUON[*]} --set optimizer.grad_dtype=fp6"
  [muon_fp32_fp6_momentum_only]="${MUON[*]} --set optimizer.exp_avg_dtype=fp6"
  [muon_fp32_fp8_second_moments_only]="${MUON[*]} --set optimizer.exp_avg_sq_dtype=fp8"
  [muon_fp6_bf16_second_moments]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true --set optimizer.grad_dtype=fp6 --set optimizer.exp_avg_dtype=fp6 --set optimizer.exp_avg_sq_dtype=bf16"
  [muon_fp6_sr]="${MUON[*]} --set optimizer.main_params_dtype=bf16 --set optimizer.stochastic_rounding=true ${SMALL[*]} --set optimizer.grad_dtype=fp6 --set optimizer.exp_avg_dtype=fp6 --set optimizer.exp_avg_sq_stochastic_rounding=true"
  [adamw_5_bytes_sr]="--set optimizer.main_params_dtype=fp16 ${SMALL[*]} --set optimizer.exp_avg_sq_stochastic_rounding=true"
)
order=(adamw_fp32 adamw_5_bytes muon_fp32 muon_fp32_short muon_small muon_fp4_grads muon_nvfp4_grads muon_nvfp4_nearest muon_nvfp4_hadamard
       muon_fp6_grads muon_fp6 muon_fp6_fp32_master muon_fp32_fp6_grads_only muon_fp32_fp6_momentum_only
       muon_fp32_fp8_second_moments_only muon_fp6_bf16_second_moments muon_fp6_sr adamw_5_bytes_sr)
for run in "${order[@]}"; do
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "$run" ] && continue
  echo "== $NAME $run" >&2
  rm -rf "${OUT:?}/$run"
  # shellcheck disable=SC2086
  build/launch/moe-train "${COMMON[@]}" --set training.run_dir="$OUT/$run" ${runs[$run]} > "$OUT.$run.log" 2>&1 ||
    { tail -5 "$OUT.$run.log"; exit 1; }
done
dirs=(); for run in "${order[@]}"; do [ -f "$OUT/$run/metrics.jsonl" ] && dirs+=("$OUT/$run"); done
build/launch/moe-report "${dirs[@]}" --out "$OUT/report" >/dev/null
python3 - "$OUT" "${order[@]}" <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
rows = {n: [json.loads(l) for l in open(f"{out}/{n}/metrics.jsonl")] for n in names if os.path.exists(f"{out}/{n}/metrics.jsonl")}
# A run stopped before its last validation has no final loss: it is left out of the table.
rows = {n: lines[:max(i + 1 for i, l in enumerate(lines) if "val_loss" in l)] for n, lines in rows.items() if any("val_loss" in l for l in lines)}
ref = rows["adamw_fp32"][-1]["val_loss"] if "adamw_fp32" in rows else None
ref_tokens = rows["adamw_fp32"][-1]["tokens_seen"] if "adamw_fp32" in rows else None
def own(name):  # each run's FP32 self: its optimizer's FP32 run (none for those and the shorter run)
    if name in ("adamw_fp32", "muon_fp32", "muon_fp32_short"):
        return None
    return "adamw_fp32" if name.startswith("adamw") else "muon_fp32"
print(f"| run | state B/param | final val loss | gap to its FP32 self | tokens to AdamW FP32's final loss | s/step |")
print("|---|---|---|---|---|---|")
for name, lines in rows.items():
    last = lines[-1]
    base = own(name)
    gap = f"{100 * (last['val_loss'] - rows[base][-1]['val_loss']) / rows[base][-1]['val_loss']:+.2f}%" if base in rows else "—"
    reach = next((l["tokens_seen"] for l in lines if "val_loss" in l and ref is not None and l["val_loss"] <= ref), None)
    reach_text = "not reached" if reach is None else f"{reach / 1e6:.3f}M ({reach / ref_tokens:.2f}x)"
    step = sum(l["step_seconds"] for l in lines[3:]) / max(1, len(lines[3:]))
    print(f"| {name} | {last['state_bytes_per_param']:.2f} | {last['val_loss']:.4f} | {gap} | {reach_text} | {step:.3f} |")
PY

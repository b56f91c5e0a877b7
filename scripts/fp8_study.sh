#!/usr/bin/env bash
# The FP8 convergence study of docs/fp8.md: configs/fp8_study.yaml trained five
# ways from the same seed and data; prints a markdown table (final validation
# loss, gap to FP32, training-state bytes per parameter, tokens/s).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh moe-train moe-data >/dev/null
build/launch/moe-data prepare --config configs/tiny.yaml >/dev/null
declare -A recipes=(
  [fp32]=""
  [a_fp8_gemm]="--set precision.fp8=true"
  [b_deepseek_v3]="--set precision.fp8=true --set optimizer.exp_avg_dtype=bf16 --set optimizer.exp_avg_sq_dtype=bf16"
  [c_6_bytes]="--set precision.fp8=true --set optimizer.main_params_dtype=fp16 --set optimizer.grad_dtype=fp8 --set optimizer.exp_avg_dtype=fp8 --set optimizer.exp_avg_sq_dtype=fp16"
  [d_5_bytes]="--set precision.fp8=true --set optimizer.main_params_dtype=fp16 --set optimizer.grad_dtype=fp8 --set optimizer.exp_avg_dtype=fp8 --set optimizer.exp_avg_sq_dtype=fp8"
)
order=(fp32 a_fp8_gemm b_deepseek_v3 c_6_bytes d_5_bytes)
for name in "${order[@]}"; do
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ] && continue
  echo "== $name" >&2
  # shellcheck disable=SC2086
  build/launch/moe-train --config configs/fp8_study.yaml --set training.run_dir=runs/fp8_study/$name ${recipes[$name]} >&2
done
python3 - "${order[@]}" <<'PY'
import json, sys
rows = {}
for name in sys.argv[1:]:
    try:
        lines = [json.loads(l) for l in open(f"runs/fp8_study/{name}/metrics.jsonl")]
    except FileNotFoundError:
        continue
    rows[name] = lines
base = rows["fp32"][-1]["val_loss"] if "fp32" in rows else None
print("| run | final val loss | gap to FP32 | state B/param | tokens/s | wall (s) |")
print("|---|---|---|---|---|---|")
for name, lines in rows.items():
    last = lines[-1]
    secs = sum(l["step_seconds"] for l in lines)
    tps = sum(l["tokens_per_second"] * l["step_seconds"] for l in lines) / secs
    gap = "—" if base is None or name == "fp32" else f"{100 * (last['val_loss'] - base) / base:+.2f}%"
    print(f"| {name} | {last['val_loss']:.4f} | {gap} | {last['state_bytes_per_param']:.2f} | {tps:.0f} | {secs:.0f} |")
PY

#!/usr/bin/env bash
# moe-sweep on the fixture corpus. (1) 8 trials: learning rate log-uniform
# (4 draws) x aux-loss coefficient (grid of 2), two trials at a time; the
# expansion is the same on every dry run; SIGTERM stops it with finished and
# interrupted trials; the rerun skips the finished ones (launched once) and
# resumes the others from their checkpoints (every step recorded once); the
# summary lists 8 trials sorted by best validation loss, with PNG charts.
# (2) Successive halving over a token budget: spends no more than the budget
# plus one step, and promotes the trials with the lowest validation loss.
# moe-report draws any runs. Bad sweep files fail in one line naming the key.
source "$(dirname "$0")/common.sh"
SWEEP="$BIN_DIR/moe-sweep"
REPORT="$BIN_DIR/moe-report"
dir="$WORK_DIR/sweep"; rm -rf "$dir"; mkdir -p "$dir"
# A sweep file over the micro config: its name, then lines for set:, then the rest.
sweep_file() {
  local name=$1 set_lines=$2 rest=$3
  cat > "$dir/$name.yaml" <<YAML
base: $(cd "$(dirname "$CONFIG")" && pwd)/micro.yaml
out_dir: $dir/$name
ranks: 1
set:
  data.prefix: $CORPUS/gcide
  data.tokenizer: $CORPUS/tok.model
  training.micro_batch_size: 4
  training.eval_sequences: 8
  training.log_interval: 100
  training.checkpoint_interval: 2
  optimizer.warmup_steps: 2
$set_lines
$rest
YAML
}
sweep_file lr_aux "  training.steps: 400
  training.eval_interval: 200" "parallel_ranks: 2
axes:
  optimizer.lr: {log_uniform: [1.0e-3, 2.0e-2]}
  model.aux_loss_coeff: {grid: [0.0, 0.01]}
random: {count: 4, seed: 3}"
"$SWEEP" --sweep "$dir/lr_aux.yaml" --dry-run > "$dir/dry1.txt" || fail "dry run failed"
"$SWEEP" --sweep "$dir/lr_aux.yaml" --dry-run > "$dir/dry2.txt"
cmp -s "$dir/dry1.txt" "$dir/dry2.txt" || fail "the expansion differs between two dry runs"
[ "$(grep -c '^trial_' "$dir/dry1.txt")" -eq 8 ] || { cat "$dir/dry1.txt"; fail "expected 8 trials"; }
[ ! -d "$dir/lr_aux" ] || fail "--dry-run wrote the out_dir"
echo "ok: 8 trials (4 log-uniform learning rates x 2 aux-loss coefficients), the same on every dry run"

# Run, and stop it with SIGTERM once two trials are done.
"$SWEEP" --sweep "$dir/lr_aux.yaml" > "$dir/run1.log" 2>&1 &
pid=$!
# Stop once two trials are done and a running one has passed its first checkpoint (step 2).
ready() {
  [ "$(cat "$dir"/lr_aux/trial_*/trial.json 2>/dev/null | grep -c '"state": "done"' || true)" -ge 2 ] || return 1
  for t in "$dir"/lr_aux/trial_*; do
    grep -q '"state": "running"' "$t/trial.json" 2>/dev/null && [ -f "$t/metrics.jsonl" ] && [ "$(grep -c . "$t/metrics.jsonl")" -ge 3 ] && return 0
  done
  return 1
}
for _ in $(seq 1 3000); do
  ready && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.02
done
kill -TERM "$pid" 2>/dev/null || true
rc=0; wait "$pid" || rc=$?
grep -q "moe-sweep: stopped; run it again to resume" "$dir/run1.log" || { cat "$dir/run1.log"; fail "the sweep did not stop on SIGTERM (rc $rc)"; }
trials_in() { grep -l "\"state\": \"$1\"" "$dir"/lr_aux/trial_*/trial.json 2>/dev/null | xargs -r -n1 dirname | xargs -r -n1 basename | sort || true; }
finished=$(trials_in done)
interrupted=$(trials_in stopped)
[ -n "$interrupted" ] || fail "no trial was interrupted"
echo "ok: SIGTERM stopped the sweep with $(echo $finished | wc -w) trials done and $(echo $interrupted | wc -w) interrupted at a checkpoint"

"$SWEEP" --sweep "$dir/lr_aux.yaml" > "$dir/run2.log" 2>&1 || { cat "$dir/run2.log"; fail "the resumed sweep failed"; }
grep -q "all trials done" "$dir/run2.log" || fail "the resumed sweep did not finish"
for t in $finished; do
  grep -q "$t" "$dir/run2.log" && grep -q "moe-sweep: $t.*mpirun" "$dir/run2.log" && fail "finished trial $t ran again"
  python3 -c "import json,sys; assert json.load(open(sys.argv[1]))['launches'] == 1" "$dir/lr_aux/$t/trial.json" || fail "$t launched twice"
done
for t in $interrupted; do grep -q "moe-sweep: $t (resumed)" "$dir/run2.log" || fail "$t was not resumed from its checkpoint"; done
python3 - "$dir/lr_aux" <<'PY' || fail "trial records or summary"
import csv, glob, json, os, sys
root = sys.argv[1]
for t in sorted(glob.glob(root + "/trial_*")):
    steps = [json.loads(l)["step"] for l in open(t + "/metrics.jsonl")]
    assert steps == list(range(1, 401)), (t, steps)
rows = list(csv.DictReader(open(root + "/summary.csv")))
assert len(rows) == 8 and all(r["state"] == "done" for r in rows), rows
best = [float(r["best_val_loss"]) for r in rows]
assert best == sorted(best), best
assert set(rows[0]) >= {"trial", "optimizer.lr", "model.aux_loss_coeff", "final_val_loss", "best_val_loss", "tokens", "seconds", "gpu_hours", "state"}
assert sum(1 for r in rows if r["model.aux_loss_coeff"] == "0.01") == 4
md = open(root + "/summary.md").read()
assert md.count("| trial_0") == 8 and "![loss](loss.png)" in md
for png in ("loss.png", "val_loss.png", "val_vs_axis0.png", "val_vs_axis1.png"):
    data = open(os.path.join(root, png), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
PY
echo "ok: the rerun skipped $(echo $finished | wc -w) finished trials and resumed the rest; 8 trials with steps 1-400 once each; summary sorted by best validation loss; 4 PNG charts"

# Successive halving over 12800 tokens (50 steps of 256 tokens): 8 trials to step 4, the best 4 to 8, the best 2 to 16.
sweep_file asha "  training.steps: 16" "axes:
  optimizer.lr: {log_uniform: [1.0e-3, 3.0e-2]}
random: {count: 8, seed: 5}
search: {method: asha, min_steps: 4, eta: 2, budget: {tokens: 12800}}"
"$SWEEP" --sweep "$dir/asha.yaml" > "$dir/asha.log" 2>&1 || { cat "$dir/asha.log"; fail "the ASHA sweep failed"; }
python3 - "$dir/asha" <<'PY' || { cat "$dir/asha.log"; fail "ASHA budget or promotions"; }
import glob, json, sys
root = sys.argv[1]
trials = {}
for t in sorted(glob.glob(root + "/trial_*")):
    state = json.load(open(t + "/trial.json"))
    rows = [json.loads(l) for l in open(t + "/metrics.jsonl")] if glob.glob(t + "/metrics.jsonl") else []
    trials[t.split("/")[-1]] = (state, rows)
spent = sum(rows[-1]["tokens_seen"] for _, rows in trials.values() if rows)
assert spent <= 12800 + 256, spent          # the budget, plus at most one step
assert spent >= 12800 - 4 * 256, spent      # and spent, not left over
# Rung 1 holds the 4 trials with the lowest validation loss at step 4, rung 2 the best 2 of those at step 8.
at4 = {n: s["rung_val_loss"]["0"] for n, (s, _) in trials.items()}
best4 = sorted(sorted(at4, key=at4.get)[:4])
past4 = sorted(n for n, (_, rows) in trials.items() if rows[-1]["step"] > 4)
assert best4 == past4, (best4, past4)
at8 = {n: trials[n][0]["rung_val_loss"]["1"] for n in best4}
best2 = sorted(sorted(at8, key=at8.get)[:2])
past8 = sorted(n for n, (_, rows) in trials.items() if rows[-1]["step"] > 8)
assert set(past8) <= set(best2) and past8, (best2, past8)
pruned = sorted(n for n, (s, _) in trials.items() if s["state"] == "pruned")
assert pruned == sorted(set(trials) - set(best2)), pruned
print("ok: ASHA spent %d of 12800 tokens; rung 1 = the 4 best at step 4 (%s), rung 2 = the 2 best of those at step 8 (%s)" % (spent, " ".join(best4), " ".join(best2)))
PY
grep -q "budget spent\|done" "$dir/asha.log" || fail "the ASHA sweep did not report its spend"

# moe-report on any runs.
"$REPORT" "$dir/lr_aux/trial_000" "$dir/lr_aux/trial_001" --out "$dir/report" > "$dir/report.log" 2>&1 || { cat "$dir/report.log"; fail "moe-report failed"; }
for png in loss.png val_loss.png throughput.png expert_load_trial_000.png expert_load_trial_001.png; do
  [ "$(head -c 4 "$dir/report/$png" | od -An -c | tr -d ' ')" = "211PNG" ] || fail "moe-report: $png is not a PNG"
done
echo "ok: moe-report drew loss, validation loss, throughput and expert-load heatmaps of two runs"

# Bad input: one line naming the file and key.
abs_config="$(cd "$(dirname "$CONFIG")" && pwd)/micro.yaml"
printf 'base: %s\naxes:\n  optimizer.lr: {log_uniform: [0, 1]}\n' "$abs_config" > "$dir/bad.yaml"
ERROR_PREFIX=moe-sweep: expect_error "bad.yaml: axes.optimizer.lr.log_uniform: low must be > 0 on a log scale" "$SWEEP" --sweep "$dir/bad.yaml"
printf 'base: %s\nset: {training.steps: 4}\naxes:\n  optimizer.no_such_key: {grid: [1, 2]}\n' "$abs_config" > "$dir/bad.yaml"
ERROR_PREFIX=moe-sweep: expect_error "bad.yaml: trial_000: --set: unknown key 'optimizer.no_such_key'" "$SWEEP" --sweep "$dir/bad.yaml" --dry-run

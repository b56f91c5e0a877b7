#!/usr/bin/env python3
"""Replays a budget-sized run's step times through the schedule's drift rules.

  scripts/replay_schedule.py RUN_DIR/metrics.jsonl [--eval-interval N] [--spent SECONDS]

Reads the recorded step times and the decision line (`schedule`: the fixed
length, the calibrated step and validation times, the limit, the time spent at
the decision; --spent for runs whose line predates that field) and applies the trainer's arithmetic (trainer/budget.cpp) under four
rules: the window's mean or median, with and without lengthening. Steps past
the recorded ones take the median of the recorded steps. Prints each rule's
final length, the time it would have spent and its decisions (step, before,
after). A way to tune the rule on real runs; the trainer does not use it.
"""
import argparse
import json
import math
import statistics

PLANNED, GROW_BELOW, WINDOW = 0.90, 0.80, 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("metrics")
    ap.add_argument("--eval-interval", type=int, default=0, help="the run's training.eval_interval")
    ap.add_argument("--spent", type=float, help="seconds spent at the decision, where the metrics lack it")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.metrics)]
    decision = next(r for r in rows if "schedule" in r)
    sched = decision["schedule"]
    times = {r["step"]: r["step_seconds"] for r in rows if "step_seconds" in r}
    typical = statistics.median(times.values())
    limit, every, t_eval = sched["limit_seconds"], args.eval_interval, sched["eval_seconds"]
    fixed_at, spent_at_fix = decision["step"], sched.get("elapsed_seconds", args.spent)
    if spent_at_fix is None:
        raise SystemExit(f"{args.metrics}: the schedule line has no elapsed_seconds: pass --spent")

    def passes_left(done, total):
        periodic = total // every - done // every if every > 0 else 0
        return periodic + (0 if every > 0 and total % every == 0 else 1)

    def projected(spent, step, t, total):
        return spent + max(0, total - step) * t + passes_left(step, total) * t_eval

    def fit(seconds, t):
        return math.floor(max(0.0, seconds - t_eval) / (t + (t_eval / every if every > 0 else 0.0)))

    def replay(estimate, grow):
        spent = spent_at_fix
        total, step, window, events = sched["total_steps"], fixed_at, [], []
        while step < total:
            step += 1
            spent += times.get(step, typical)
            if every > 0 and step % every == 0 and step != total:
                spent += t_eval
            window = (window + [times.get(step, typical)])[-WINDOW:]
            if len(window) < WINDOW or step >= total:
                continue
            t = estimate(window)
            new = total
            if projected(spent, step, t, total) > limit:
                new = max(step + 1, min(total, step + fit(PLANNED * (limit - spent), t)))
            elif grow and projected(spent, step, t, total) < GROW_BELOW * limit:
                new = max(total, step + fit(PLANNED * limit - spent, t))
            if new != total:
                events.append((step, total, new))
                total, window = new, []
        return total, spent + t_eval, events

    print(f"fixed at step {fixed_at}: {sched['total_steps']} steps from {sched['step_seconds']:.3f} s/step")
    for name, estimate in (("mean", lambda w: sum(w) / len(w)), ("median", statistics.median)):
        for grow in (False, True):
            total, spent, events = replay(estimate, grow)
            rule = f"{name}, {'shorten and lengthen' if grow else 'shorten only'}"
            print(f"{rule:<28} {total:6d} steps  {spent:6.1f} s  decisions {events}")


if __name__ == "__main__":
    main()

"""Self time per op of a Chrome trace written by bench_step (FMOE_PROFILE=trace.json).

    python3 tests/bench/profile_summary.py trace.json [--steps N] [--top 25]

Self time = an event's duration less that of the events nested in it on the same
thread; the table is per step when --steps is given.
"""
import argparse
import collections
import json


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    data = json.load(open(args.trace))
    events = data["traceEvents"] if isinstance(data, dict) else data
    spans = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            spans[e.get("tid")].append((float(e["ts"]), float(e["dur"]), e["name"]))
    self_us = collections.Counter()
    calls = collections.Counter()
    total = 0.0
    for tid, items in spans.items():
        items.sort(key=lambda s: (s[0], -s[1]))
        stack = []  # [end, name, child_time]
        def close(until):
            nonlocal total
            while stack and stack[-1][0] <= until:
                end, name, child, dur = stack.pop()
                self_us[name] += dur - child
                if stack:
                    stack[-1][2] += dur
                else:
                    total += dur
        for ts, dur, name in items:
            close(ts)
            calls[name] += 1
            stack.append([ts + dur, name, 0.0, dur])
        close(float("inf"))
    print(f"{'op':<48} {'self ms/step':>12} {'share':>7} {'calls/step':>10}")
    for name, us in self_us.most_common(args.top):
        print(f"{name[:48]:<48} {us / 1e3 / args.steps:12.1f} {100 * us / total:6.1f}% {calls[name] / args.steps:10.0f}")
    print(f"{'total (top-level events)':<48} {total / 1e3 / args.steps:12.1f}")


if __name__ == "__main__":
    main()

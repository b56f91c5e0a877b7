#!/usr/bin/env python3
"""The folders of the project, their size and their include arrows, read from the code.

  scripts/architecture.py            prints the section (a Mermaid picture and a table)
  scripts/architecture.py --write    replaces it in docs/architecture.md (between the layers markers)
  scripts/architecture.py --check    fails when an include points up the layer order, a folder
                                     holds over 25% of the source lines, trainer/ exceeds 4,000,
                                     or the picture's arrows are not the code's

The layer order is the one docs/architecture.md states; the CMake targets follow it.
"""
import pathlib
import re
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Bottom to top: a folder may include only folders before it (and itself).
LAYERS = ["common", "fp8", "data", "parallel", "moe", "config", "checkpoint", "trainer", "plan", "launch"]
SOURCES = (".h", ".cpp", ".cu", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z0-9_]+)/', re.M)
MAX_SHARE = 0.25
MAX_TRAINER_LINES = 4000  # the run, its step, and the optimizers (AdamW, Muon, ZeRO-1)
BEGIN, END = "<!-- layers:begin (scripts/architecture.py --write) -->", "<!-- layers:end -->"


def scan():
    lines, edges = defaultdict(int), defaultdict(int)
    for folder in LAYERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in SOURCES:
                continue
            text = path.read_text(errors="replace")
            lines[folder] += text.count("\n")
            for target in INCLUDE.findall(text):
                if target in LAYERS and target != folder:
                    edges[(folder, target)] += 1
    return lines, edges


def problems(lines, edges):
    out = []
    rank = {f: i for i, f in enumerate(LAYERS)}
    for (a, b), n in sorted(edges.items()):
        if rank[b] > rank[a]:
            out.append(f"{a}/ includes {b}/ ({n} times), a higher layer")
    total = sum(lines.values())
    for folder, n in lines.items():
        if n > MAX_SHARE * total:
            out.append(f"{folder}/ holds {n} of {total} source lines ({100 * n / total:.0f}% > {100 * MAX_SHARE:.0f}%)")
    if lines["trainer"] > MAX_TRAINER_LINES:
        out.append(f"trainer/ holds {lines['trainer']} source lines (> {MAX_TRAINER_LINES})")
    return out


def section(lines, edges):
    total = sum(lines.values())
    out = [BEGIN, "", "```mermaid", "flowchart BT"]
    for folder in LAYERS:
        out.append(f'  {folder}["{folder}/ ({lines[folder]:,} lines)"]')
    for (a, b), n in sorted(edges.items(), key=lambda e: (LAYERS.index(e[0][0]), LAYERS.index(e[0][1]))):
        out.append(f"  {a} --> {b}")
    out += ["```", "", "| layer (top first) | source lines | share | includes |", "|---|---|---|---|"]
    for folder in reversed(LAYERS):
        targets = ", ".join(f"{b} ({n})" for (a, b), n in sorted(edges.items()) if a == folder) or "—"
        out.append(f"| `{folder}/` | {lines[folder]:,} | {100 * lines[folder] / total:.0f}% | {targets} |")
    out += ["", f"{total:,} source lines in all (headers, C++ and CUDA; tests not counted). An arrow is an "
            "`#include` from one folder into another, with how many there are in the table.", "", END]
    return "\n".join(out)


def main():
    lines, edges = scan()
    text = section(lines, edges)
    if "--check" in sys.argv:
        found = problems(lines, edges)
        for p in found:
            print("architecture: " + p, file=sys.stderr)
        # The picture's arrows must be the code's (its line counts are refreshed by --write, not checked).
        arrows = lambda t: sorted(l for l in t.splitlines() if " --> " in l)
        if arrows(text) != arrows((ROOT / "docs/architecture.md").read_text()):
            print("architecture: docs/architecture.md's arrows differ from the code's includes: run scripts/architecture.py --write",
                  file=sys.stderr)
            found.append("stale")
        print(f"architecture: {len(LAYERS)} layers, {sum(edges.values())} includes across folders, {len(found)} problems")
        return 1 if found else 0
    if "--write" in sys.argv:
        path = ROOT / "docs/architecture.md"
        doc = path.read_text()
        if BEGIN in doc:
            doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
        else:
            raise SystemExit("docs/architecture.md has no layers markers")
        path.write_text(doc)
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

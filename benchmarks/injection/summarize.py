"""Summarise calibration results: per grid point and kind of edit, edits within 4 px of the source's path (a
collapsed frame counts as a miss), edit accuracy and collapsed frames.

    python benchmarks/injection/summarize.py benchmarks/injection/results/calibration-*.json
"""
from __future__ import annotations

import json
import sys

import numpy as np

KINDS = ("color", "shape", "background")


def main(paths) -> int:
    rows = [r for p in paths for r in json.loads(open(p).read())["rows"]]
    point = lambda r: (r.get("strength", 1.0), r["features"], r["attention"])  # noqa: E731 (older files: strength 1)
    points = sorted({point(r) for r in rows}, reverse=True)
    print("| strength | features | attention | n | within 4 px: colour / shape / background | edit acc: colour / shape / "
          "background | collapsed frames |")
    print("|---|---|---|---|---|---|---|")
    for s, f, a in points:
        sel = [r for r in rows if point(r) == (s, f, a)]
        n = len(sel) // len(KINDS)
        within = " / ".join(f"{sum(r['mean_err'] <= 4 for r in sel if r['kind'] == k)}/{n}" for k in KINDS)
        acc = " / ".join(f"{np.mean([r['edit_acc'] for r in sel if r['kind'] == k]):.2f}" for k in KINDS)
        collapsed = sum(r["collapsed"] for r in sel)
        print(f"| {s:.2f} | {f:.1f} | {a:.1f} | {n} | {within} | {acc} | {collapsed}/{len(sel) * 8} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

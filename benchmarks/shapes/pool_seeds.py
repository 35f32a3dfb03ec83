"""Pool the results.csv of several `ei2 bench` runs (e.g. one seed each) into one set of tables.

    python benchmarks/shapes/pool_seeds.py benchmarks/shapes/results-edit-defaults/results.csv \
        outputs/bench-edit-defaults-seed1/results.csv [--paired A B]

Prints the per-recipe table, edit accuracy and path kept per kind of edit, and the paired differences A − B
over matched (video, seed, edit), with the benchmark report's own functions (`ei2.bench.report`), then the same
differences averaged over the seeds of each edit first (n = edits: the honest interval when seeds share videos).
"""
from __future__ import annotations

import argparse
import csv

import numpy as np

from ei2.bench.report import COLUMNS, kind_table, mean_ci, metric_keys, paired_table, recipe_table


def _value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def read_rows(paths: list[str]) -> list[dict]:
    rows, seen = [], set()
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                r = {k: (_value(v) if v != "" else None) for k, v in row.items()}
                r["seed"], r["edit"] = int(r["seed"]), int(r["edit"])
                key = (r["video"], r["recipe"], r["seed"], r["edit"])
                if key in seen:
                    raise SystemExit(f"{path}: {key} is in two of the files; pool runs of different seeds")
                seen.add(key)
                rows.append(r)
    return rows


def per_edit_paired(rows: list[dict], a: str, b: str, keys: list[str]) -> str:
    """a − b averaged over the seeds of each (video, edit) first: the seeds of one edit share its video and prompt,
    so they are not independent samples; n is the number of edits."""
    base = {(x["video"], x["seed"], x["edit"]): x for x in rows if x["recipe"] == b}
    lines = ["| a − b, seeds averaged per edit | n | " + " | ".join(f"Δ {COLUMNS[k][0]}" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    per: dict[tuple, list] = {}
    for x in rows:
        y = base.get((x["video"], x["seed"], x["edit"]))
        if x["recipe"] == a and y is not None:
            per.setdefault((x["video"], x["edit"]), []).append((x, y))
    cells = []
    for k in keys:
        means = [np.mean(d) for d in ([p[k] - q[k] for p, q in v if p.get(k) is not None and q.get(k) is not None]
                                      for v in per.values()) if d]
        m, h, _ = mean_ci(means)
        cells.append(f"{m:+.4f} ± {h:.4f}" + (" *" if np.isfinite(h) and abs(m) > h else ""))
    lines.append(f"| {a} − {b} | {len(per)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--paired", nargs=2, metavar=("A", "B"), default=["ei2-edit-defaults", "tune-a-video-edit-defaults"])
    args = ap.parse_args(argv)
    rows = read_rows(args.csv)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    keys = [k for k in metric_keys(rows) if k not in ("tune_s", "edit_s", "job_s", "cpu_s")]
    print(f"seeds {sorted({r['seed'] for r in rows})}, {len(rows)} edits\n")
    print(recipe_table(rows, recipes, keys), "\n")
    for key in ("edit_acc", "path_kept", "collapsed"):
        print(f"{key} by kind\n" + kind_table(rows, recipes, key), "\n")
    print(paired_table(rows, [("paired", *args.paired)], keys), "\n")
    print(per_edit_paired(rows, *args.paired, keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark column ei2-edit-defaults+canny, finished jobs so far, against ei2-edit-defaults on the same (video, seed, edit).

    python benchmarks/control/partial_bench.py benchmarks/control/results/bench-partial
"""
import json, glob, csv, sys
import numpy as np
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    r = json.load(open(f))
    for e in r["edits"]:
        rows.append((r["video"], r["seed"], e["kind"], e["metrics"]))
base = {}
for p in ["benchmarks/shapes/results-edit-defaults/results.csv", "benchmarks/shapes/results-edit-defaults-seeds/results-seed1.csv"]:
    for r in csv.DictReader(open(p)):
        if r["recipe"] == "ei2-edit-defaults":
            base[(r["video"], int(r["seed"]), r["kind"])] = r
print("jobs (video, seed):", len({(v, s) for v, s, _, _ in rows}))
for kind in ("color", "shape", "background"):
    sel = [(v, s, m) for v, s, k, m in rows if k == kind]
    b = [base.get((v, s, kind)) for v, s, _ in sel]
    ok = [x for x in b if x is not None]
    print(f"{kind:10s} canny: path kept {sum(m['path_kept'] for _,_,m in sel):.0f}/{len(sel)}, edit acc {np.mean([m['edit_acc'] for _,_,m in sel]):.2f}, collapsed {np.mean([m['collapsed'] for _,_,m in sel]):.3f}"
          f" | defaults on the same edits: path kept {sum(float(x['path_kept']) for x in ok):.0f}/{len(ok)}, edit acc {np.mean([float(x['edit_acc']) for x in ok]):.2f}, collapsed {np.mean([float(x['collapsed']) for x in ok]):.3f}")

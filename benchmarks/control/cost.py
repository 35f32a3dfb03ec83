"""What a structure condition costs (issue 26): a controlled edit's time against the same edit without it.

    OMP_NUM_THREADS=1 python benchmarks/control/cost.py --repeats 3 --out benchmarks/control/results/cost.json

`ei2 edit` on the bundled demo sample with the Shapes model, untuned (`--steps 0`), 25 DDIM steps, one target,
strength 1.0 and no injection in both runs (the only difference is `--control canny`), alternated `--repeats`
times so that a busy machine slows both alike. The number is run.json's `timings.edit_s` (the sampling of the
edit, decoding included) and `timings.invert_s` (the inversion, the condition on in it as `ei2 edit` has it).
Prints the medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "assets" / "samples" / "red_circle_right.mp4"
SOURCE = "a red circle moving right on a gray background"
TARGET = "a red circle moving right on a white background"


def one(control: bool, root: Path, k: int, kind: str = "canny") -> dict:
    from ei2.cli import main

    out = root / f"{'control' if control else 'plain'}-{k}"
    argv = ["edit", str(SAMPLE), "--source-prompt", SOURCE, "--target-prompt", TARGET, "--steps", "0",
            "--strength", "1.0", "--inject-features", "0", "--inject-attention", "0", "--device", "cpu",
            "--quiet", "--out", str(out)] + (["--control", kind] if control else [])
    if main(argv) != 0:
        raise SystemExit(f"ei2 {' '.join(argv)} failed")
    return json.loads((out / "run.json").read_text())["timings"]


def main(argv=None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--control", default="canny", help="the bundled condition kind to time (canny, layout)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "control" / "results" / "cost.json"))
    args = ap.parse_args(argv)
    rows = {"plain": [], "control": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EI2_CACHE_DIR"] = str(Path(tmp) / "cache")  # every run inverts for itself
        for k in range(args.repeats):
            for name in ("plain", "control"):
                os.environ["EI2_CACHE_DIR"] = str(Path(tmp) / f"cache-{name}-{k}")
                rows[name].append(one(name == "control", Path(tmp), k, args.control))
    for runs in rows.values():  # one target prompt: its edit's seconds
        for r in runs:
            r["edit_s"] = r["edit_s"][0] if isinstance(r["edit_s"], list) else r["edit_s"]
    med = {name: {key: statistics.median(r[key] for r in runs) for key in ("edit_s", "invert_s")}
           for name, runs in rows.items()}
    ratio = {key: med["control"][key] / med["plain"][key] for key in ("edit_s", "invert_s")}
    result = {"control": args.control, "repeats": args.repeats, "median": med, "ratio": ratio, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"edit: {med['plain']['edit_s']:.2f} s plain, {med['control']['edit_s']:.2f} s with {args.control} "
          f"({ratio['edit_s']:.2f}x); inversion {ratio['invert_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of structure-preserving injection per edit: time and peak memory against a plain edit (Shapes, CPU).

    python benchmarks/injection/cost.py --repeats 3

Each configuration runs in a fresh subprocess (so the peak resident memory, ru_maxrss, is its own): load the
Shapes model, invert the bundled `red_circle_right` sample once (not timed), then time `--repeats` edits of
one target prompt. Injection denoises the source branch beside the target (unguided, one entry, and only until
its last injecting step: issue 18), the plain edit denoises the target alone. Each configuration is timed at
strength 1.0 and at the Shapes defaults' strength 0.6 (the injection fractions count the steps that run), each
against the plain edit at its own strength.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {"plain": (0.0, 0.0), "features 0.5": (0.5, 0.0), "features 0.5 + attention 0.5": (0.5, 0.5)}
STRENGTHS = (1.0, 0.6)


def one(features: float, attention: float, steps: int, repeats: int, strength: float = 1.0) -> dict:
    import torch

    from ei2.control import InjectionConfig
    from ei2.pipeline import EI2Pipeline
    from ei2.shapes.samples import sample_video

    torch.set_num_threads(1)
    frames, truth = sample_video("red_circle_right")
    pipe = EI2Pipeline.from_pretrained(None, recipe="ei2", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pipe.invert(frames, truth.caption, num_inference_steps=steps, strength=strength)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pipe.edit(frames, truth.caption, "a blue circle moving right on a gray background", num_inference_steps=steps,
                  guidance_scale=7.5, injection=InjectionConfig(features, attention), strength=strength)
        times.append(time.perf_counter() - t)
    return {"edit_s": min(times), "edit_s_all": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loaded_rss_mb": rss_loaded / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strengths", nargs="*", type=float, default=list(STRENGTHS))
    ap.add_argument("--one", nargs=3, type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one[:2], args.steps, args.repeats, strength=args.one[2])))
        return 0
    print(f"| strength | configuration | edit (s, best of {args.repeats}, 1 thread) | × plain | peak RSS (MB) | "
          "RSS after load (MB) |")
    print("|---|---|---|---|---|---|")
    for strength in args.strengths:
        base = None
        for name, (f, a) in CONFIGS.items():
            out = subprocess.run([sys.executable, __file__, "--one", str(f), str(a), str(strength), "--steps",
                                  str(args.steps), "--repeats", str(args.repeats)], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r["edit_s"]
            print(f"| {strength:g} | {name} | {r['edit_s']:.2f} | {r['edit_s'] / base:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['loaded_rss_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

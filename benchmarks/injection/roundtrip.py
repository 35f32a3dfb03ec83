"""Round trip of the calibration videos: invert, then sample again under the source prompt, untuned.

    python benchmarks/injection/roundtrip.py [--model M] [--videos 8]

For each calibration video (`calibrate.calibration_videos`, seeds from 100) and each edit strength and guidance
scale, the mean absolute pixel error of the reconstruction against the source (0-255), the mean centre error
of the object against the renderer's ground truth (inf where a frame has no object) and the collapsed frames.
Guidance 1 is the exact reverse of the (unguided) inversion; guidance 7.5 is what an edit's target runs with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from calibrate import calibration_videos, frame_errors  # noqa: E402

from ei2.pipeline import EI2Pipeline  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled Shapes model)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.6])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5])
    args = ap.parse_args(argv)
    totals: dict[tuple[float, float], list] = {}
    for video in calibration_videos(args.videos):
        pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        row = [video["name"][:28].ljust(28)]
        for s in args.strengths:
            for g in args.guidance:
                out = pipe.edit(video["frames"], video["source"], [video["source"]], num_inference_steps=25,
                                guidance_scale=g, strength=s)
                l1 = float(np.abs(out.frames[0].astype(np.float32) - video["frames"].astype(np.float32)).mean())
                err = frame_errors(out.frames[0], video["centres"])
                totals.setdefault((s, g), []).append((l1, int(np.isinf(err).sum())))
                row.append(f"s{s} g{g}: L1 {l1:5.1f} centre {np.mean(err):5.1f} collapsed {int(np.isinf(err).sum())}")
        print(" | ".join(row), flush=True)
    print("\n| strength | guidance | mean L1 (0-255) | collapsed frames |\n|---|---|---|---|")
    for (s, g), v in totals.items():
        print(f"| {s:.1f} | {g:g} | {np.mean([x[0] for x in v]):.2f} | {sum(x[1] for x in v)}/{8 * len(v)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time per frame of a whole windowed edit (`EI2Pipeline.__call__`: UNet, DDIM, VAE decode), frame counts
interleaved in one process, so that a slow spell of a shared machine hits every count alike (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/windows/edit_per_frame.py --frames 16 128 --repeats 2

The Shapes model, windows of 8 with 3 anchors (`ei2 edit --window 8`), the video of `bench_windows.py`
(a red circle going right and back), inverted once per count (not timed), then edited plain (strength 1,
no injection) into a blue circle with `--steps` DDIM steps at guidance 7.5. Per edit: seconds per frame in
all, in the windowed UNet, in the VAE decode, and the rest.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    import ei2.windows as windows
    from bench_windows import scene_video
    from ei2.pipeline import EI2Pipeline

    pipe = EI2Pipeline.from_pretrained(None, recipe="ei2", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_windowing(8, anchors=3)
    spent = {"unet": 0.0, "decode": 0.0}
    call, decode = windows.WindowedUNet.__call__, pipe.decode_latents

    def timed_call(self, *a, **k):
        t = time.perf_counter()
        out = call(self, *a, **k)
        spent["unet"] += time.perf_counter() - t
        return out

    def timed_decode(*a, **k):
        t = time.perf_counter()
        out = decode(*a, **k)
        spent["decode"] += time.perf_counter() - t
        return out

    windows.WindowedUNet.__call__ = timed_call
    pipe.decode_latents = timed_decode
    inverted = {}
    for f in args.frames:
        frames, _ = scene_video(f)
        inverted[f] = pipe.invert(latents=pipe.encode_frames(frames), prompt="a red circle on a gray background",
                                  num_inference_steps=args.steps)
    print("| repeat | frames | s / frame | UNet s / frame | decode s / frame | rest s / frame |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in range(args.repeats):
        for f in args.frames:
            spent.update(unet=0.0, decode=0.0)
            t = time.perf_counter()
            pipe("a blue circle on a gray background", latents=inverted[f], num_inference_steps=args.steps,
                 guidance_scale=7.5)
            total = time.perf_counter() - t
            rest = total - spent["unet"] - spent["decode"]
            print(f"| {r + 1} | {f} | {total / f:.4f} | {spent['unet'] / f:.4f} | {spent['decode'] / f:.4f} | "
                  f"{rest / f:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())

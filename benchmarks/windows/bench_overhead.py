"""Per-window overhead of the windowed UNet: time per frame of one guided UNet evaluation at 16 and 128 frames.

    OMP_NUM_THREADS=1 python benchmarks/windows/bench_overhead.py --frames 16 128 --batch 1 2 4 --repeats 5

The bundled Shapes model (`ei2` recipe), windows of 8 (stride 4, 3 anchors), one DDIM step's worth of UNet
work on guided latents (batch 2: unconditional + conditional), in one process, the frame counts interleaved
per repeat. `frame-passes / frame` is what the windows cost by construction ((8 * windows + anchors) / frames);
`s / frame-pass` is the time per frame the UNet actually sees, which is flat when nothing else costs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from ei2.pipeline import EI2Pipeline
    from ei2.windows import Windowing, WindowedUNet

    pipe = EI2Pipeline.from_pretrained(None, recipe="ei2", device="cpu", dtype="fp32")
    unet = pipe.unet
    size = unet.unet.config.sample_size
    text = torch.cat([pipe.encode_prompt(""), pipe.encode_prompt("a red circle moving right on a gray background")])
    times = {(f, b): [] for f in args.frames for b in args.batch}
    samples = {f: torch.randn(2, 4, f, size, size, generator=torch.Generator().manual_seed(f)) for f in args.frames}
    with torch.no_grad():
        for r in range(args.repeats + 1):  # the first round warms up
            for f in args.frames:
                for b in args.batch:
                    windowed = WindowedUNet(unet, Windowing(args.window, None, 3, b), f)
                    t = time.perf_counter()
                    windowed(samples[f], 500, text)
                    if r:
                        times[(f, b)].append(time.perf_counter() - t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), latents {size}x{size}, window {args.window}")
    print("| frames | windows per call | windows | frame-passes / frame | s / step | s / frame | s / frame-pass |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for f in args.frames:
        for b in args.batch:
            w = WindowedUNet(unet, Windowing(args.window, None, 3, b), f)
            passes = (args.window * len(w.starts) + len(w.anchors)) / f
            s = statistics.median(times[(f, b)])
            print(f"| {f} | {b} | {len(w.starts)} | {passes:.2f} | {s:.3f} | {s / f:.4f} | {s / f / passes:.4f} |")
            base.setdefault(b, {})[f] = s / f
    lo, hi = min(args.frames), max(args.frames)
    for b in args.batch:
        print(f"windows per call {b}: time per frame at {hi} frames / at {lo} frames = {base[b][hi] / base[b][lo]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

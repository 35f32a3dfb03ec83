"""Calibrate structure-preserving injection on Shapes videos that the Shapes benchmark does not contain.

    python benchmarks/injection/calibrate.py --out benchmarks/injection/results/calibration.json \
        --grid 0:0 0.3:0 0.5:0 0.5:0.5 0.6:0.3:0.6 --videos 8

For each calibration video (rendered with seeds the benchmark does not use, all 8 motions), tune the
`--recipe` once with the Shapes defaults, invert it once, then edit it three ways (colour, shape,
background swapped) under every grid point `FEATURES:ATTENTION[:STRENGTH]` (fractions of the steps that
run; edit strength, default 1). The three edits share one source branch (one batch); every strength
samples from the one cached inversion trajectory. The oracle reads every frame: centre error against the renderer's
ground truth (a frame with no object counts as a miss), and the edited attribute. Prints one table row
per grid point and writes every number to `--out`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ei2.control import InjectionConfig
from ei2.metrics.oracle import oracle_metrics
from ei2.pipeline import EI2Pipeline
from ei2.shapes.oracle import read_frames
from ei2.shapes.world import BACKGROUND_NAMES, COLOR_NAMES, MOTIONS, SHAPES, caption, render, video_scenes

WITHIN_PX = 4.0


def calibration_videos(n: int, seed0: int = 100):
    """n videos over all motions, random colour/shape/background, seeds from `seed0` (the benchmark uses 1-12)."""
    rng = np.random.default_rng(seed0)
    motions = list(MOTIONS)
    out = []
    for k in range(n):
        motion = motions[k % len(motions)]
        c, s, b = int(rng.integers(len(COLOR_NAMES))), int(rng.integers(len(SHAPES))), int(rng.integers(len(BACKGROUND_NAMES)))
        scenes = video_scenes(motion, 8, c, s, b, seed=seed0 + k)
        c2 = int((c + 1 + rng.integers(len(COLOR_NAMES) - 1)) % len(COLOR_NAMES))
        s2 = int((s + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES))
        b2 = int((b + 1 + rng.integers(len(BACKGROUND_NAMES) - 1)) % len(BACKGROUND_NAMES))
        name = lambda cc, ss, bb: caption(COLOR_NAMES[cc], SHAPES[ss], BACKGROUND_NAMES[bb], motion)  # noqa: E731
        out.append({
            "name": f"{COLOR_NAMES[c]}-{SHAPES[s]}-{motion}-s{seed0 + k}",
            "frames": render(scenes), "centres": np.stack([scenes.cx, scenes.cy], 1),
            "source": name(c, s, b),
            "edits": {"color": name(c2, s, b), "shape": name(c, s2, b), "background": name(c, s, b2)},
        })
    return out


def frame_errors(frames: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Centre error per frame in pixels; inf where the oracle finds no object (a collapsed frame)."""
    r = read_frames(frames)
    d = np.hypot(r.cx - centres[:, 0], r.cy - centres[:, 1])
    return np.where(r.found, d, np.inf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", nargs="+", default=["0:0", "0.5:0", "0.5:0.5"])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--recipe", default="ei2")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--guidance-rescale", type=float, default=0.0)
    ap.add_argument("--guidance-rescale-std", default="video", choices=["video", "frame"])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled Shapes model)")
    ap.add_argument("--seed0", type=int, default=100, help="seed of the first video (the benchmark uses 1-12)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--frames-out", default=None, help="also keep every edited video in this .npz")
    args = ap.parse_args(argv)
    grid = [tuple(float(v) for v in g.split(":")) for g in args.grid]
    grid = [g if len(g) == 3 else (*g, 1.0) for g in grid]
    rows, kept = [], {}
    for video in calibration_videos(args.videos, args.seed0):
        t = time.perf_counter()
        pipe = EI2Pipeline.from_pretrained(args.model, recipe=args.recipe, device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        latents = pipe.encode_frames(video["frames"])
        torch.manual_seed(0)
        if args.steps:
            kw = {} if args.lr is None else {"learning_rate": args.lr}
            pipe.tune(latents=latents, source_prompt=video["source"], steps=args.steps, seed=0, **kw)
        tune_s = time.perf_counter() - t
        kinds = list(video["edits"])
        prompts = [video["edits"][k] for k in kinds]
        for features, attention, strength in grid:
            t = time.perf_counter()
            out = pipe.edit(video["frames"], video["source"], prompts, num_inference_steps=args.inference_steps,
                            guidance_scale=args.guidance_scale, strength=strength,
                            guidance_rescale=args.guidance_rescale, guidance_rescale_std=args.guidance_rescale_std,
                            injection=InjectionConfig(features, attention, args.block))
            edit_s = time.perf_counter() - t
            for kind, prompt, frames in zip(kinds, prompts, out.frames):
                kept[f"{video['name']}|{kind}|{features}|{attention}|{strength}"] = frames
                err = frame_errors(frames, video["centres"])
                m = oracle_metrics(frames, prompt, source=video["source"], source_centres=video["centres"])
                rows.append({"video": video["name"], "kind": kind, "features": features, "attention": attention,
                             "strength": strength,
                             "mean_err": float(err.mean()), "max_err": float(err.max()),
                             "collapsed": int(np.isinf(err).sum()),
                             "collapsed_frames": [int(i) for i in np.flatnonzero(np.isinf(err))], "edit_acc": m.get("edit_acc"),
                             "keep_acc": m.get("keep_acc"), "edit_s": edit_s, "tune_s": tune_s})
            if args.out:  # after every video and grid point, so an interrupted run keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
            r = rows[-3:]
            print(f"{video['name']:32s} f={features:.2f} a={attention:.2f} s={strength:.2f} "
                  + " ".join(f"{x['kind'][:3]}:{x['mean_err']:5.1f}px/{x['edit_acc']:.2f}" for x in r)
                  + f"  ({edit_s:.1f} s)", flush=True)
    print("\nfeatures attention strength | within 4px: color shape background | edit acc: color shape background | collapsed")
    for features, attention, strength in grid:
        sel = [r for r in rows if (r["features"], r["attention"], r["strength"]) == (features, attention, strength)]
        within = {k: sum(r["mean_err"] <= WITHIN_PX for r in sel if r["kind"] == k) for k in ("color", "shape", "background")}
        acc = {k: np.mean([r["edit_acc"] for r in sel if r["kind"] == k]) for k in ("color", "shape", "background")}
        n = len(sel) // 3
        print(f"{features:8.2f} {attention:9.2f} {strength:8.2f} | {within['color']:2d}/{n} {within['shape']:2d}/{n} {within['background']:2d}/{n}"
              f" | {acc['color']:.3f} {acc['shape']:.3f} {acc['background']:.3f} | {sum(r['collapsed'] for r in sel)}")
    if args.frames_out:
        np.savez_compressed(args.frames_out, **kept)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

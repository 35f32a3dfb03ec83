"""Calibrate the structure condition (issue 26) on Shapes videos the Shapes benchmark does not contain.

    python benchmarks/control/calibrate.py --controlnet assets/shapes-sd/controlnet-canny --condition canny \
        --out benchmarks/control/results/calibration-canny.json --videos 8
    python benchmarks/control/calibrate.py --summary benchmarks/control/results/calibration-canny.json

The calibration videos of `benchmarks/injection/calibrate.py` (seeds from 100, all 8 motions; the benchmark uses
1-12), each edited three ways (colour, shape, background swapped), 25 DDIM steps, guidance 7.5 (the Shapes
defaults), tuned `--steps` (default 0: untuned, as `benchmarks/shapes/drift.py`) with the recipe `ei2`. Variants
(`VARIANTS`): today's plain defaults (strength 0.6, injection 0.5/0.5) without a condition, then the condition at
strengths 0.6 / 0.8 / 1.0, with and without injection, scales 0.5 / 1.5, a window, and with the condition off
during inversion. With `--steps N`, the variants named `*tuned with*` tune under the condition (the others tune
without it). Per edit the oracle reads every frame: the centre error against the renderer (path kept: mean
<= 4 px; a frame without an object is collapsed), and the edited attribute (edit accuracy). The edit's seconds are
timed too (condition vs none: the cost).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "injection"))
from calibrate import calibration_videos, frame_errors  # noqa: E402  (the injection calibration's videos)

KINDS = ("color", "shape", "background")
STEPS, GUIDANCE, WITHIN_PX = 25, 7.5, 4.0
# name: strength, injection (features, attention), condition scale (None: no condition), window, inversion
VARIANTS: dict[str, dict] = {
    "defaults, no condition (s0.6, inject 0.5/0.5)": dict(strength=0.6, inject=(0.5, 0.5), scale=None),
    "s1.0 plain, no condition": dict(strength=1.0, inject=(0.0, 0.0), scale=None),
    "cond, s0.6, inject 0.5/0.5": dict(strength=0.6, inject=(0.5, 0.5), scale=1.0),
    "cond, s0.6": dict(strength=0.6, inject=(0.0, 0.0), scale=1.0),
    "cond, s0.8": dict(strength=0.8, inject=(0.0, 0.0), scale=1.0),
    "cond, s1.0": dict(strength=1.0, inject=(0.0, 0.0), scale=1.0),
    "cond, s1.0, inject 0.5/0.5": dict(strength=1.0, inject=(0.5, 0.5), scale=1.0),
    "cond, s1.0, scale 0.5": dict(strength=1.0, inject=(0.0, 0.0), scale=0.5),
    "cond, s1.0, scale 1.5": dict(strength=1.0, inject=(0.0, 0.0), scale=1.5),
    "cond, s1.0, window 0-0.6": dict(strength=1.0, inject=(0.0, 0.0), scale=1.0, end=0.6),
    "cond, s1.0, guess mode": dict(strength=1.0, inject=(0.0, 0.0), scale=1.0, guess_mode=True),
    "cond, s1.0, off in inversion": dict(strength=1.0, inject=(0.0, 0.0), scale=1.0, inversion=False),
    "cond, s0.8, off in inversion": dict(strength=0.8, inject=(0.0, 0.0), scale=1.0, inversion=False),
}


def edit(pipe, frames, source, prompts, v, control):
    from ei2.control import InjectionConfig

    injection = InjectionConfig(*v["inject"]) if any(v["inject"]) else None
    cond = None
    if v["scale"] is not None:
        cond = type(control).make(list(control.nets), control.maps, v["scale"], 0.0, v.get("end", 1.0),
                                  guess_mode=v.get("guess_mode", False))
    t = time.perf_counter()
    out = pipe.edit(frames, source, prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    strength=v["strength"], injection=injection, control=cond,
                    control_inversion=v.get("inversion", True)).frames
    return out, time.perf_counter() - t


def run(args) -> None:
    from ei2.metrics.oracle import oracle_metrics
    from ei2.pipeline import EI2Pipeline
    from ei2.structure import build_control

    torch.set_num_threads(args.threads)
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    rows, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for video in calibration_videos(args.videos, args.seed0):
        frames, centres = video["frames"], video["centres"]
        pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        control, _ = build_control(frames, [args.condition], [args.controlnet], [1.0], 0.0, 1.0, pipe.unet.unet.config)
        latents = pipe.encode_frames(frames)
        base = {n: p.detach().clone() for n, p in pipe.unet.trainable_parameters()}
        tuned_with = None
        for name, v in variants.items():
            with_cond = args.steps and v["scale"] is not None and args.tune_with_condition
            if args.steps and tuned_with != with_cond:  # tune from the same start, with or without the condition
                with torch.no_grad():
                    for n, p in pipe.unet.trainable_parameters():
                        p.copy_(base[n])
                torch.manual_seed(0)
                pipe.tune(latents=latents, source_prompt=video["source"], steps=args.steps, seed=0,
                          control=control if with_cond else None)
                tuned_with = with_cond
            prompts = [video["edits"][k] for k in KINDS]
            edited, seconds = edit(pipe, frames, video["source"], prompts, v, control)
            for kind, prompt, e in zip(KINDS, prompts, edited):
                err = frame_errors(e, centres)
                m = oracle_metrics(e, prompt, source=video["source"], source_centres=centres)
                rows.append({"video": video["name"], "kind": kind, "variant": name, "mean_err": float(err.mean()),
                             "collapsed": int(np.isinf(err).sum()), "edit_acc": m.get("edit_acc"),
                             "seconds": seconds / len(prompts)})
            r = rows[-3:]
            print(f"{video['name']:30s} {name:44s} " + " ".join(f"{x['kind'][:3]}:{x['mean_err']:5.1f}px" for x in r)
                  + f" ({seconds:.0f} s)", flush=True)
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def summary(paths) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print("| variant | path kept: colour / shape / background | edit acc: colour / shape / background | collapsed "
          "frames | s per edit |")
    print("|---|---|---|---|---|")
    for name in names:
        sel = [r for r in rows if r["variant"] == name]
        kept = {k: [r["mean_err"] <= WITHIN_PX for r in sel if r["kind"] == k] for k in KINDS}
        acc = {k: [r["edit_acc"] for r in sel if r["kind"] == k and r["edit_acc"] is not None] for k in KINDS}
        print(f"| {name} | " + " / ".join(f"{sum(kept[k])}/{len(kept[k])}" for k in KINDS) + " | "
              + " / ".join(f"{np.mean(acc[k]):.2f}" if acc[k] else "-" for k in KINDS)
              + f" | {sum(r['collapsed'] for r in sel)}/{8 * len(sel)} | {np.mean([r['seconds'] for r in sel]):.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controlnet", default=str(REPO / "assets" / "shapes-sd" / "controlnet-canny"))
    ap.add_argument("--condition", default="canny")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled Shapes model)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seed0", type=int, default=100, help="seed of the first video (the benchmark uses 1-12)")
    ap.add_argument("--steps", type=int, default=0, help="tuning steps per video (0: untuned)")
    ap.add_argument("--tune-with-condition", action="store_true",
                    help="with --steps: the variants with a condition tune under it")
    ap.add_argument("--variants", nargs="*", help="names of VARIANTS to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "control" / "results" / "calibration.json"))
    ap.add_argument("--summary", nargs="*", help="print the table of these result files and exit")
    args = ap.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ablation of issue 19 on the Shapes benchmark's 12 videos: edit strength, rescaled guidance, noise
regularisation and injection, each with and without one-shot tuning, at the Shapes defaults.

    python benchmarks/shapes/ablation.py --out benchmarks/shapes/results-issue19/ablation-v1.json
    python benchmarks/shapes/ablation.py --summary benchmarks/shapes/results-issue19/ablation-v1.json

Every video of `--spec` is tuned once (the `ei2` recipe, the Shapes defaults: 100 steps at lr 3e-5; seed 0)
and also edited untuned (the `UNTUNED` variants); each variant edits it three ways (colour, shape, background) in one call of
`EI2Pipeline.edit` (the three share one source branch; the inversion trajectory is computed once per
noise regularisation and reused by every strength). The metrics are the benchmark's (`evaluate_edits`:
oracle path kept / edit accuracy / collapsed frames against the renderer's ground truth, CLIP Tex-Ali and
Tem-Con, warp error). Results are written after every video, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
KINDS = ("color", "shape", "background")
# name: (strength, injected features, injected attention, guidance_rescale, its std, noise regularisation);
# "inject0.5": features 0.5 / attention 0.5, "inject0.3": features 0.3 / attention 0.5
VARIANTS = {
    "s1.0 inject0.5": (1.0, 0.5, 0.5, 0.0, "video", False),  # the defaults before issue 19
    "s1.0 plain": (1.0, 0.0, 0.0, 0.0, "video", False),
    "s0.8 inject0.5": (0.8, 0.5, 0.5, 0.0, "video", False),
    "s0.6 inject0.5": (0.6, 0.5, 0.5, 0.0, "video", False),
    "s0.6 inject0.3": (0.6, 0.3, 0.5, 0.0, "video", False),  # calibrated (benchmarks/injection/RESULTS.md)
    "s0.6 plain": (0.6, 0.0, 0.0, 0.0, "video", False),
    "s0.6 inject0.3 rescale-video": (0.6, 0.3, 0.5, 0.7, "video", False),
    "s0.6 inject0.5 rescale-video": (0.6, 0.5, 0.5, 0.7, "video", False),  # rescaled guidance at the shipped setting
    "s0.6 inject0.3 rescale-frame": (0.6, 0.3, 0.5, 0.7, "frame", False),
    "s0.6 inject0.3 noise-reg": (0.6, 0.3, 0.5, 0.0, "video", True),
    "s1.0 inject0.5 noise-reg": (1.0, 0.5, 0.5, 0.0, "video", True),
}
UNTUNED = ("s1.0 inject0.5", "s1.0 plain", "s0.6 inject0.3", "s0.6 plain")  # the variants also run untuned


def run(args) -> None:
    from ei2.bench.spec import load_spec
    from ei2.control import InjectionConfig
    from ei2.inversion import NoiseRegularization
    from ei2.metrics.clip import ClipScorer
    from ei2.metrics.evaluate import evaluate_edits
    from ei2.pipeline import EI2Pipeline

    spec = load_spec(args.spec)
    videos = [v for v in spec.videos if not args.videos or v.name in args.videos]
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    scorer = ClipScorer(spec.clip_model, device="cpu")
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for video in videos:
        for tuned in {"both": (True, False), "tuned": (True,), "untuned": (False,)}[args.tuning]:
            t0 = time.perf_counter()
            pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
            pipe.set_progress_bar_config(disable=True)
            settings = {"frames": 8, "stride": 1, "start": 0}
            frames, centres, _ = video.load(settings, pipe.default_size)
            latents = pipe.encode_frames(frames)
            torch.manual_seed(0)
            if tuned:
                pipe.tune(latents=latents, source_prompt=video.source_prompt, steps=args.steps, learning_rate=args.lr,
                          seed=0, gradient_checkpointing=False)
            tune_s = time.perf_counter() - t0
            prompts = [e.prompt for e in video.edits]
            for name, (strength, features, attention, rescale, std, noise_reg) in variants.items():
                if not tuned and name not in (UNTUNED if args.untuned is None else args.untuned):
                    continue
                t = time.perf_counter()
                pipe.set_noise_regularization(NoiseRegularization() if noise_reg else None)
                result = pipe.edit(frames, video.source_prompt, prompts, num_inference_steps=args.inference_steps,
                                   guidance_scale=args.guidance_scale, strength=strength, guidance_rescale=rescale,
                                   guidance_rescale_std=std, injection=InjectionConfig(features, attention, 1))
                edit_s = time.perf_counter() - t
                metrics = evaluate_edits(list(zip(prompts, result.frames)), frames, video.source_prompt,
                                         spec.metrics, scorer, source_centres=centres)
                for edit, m in zip(video.edits, metrics):
                    rows.append({"video": video.name, "kind": edit.kind, "variant": name, "tuned": tuned,
                                 "edit_s": round(edit_s, 2), "tune_s": round(tune_s, 2), **m})
                print(f"{video.name:26s} {'tuned' if tuned else 'untuned':7s} {name:28s} "
                      + " ".join(f"{e.kind[:3]}:{'ok' if m.get('path_kept') else '--'}/{m.get('edit_acc', 0):.2f}"
                                 f"/{m.get('collapsed', 0):.2f}" for e, m in zip(video.edits, metrics))
                      + f" ({edit_s:.0f} s)", flush=True)
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def summary(paths) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    rows = list({(r["video"], r["kind"], r["variant"], r["tuned"]): r for r in rows}.values())  # a rerun: the last
    print("| tuning | variant | n | path kept: colour / shape / background | edit acc: colour / shape / background "
          "| collapsed frames | Tex-Ali | Tem-Con | warp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tuned in (True, False):
        for name in VARIANTS:
            sel = [r for r in rows if r["variant"] == name and r["tuned"] == tuned]
            if not sel:
                continue
            n = len(sel) // len(KINDS)
            kept = " / ".join(f"{sum(bool(r.get('path_kept')) for r in sel if r['kind'] == k)}/{n}" for k in KINDS)
            acc = " / ".join(f"{np.mean([r['edit_acc'] for r in sel if r['kind'] == k]):.2f}" for k in KINDS)
            mean = lambda key: np.mean([r[key] for r in sel if r.get(key) is not None])  # noqa: E731
            print(f"| {'tuned' if tuned else 'untuned'} | {name} | {n} | {kept} | {acc} | "
                  f"{100 * mean('collapsed'):.1f}% | {mean('tex_ali'):.2f} | {mean('tem_con'):.4f} | "
                  f"{mean('warp_err'):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(REPO / "benchmarks" / "shapes" / "spec.yaml"))
    ap.add_argument("--model", default=None, help="model folder (default: the bundled Shapes model)")
    ap.add_argument("--videos", nargs="*", help="only these videos of the spec")
    ap.add_argument("--variants", nargs="*", help=f"only these variants: {', '.join(VARIANTS)}")
    ap.add_argument("--untuned", nargs="*", default=None, help=f"the variants also run untuned (default: {UNTUNED})")
    ap.add_argument("--tuning", choices=["both", "tuned", "untuned"], default="both",
                    help="run the tuned variants, the untuned ones, or both")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--summary", nargs="*", help="print the table of these results JSON files instead")
    args = ap.parse_args(argv)
    if args.summary:
        summary(args.summary)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

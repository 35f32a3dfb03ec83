"""Covariate shift of STAM (ei2) against TA (tune-a-video), before and after one-shot tuning (seed A.4–A.5).

    python benchmarks/shift/run_shift.py [--model assets/shapes-sd] [--steps 200] [--learning-rate 3e-5]
                                         [--out benchmarks/shift/results] [--results benchmarks/shift/RESULTS.md]

1. A Shapes video (`ei2.shapes.world.random_video`, 8 frames 64x64) and its caption.
2. For `ei2` and `tune-a-video`: `EI2Pipeline.tune` on it (fp32, CPU by default), adapter saved.
3. `ei2 analyze-shift` (via `ei2.metrics.shift_cli`) on both recipes with both adapters, at t = 100, 500, 900.
4. RESULTS.md: the command, the summary and the temporal modules' per-layer table, the plot, and whether the
   seed's claim (STAM's variance shift small, ~1e-2, and below TA's) holds here.

The model is `assets/shapes-sd` when it exists; otherwise a model folder with the Shapes architecture and
random weights is built (the report says so).
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "assets" / "shapes-sd"


def build_random_shapes_model(folder: Path) -> Path:
    """A StableDiffusionPipeline folder with the Shapes architecture (ei2.shapes.models) and random weights."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from ei2.shapes import models
    from ei2.shapes.tokenizer import load_tokenizer, write_tokenizer

    if (folder / "unet").is_dir():
        return folder
    write_tokenizer(folder / "tokenizer-src")
    tokenizer = load_tokenizer(folder / "tokenizer-src")
    torch.manual_seed(0)
    config = models.clip_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                tokenizer.pad_token_id, tokenizer.model_max_length)
    pipe = StableDiffusionPipeline(
        vae=models.make_vae(), text_encoder=CLIPTextModel(config.text_config).eval(), tokenizer=tokenizer,
        unet=models.make_unet(), scheduler=models.make_sample_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder / "tokenizer")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: assets/shapes-sd, else random Shapes-architecture weights")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--video-seed", type=int, default=3)
    parser.add_argument("--motion", default="right")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 500, 900])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "shift" / "results"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "shift" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from ei2.metrics.shift_cli import main as shift_main
    from ei2.pipeline import EI2Pipeline
    from ei2.shapes.world import random_video
    from ei2.video import write_mp4

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random_weights = False
    if args.model:
        model = Path(args.model)
    elif SHAPES.is_dir():
        model = SHAPES
    else:
        model = build_random_shapes_model(out / "random-shapes-sd")
        random_weights = True
    frames, truth = random_video(args.video_seed, args.frames, args.motion)
    video = write_mp4(frames, out / "video.mp4", fps=8)
    prompt = truth.caption
    print(f"model {model}{' (random weights)' if random_weights else ''}; video {video}: {prompt!r}")

    tuning = {}
    for recipe in ("ei2", "tune-a-video"):
        pipe = EI2Pipeline.from_pretrained(model, recipe=recipe, device=args.device, dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        start = time.time()
        result = pipe.tune(frames, prompt, steps=args.steps, learning_rate=args.learning_rate, seed=0,
                           gradient_checkpointing=False)
        adapter = pipe.save_adapter(out / f"adapter-{recipe}")
        tuning[recipe] = {"adapter": str(adapter), "seconds": round(time.time() - start, 1),
                          "first_loss": sum(result.losses[:10]) / max(1, len(result.losses[:10])),
                          "last_loss": sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))}
        print(f"tuned {recipe}: {tuning[recipe]}")
    (out / "tuning.json").write_text(json.dumps(tuning, indent=2))

    analysis = out / "analysis"
    shift_args = ["analyze-shift", str(video), "--model", str(model), "--recipe", "ei2", "--recipe", "tune-a-video",
                  "--adapter", tuning["ei2"]["adapter"], "--adapter", tuning["tune-a-video"]["adapter"],
                  "--prompt", prompt, "--timesteps", *map(str, args.timesteps), "--out", str(analysis),
                  "--device", args.device, "--overwrite"]
    rc = shift_main(shift_args)
    if rc:
        return rc
    write_results(Path(args.results), analysis, model, random_weights, prompt, args, tuning, shift_args)
    return 0


def _rel(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_results(results: Path, analysis: Path, model, random_weights, prompt, args, tuning, shift_args) -> None:
    from ei2.metrics.shift import format_summary, summarize

    rows = list(csv.DictReader((analysis / "shift.csv").open()))
    records = []
    for r in rows:
        rec = {k: v for k, v in r.items() if v != ""}
        for k, v in rec.items():
            if k not in ("recipe", "state", "layer", "module", "kind", "path", "prop3_holds", "prop2_holds"):
                rec[k] = float(v)
        for k in ("prop3_holds", "prop2_holds"):
            if k in rec:
                rec[k] = rec[k] == "True"
        records.append(rec)
    summary = summarize(records)

    def temporal(recipe, state, key):
        vals = [r[key] for r in records if r["kind"] == "temporal" and r["recipe"] == recipe and r["state"] == state]
        return sum(vals) / len(vals), max(vals)

    stam_tuned, _ = temporal("ei2", "tuned", "var_shift")
    ta_tuned, _ = temporal("tune-a-video", "tuned", "var_shift")
    verdict = (
        f"After tuning, STAM's mean variance shift is {stam_tuned:.2g} and TA's is {ta_tuned:.2g}: STAM's is "
        f"{'below' if stam_tuned < ta_tuned else '**not** below'} TA's (ratio {stam_tuned / ta_tuned:.2g}), and it "
        f"{'is' if stam_tuned <= 3e-2 else 'is **not**'} at or below the ~1e-2 the seed reports. "
        f"Prop. 3 holds for STAM in {sum(bool(r['prop3_holds']) for r in records if r['module'] == 'STAM')}/"
        f"{sum(r['module'] == 'STAM' for r in records)} measurements."
    )
    lines = []
    for state in ("init", "tuned"):
        stam_var, stam_var_max = temporal("ei2", state, "var_shift")
        ta_var, ta_var_max = temporal("tune-a-video", state, "var_shift")
        stam_cov, _ = temporal("ei2", state, "cov_shift_spectral")
        ta_cov, _ = temporal("tune-a-video", state, "cov_shift_spectral")
        lines.append(f"| {state} | {stam_var:.3g} (max {stam_var_max:.3g}) | {ta_var:.3g} (max {ta_var_max:.3g}) | "
                     f"{stam_cov:.3g} | {ta_cov:.3g} |")
    per_layer = [r for r in records if r["kind"] == "temporal"]
    layer_lines = ["| recipe | state | t | layer | module | ‖µ′−µ‖ | ‖Σ′−Σ‖₂ | |Δvar| | var(z) | ‖Σ(z)‖₂ | ω mean | "
                   "Prop3 bound | holds | ‖ΔW_q‖₂ | ‖ΔΣ′‖₂ (W_q) | Prop2 bound |",
                   "|" + "---|" * 16]
    for r in per_layer:
        g = lambda k, f="{:.3g}": f.format(r[k]) if k in r else ""  # noqa: E731
        layer_lines.append(
            f"| {r['recipe']} | {r['state']} | {int(r['timestep'])} | {r['layer']} | {r['module']} | {g('mean_shift')} | "
            f"{g('cov_shift_spectral')} | {g('var_shift')} | {g('variance_z')} | {g('sigma_z_spectral')} | "
            f"{g('omega_mean', '{:.3f}')} | {g('prop3_bound')} | {'yes' if r['prop3_holds'] else 'NO'} | "
            f"{g('wq_delta')} | {g('cov_change_from_wq')} | {g('prop2_bound')} |")
    command = "python benchmarks/shift/run_shift.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"""# Covariate shift: STAM (ei2) against TA (tune-a-video)

Generated by `{command.strip()}`; the analysis step is

    ei2 analyze-shift {' '.join(shlex.quote(a if not Path(a).is_absolute() else _rel(a)) for a in shift_args[1:])}

- Model: `{_rel(model)}`{' — **random weights with the Shapes architecture** (assets/shapes-sd did not exist)' if random_weights else ''}.
- Video: Shapes `random_video({args.video_seed}, {args.frames}, {args.motion!r})`, caption {prompt!r}.
- Tuning: `EI2Pipeline.tune`, {args.steps} steps, AdamW lr {args.learning_rate:g}, fp32, {args.device}
  (ei2: {tuning['ei2']['seconds']} s, loss {tuning['ei2']['first_loss']:.4f} → {tuning['ei2']['last_loss']:.4f};
  tune-a-video: {tuning['tune-a-video']['seconds']} s, loss {tuning['tune-a-video']['first_loss']:.4f} →
  {tuning['tune-a-video']['last_loss']:.4f}; mean of the first/last 10 steps).
- Timesteps {', '.join(map(str, args.timesteps))}, the same noise for every model.

## The seed's claim

Variance shift |Δvar| = mean |diag(Σ′−Σ)| of the temporal module, mean over layers and timesteps:

| state | STAM (ei2) | TA (tune-a-video) | STAM ‖Σ′−Σ‖₂ | TA ‖Σ′−Σ‖₂ |
|---|---|---|---|---|
{chr(10).join(lines)}

{verdict}

## Summary (mean over layers and timesteps)

{format_summary(summary, markdown=True)}

## Temporal modules per layer

{chr(10).join(layer_lines)}

Every module (frame attention and cross-attention too) is in `results/analysis/shift.csv` and
`results/analysis/shift.md`.

![shift by layer](results/analysis/shift_by_layer.png)
"""
    results.write_text(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    sys.exit(main())

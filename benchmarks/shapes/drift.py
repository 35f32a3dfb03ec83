"""Where the object goes when an edit loses its path (issue 19): offsets, sizes, and the controls that were tried.

    python benchmarks/shapes/drift.py --out benchmarks/shapes/results-issue19/drift.json      # all variants, 12 videos
    python benchmarks/shapes/drift.py --summary benchmarks/shapes/results-issue19/drift.json
    python benchmarks/shapes/drift.py --trajectory yellow-diamond-down:color --png /tmp/trajectory.png
    python benchmarks/shapes/drift.py --noise-difference
    python benchmarks/shapes/drift.py --t2i-size "a yellow diamond on a gray background" "a purple diamond on a gray background"

The Shapes benchmark's 12 videos, each edited three ways (colour, shape, background), untuned (one-shot tuning
does not change the paths at the defaults: `RESULTS.md`), 25 DDIM steps. For every edit the oracle reads every
frame; the row keeps the mean centre error, the mean offset (dx, dy) of the object from the renderer's centre,
its spread over the frames, and the size of the edited object against the source's. Variants (`VARIANTS`):
the shipped edit (strength 0.6, injection 0.5/0.5) and one change each: strength, injection fractions and
block, guidance scale, a guidance schedule (no guidance for the first steps of the run, or a linear ramp:
Kynkäänniemi et al. 2024, Wang et al. 2024), the text embedding interpolated from the source prompt's to the
target's over the run, the source prompt as the negative prompt, null-text inversion, Prompt-to-Prompt word
swap and local blending on the changed words, and the identity edit (the source prompt as the target).

`--trajectory VIDEO:KIND` prints, for the plain edit at strength 0.6, the object that the x0 prediction of every
step shows (size, offset) under the source prompt and under the edit's prompt. `--noise-difference` measures
where DiffEdit's mask (the difference of the two prompts' noise predictions) lies: on the object or on the
background. `--t2i-size` reads the size of the object the text-to-image model draws for each caption.
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
STEPS = 25
GUIDANCE = 7.5
# name: keyword arguments of one edit; "schedule" variants run a plain DDIM loop with a per-step guidance scale
VARIANTS: dict[str, dict] = {
    "shipped (s0.6 inject 0.5/0.5)": {},
    "identity (source prompt)": {"identity": True},
    "s0.6 plain": {"features": 0.0, "attention": 0.0},
    "s0.4": {"strength": 0.4},
    "s1.0": {"strength": 1.0},
    "features 1.0": {"features": 1.0},
    "attention 1.0": {"attention": 1.0},
    "block 0": {"block": 0},
    "block 2": {"block": 2},
    "guidance 5": {"guidance": 5.0},
    "guidance 3": {"guidance": 3.0},
    "negative = source prompt": {"negative_source": True},
    "null-text inversion": {"null_text": True},
    "p2p replace 0.8/0.4": {"p2p": {}},
    "p2p + blend changed words": {"p2p": {"blend": True}},
    "plain, no guidance first 34%": {"schedule": "off0.34"},
    "plain, guidance ramp": {"schedule": "ramp"},
    "plain, prompt interpolated (lin)": {"prompt_ramp": "lin"},
    "plain, prompt interpolated (half)": {"prompt_ramp": "half"},
}


def guidance_schedule(kind: str, n: int, scale: float = GUIDANCE) -> np.ndarray:
    """Per-step guidance scales of a run of n steps: `const`, `offF` (1.0 for the first fraction F), `ramp`
    (1 -> scale)."""
    if kind == "const":
        return np.full(n, scale)
    if kind.startswith("off"):
        w = np.full(n, scale)
        w[: int(round(float(kind[3:]) * n))] = 1.0
        return w
    if kind == "ramp":
        return 1 + (scale - 1) * (np.arange(n) + 1) / n
    raise ValueError(f"unknown guidance schedule {kind!r}")


def prompt_weights(kind: str, n: int) -> np.ndarray:
    """Per-step weight of the target prompt's embedding against the source's: `const` (1), `lin` ((i + 1) / n),
    `half` (reaches 1 at the middle of the run)."""
    i = np.arange(n) + 1
    return {"const": np.ones(n), "lin": i / n, "half": np.minimum(1.0, 2 * i / n)}[kind]


def scheduled_edit(pipe, latents, source_prompt, prompts, strength, schedule="const", prompt_ramp="const"):
    """A plain DDIM edit from the cached inversion with a per-step guidance scale and a per-step text embedding
    interpolated from the source prompt's to the target's (public ei2.inversion steps)."""
    from ei2.inversion import alpha, ddim_move, model_output, prediction_type, timesteps
    from ei2.sampling import start_step

    scheduler = pipe.ddim_scheduler()
    trajectory = pipe.invert_trajectory(latents=latents, prompt=source_prompt, num_inference_steps=STEPS)
    start = start_step(STEPS, strength)
    steps = timesteps(scheduler, STEPS, latents.device)[start:]
    scales, weights = guidance_schedule(schedule, len(steps)), prompt_weights(prompt_ramp, len(steps))
    target, uncond = pipe.encode_prompt(prompts), pipe.encode_prompt("")
    source = pipe.encode_prompt(source_prompt).expand_as(target)
    x = trajectory[STEPS - start].expand(len(prompts), -1, -1, -1, -1).clone()
    for i, t in enumerate(steps):
        text = (1 - float(weights[i])) * source + float(weights[i]) * target
        out = model_output(pipe.unet, x, t, text, uncond, float(scales[i]))
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        x = ddim_move(out, x, alpha(scheduler, t), alpha(scheduler, nxt), prediction_type(scheduler))
    return pipe.decode_latents(x)


def changed_words(source: str, target: str) -> tuple[str, ...]:
    pairs = [(a, b) for a, b in zip(source.split(), target.split()) if a != b]
    return tuple(a for a, _ in pairs) + tuple(b for _, b in pairs)


def edit(pipe, frames, latents, source_prompt, prompts, kw):
    from ei2.control import InjectionConfig, P2PConfig

    strength = kw.get("strength", 0.6)
    if "schedule" in kw or "prompt_ramp" in kw:
        return scheduled_edit(pipe, latents, source_prompt, prompts, strength, kw.get("schedule", "const"),
                              kw.get("prompt_ramp", "const"))
    injection = InjectionConfig(kw.get("features", 0.5), kw.get("attention", 0.5), kw.get("block", 1))
    common = dict(num_inference_steps=STEPS, guidance_scale=kw.get("guidance", GUIDANCE), strength=strength,
                  injection=injection, null_text=kw.get("null_text", False),
                  negative_prompt=source_prompt if kw.get("negative_source") else None)
    if "p2p" in kw:  # word swap needs one target per call (its own token alignment)
        out = []
        for prompt in prompts:
            blend = changed_words(source_prompt, prompt) if kw["p2p"].get("blend") else ()
            out.append(pipe.edit(frames, source_prompt, [prompt], p2p=P2PConfig("replace", blend_words=blend),
                                 **common).frames[0])
        return out
    return pipe.edit(frames, source_prompt, prompts, **common).frames


def read(frames, centres, source_size):
    from ei2.shapes.oracle import read_frames

    r = read_frames(frames)
    dx, dy = r.cx - centres[:, 0], r.cy - centres[:, 1]
    err = np.where(r.found, np.hypot(dx, dy), np.inf)
    ok = r.found
    return {"mean_err": float(err.mean()), "collapsed": int((~ok).sum()),
            "dx": float(dx[ok].mean()) if ok.any() else None, "dy": float(dy[ok].mean()) if ok.any() else None,
            "offset_spread": (float(np.hypot(dx[ok] - dx[ok].mean(), dy[ok] - dy[ok].mean()).mean())
                              if ok.any() else None),
            "size_ratio": float(np.median(r.size[ok] / source_size[ok])) if ok.any() else None}


def run(args) -> None:
    from ei2.bench.spec import load_spec
    from ei2.metrics.oracle import oracle_metrics
    from ei2.pipeline import EI2Pipeline
    from ei2.shapes.oracle import read_frames

    spec = load_spec(args.spec)
    videos = [v for v in spec.videos if not args.videos or v.name in args.videos]
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    rows, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for video in videos:
        pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        frames, centres, _ = video.load({"frames": 8, "stride": 1, "start": 0}, pipe.default_size)
        latents = pipe.encode_frames(frames)
        source_size = read_frames(frames).size
        if args.tune_steps:
            torch.manual_seed(0)
            pipe.tune(latents=latents, source_prompt=video.source_prompt, steps=args.tune_steps, seed=0)
        for name, kw in variants.items():
            t = time.perf_counter()
            prompts = [video.source_prompt] * 3 if kw.get("identity") else [e.prompt for e in video.edits]
            results = edit(pipe, frames, latents, video.source_prompt, prompts, kw)
            for e, prompt, edited in zip(video.edits, prompts, results):
                m = oracle_metrics(edited, prompt, source=video.source_prompt, source_centres=centres)
                rows.append({"video": video.name, "kind": e.kind, "variant": name, **read(edited, centres, source_size),
                             "edit_acc": m.get("edit_acc"), "keep_acc": m.get("keep_acc")})
            r = rows[-3:]
            print(f"{video.name:26s} {name:32s} " + " ".join(
                f"{x['kind'][:3]}:{x['mean_err']:5.1f}px x{x['size_ratio'] or 0:.2f}" for x in r)
                + f" ({time.perf_counter() - t:.0f} s)", flush=True)
            out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


def summary(paths, within: float = 4.0) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print("| variant | path kept: colour / shape / background | edit acc: colour / shape / background | collapsed "
          "frames | lost edits: median size ratio, offset spread over frames (px) |")
    print("|---|---|---|---|---|")
    for name in names:
        sel = [r for r in rows if r["variant"] == name]
        kept = {k: [r["mean_err"] <= within for r in sel if r["kind"] == k] for k in KINDS}
        acc = {k: [r["edit_acc"] for r in sel if r["kind"] == k and r["edit_acc"] is not None] for k in KINDS}
        lost = [r for r in sel if r["mean_err"] > within and r["size_ratio"] is not None]
        ratio = f"{np.median([r['size_ratio'] for r in lost]):.2f}" if lost else "-"
        spread = f"{np.median([r['offset_spread'] for r in lost]):.1f}" if lost else "-"
        frames = 8 * len(sel)
        print(f"| {name} | " + " / ".join(f"{sum(kept[k])}/{len(kept[k])}" for k in KINDS) + " | "
              + " / ".join(f"{np.mean(acc[k]):.2f}" if acc[k] else "-" for k in KINDS)
              + f" | {sum(r['collapsed'] for r in sel)}/{frames} | "
              + f"{ratio}, {spread} (n {len(lost)}) |")


def trajectory(args) -> None:
    """The x0 prediction of every step of the plain edit at strength 0.6, read by the oracle (frame 0..3)."""
    from ei2.bench.spec import load_spec
    from ei2.inversion import alpha, ddim_move, model_output, prediction_type, timesteps, to_x0
    from ei2.sampling import start_step
    from ei2.pipeline import EI2Pipeline
    from ei2.shapes.oracle import read_frames

    name, kind = args.trajectory.split(":")
    video = next(v for v in load_spec(args.spec).videos if v.name == name)
    target = next(e.prompt for e in video.edits if e.kind == kind)
    pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    frames, centres, _ = video.load({"frames": 8, "stride": 1, "start": 0}, pipe.default_size)
    latents = pipe.encode_frames(frames)
    trajectory = pipe.invert_trajectory(latents=latents, prompt=video.source_prompt, num_inference_steps=STEPS)
    scheduler = pipe.ddim_scheduler()
    start = start_step(STEPS, 0.6)
    steps = timesteps(scheduler, STEPS, latents.device)[start:]
    uncond, strips = pipe.encode_prompt(""), []
    for prompt in (video.source_prompt, target):
        x, text, strip = trajectory[STEPS - start].clone(), pipe.encode_prompt(prompt), []
        for i, t in enumerate(steps):
            out = model_output(pipe.unet, x, t, text, uncond, GUIDANCE)
            a = alpha(scheduler, t)
            x0 = pipe.decode_latents(to_x0(out, x, a, prediction_type(scheduler)))[0]
            r = read_frames(x0[:4])
            print(f"{prompt[:34]:34s} step {i:2d} t {t:4d} | size " + " ".join(f"{s:4.1f}" for s in r.size)
                  + " | offset " + " ".join(f"({dx:+5.1f},{dy:+5.1f})" if ok else "(none)" for dx, dy, ok in
                                           zip(r.cx - centres[:4, 0], r.cy - centres[:4, 1], r.found)))
            strip.append(x0[0])
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            x = ddim_move(out, x, a, alpha(scheduler, nxt), prediction_type(scheduler))
        strips.append(np.concatenate(strip, 1))
    if args.png:
        from PIL import Image

        image = Image.fromarray(np.concatenate(strips, 0))
        image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(args.png)
        print(f"wrote {args.png} (rows: source prompt, edit prompt; columns: x0 prediction of each step, frame 0)")


def noise_difference(args) -> None:
    """DiffEdit's map (Couairon et al. 2023): |eps(target) - eps(source)| at strength 0.5, guidance 7.5, mean of 5
    noise draws and the 4 channels; its mean on the object's latent cells against the background's, per kind."""
    import torch.nn.functional as F

    from ei2.bench.spec import load_spec
    from ei2.inversion import alpha, model_output, timesteps
    from ei2.sampling import start_step
    from ei2.pipeline import EI2Pipeline

    spec = load_spec(args.spec)
    ratios = {k: [] for k in KINDS}
    for video in [v for v in spec.videos if not args.videos or v.name in args.videos]:
        pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
        pipe.set_progress_bar_config(disable=True)
        frames, _, _ = video.load({"frames": 8, "stride": 1, "start": 0}, pipe.default_size)
        latents = pipe.encode_frames(frames)
        scheduler = pipe.ddim_scheduler()
        t = timesteps(scheduler, STEPS, latents.device)[start_step(STEPS, 0.5)]
        a = alpha(scheduler, t)
        # the object's cells: pixels unlike the (flat) background colour of the corner, pooled to the latent grid
        corner = frames[:, :1, :1].astype(np.float32)
        obj = torch.from_numpy((np.abs(frames.astype(np.float32) - corner).sum(-1) > 60).astype(np.float32))
        obj = F.adaptive_avg_pool2d(obj[:, None], latents.shape[-2:])[:, 0] > 0.5  # f h w
        source, uncond = pipe.encode_prompt(video.source_prompt), pipe.encode_prompt("")
        line = []
        for e in video.edits:
            g = torch.Generator().manual_seed(0)
            diff = 0
            for _ in range(5):
                x = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=g)
                out = model_output(pipe.unet, x.expand(2, -1, -1, -1, -1), t,
                                   torch.cat([source, pipe.encode_prompt(e.prompt)]), uncond, GUIDANCE)
                diff = diff + (out[1] - out[0]).abs().mean(0)  # f h w
            ratio = float(diff[obj].mean() / diff[~obj].mean())
            ratios[e.kind].append(ratio)
            line.append(f"{e.kind[:3]} {ratio:5.2f}")
        print(f"{video.name:26s} object / background of |eps(target) - eps(source)|: " + " ".join(line), flush=True)
    print("median per kind: " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in ratios.items() if v))


def t2i_sizes(args, n: int = 24) -> None:
    """Size of the object the text-to-image model draws for each caption of `--t2i-size` (n samples, 25 steps)."""
    from ei2.shapes.evaluate import load_pipeline, text_to_image
    from ei2.shapes.oracle import read_frames
    from ei2.shapes.world import random_scenes

    pipe = load_pipeline(args.model or REPO / "assets/shapes-sd")
    for caption in args.t2i_size:
        r = read_frames(text_to_image(pipe, [caption] * n, seed=1, steps=STEPS, guidance=GUIDANCE, batch=n))
        size = r.size[r.found]
        print(f"{caption:50s} size {size.mean():.1f} ± {size.std():.1f} px, found {r.found.mean():.2f}")
    sizes = random_scenes(2000, seed=0).size
    print(f"training scenes: size {sizes.mean():.1f} ± {sizes.std():.1f} px")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(REPO / "benchmarks/shapes/spec.yaml"))
    ap.add_argument("--model", default=None, help="model folder (default: the bundled Shapes model)")
    ap.add_argument("--videos", nargs="*")
    ap.add_argument("--variants", nargs="*", help=f"names of VARIANTS (default: all {len(VARIANTS)})")
    ap.add_argument("--tune-steps", type=int, default=0, help="one-shot tuning steps before editing (default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/drift.json")
    ap.add_argument("--summary", nargs="*")
    ap.add_argument("--trajectory", help="VIDEO:KIND, e.g. yellow-diamond-down:color")
    ap.add_argument("--png")
    ap.add_argument("--t2i-size", nargs="*", help="captions: the mean size of the object text-to-image draws")
    ap.add_argument("--noise-difference", action="store_true", help="DiffEdit's map: object against background")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summary:
        summary(args.summary)
    elif args.t2i_size:
        t2i_sizes(args)
    elif args.noise_difference:
        noise_difference(args)
    elif args.trajectory:
        trajectory(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

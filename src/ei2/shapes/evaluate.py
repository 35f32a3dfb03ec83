"""Quality bars of the embedded Shapes model (issue 4), written into its model card.

    python -m ei2.shapes.evaluate [--model assets/shapes-sd] [--clip assets/shapes-clip] [--captions 200]

- VAE: PSNR of reconstructions (posterior mode) of held-out renders; bar >= 30 dB.
- CLIP: zero-shot accuracy per attribute (the best of the 72 captions) on held-out renders; bar >= 95%.
- Text to image: random captions, DDIM 50 steps, guidance 7.5, one seed per caption; the oracle reads
  colour, shape and background back; bars 95% / 90% / 95%. Also measured on captions with a motion
  phrase ("a red circle moving right on a gray background"), as the sample videos' captions read.
Held-out renders use seeds below the training pools' (which start at 1,000,000).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .oracle import attribute_accuracy, read_frames
from .world import (
    BACKGROUND_NAMES, COLOR_NAMES, MOTIONS, SHAPES, all_captions, caption, degrade, random_scenes, render,
)

REPO = Path(__file__).resolve().parents[3]
# What the card says about the shipped weights beyond the measurements (its Notes section).
NOTES = """- Latent scale. The first UNet run used Stable Diffusion's 0.18215 by accident (reloading the VAE
  config dropped the stored 1/std: diffusers' `_use_default_values` listed the key); `train.py` now keeps
  it, and the shipped UNet was trained on to 1/std (above). The retrain raised text-to-image shape accuracy
  from 92.5% to 99.5%; it did not change how edits keep an object's path (next note).
- Editing. DDIM-inverted noise of these flat images carries the object's position only weakly, and the
  cross-attention maps of single words are spread over the whole frame (the causal text encoder puts every
  word into the later tokens), so a plain edit keeps the source's path on some videos and redraws the
  object elsewhere on others (`assets/samples/red_circle_right.mp4` into a blue square: ~20 px off).
  Structure-preserving injection (the source's decoder features and frame-attention queries/keys for the
  first half of the steps), on by default through `ei2_defaults.json`, keeps that edit within 3.5 px in
  every frame. Background edits still often move the object, and some frames decode to texture (the oracle
  counts them as failed frames). Measured in benchmarks/shapes/RESULTS.md and benchmarks/injection/RESULTS.md.
"""
BARS = {"vae_psnr": 30.0, "clip": 0.95, "t2i_color": 0.95, "t2i_shape": 0.90, "t2i_background": 0.95}


def _pixels(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def vae_psnr(vae, n: int = 1000, seed: int = 1, batch: int = 100) -> float:
    """Mean PSNR (dB, 0..255 scale) of posterior-mode reconstructions of n held-out renders."""
    frames = render(random_scenes(n, seed=seed))
    psnrs = []
    for b in np.array_split(frames, max(1, n // batch)):
        x = _pixels(b).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().cpu()
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
        mse = ((rec - b.astype(np.float32)) ** 2).reshape(len(b), -1).mean(1)
        psnrs.append(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)))
    return float(np.concatenate(psnrs).mean())


@torch.no_grad()
def latent_std(vae, n: int = 500, seed: int = 1) -> float:
    """Standard deviation of posterior samples of held-out renders' latents (before scaling_factor)."""
    x = _pixels(render(random_scenes(n, seed=seed))).to(vae.device, vae.dtype)
    gen = torch.Generator(vae.device).manual_seed(0)
    return float(torch.cat([vae.encode(b).latent_dist.sample(gen).float() for b in x.split(100)]).std())


@torch.no_grad()
def clip_zero_shot(clip, tokenizer, n: int = 2000, seed: int = 2, degraded: bool = False) -> dict[str, float]:
    """Zero-shot accuracy per attribute: each image's best caption among all 72 of the world."""
    scenes = random_scenes(n, seed=seed)
    frames = render(scenes)
    if degraded:
        frames = degrade(frames, seed=seed)
    ids = tokenizer(all_captions(), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(clip.device)
    text = torch.nn.functional.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
    best = []
    for b in np.array_split(frames, max(1, n // 250)):
        img = clip.get_image_features(pixel_values=_pixels(b).to(clip.device)).pooler_output
        img = torch.nn.functional.normalize(img, dim=-1)
        best.append((img @ text.T).argmax(1).cpu().numpy())
    best = np.concatenate(best)
    nb, ns = len(BACKGROUND_NAMES), len(SHAPES)
    color, shape, background = best // (ns * nb), (best // nb) % ns, best % nb
    return {
        "color": float((color == scenes.color).mean()),
        "shape": float((shape == scenes.shape).mean()),
        "background": float((background == scenes.background).mean()),
    }


def random_captions(n: int, seed: int, motions: bool = False):
    """n random (caption, colour, shape, background) of the world, optionally with a motion phrase."""
    rng = np.random.default_rng(seed)
    c = rng.integers(len(COLOR_NAMES), size=n)
    s = rng.integers(len(SHAPES), size=n)
    b = rng.integers(len(BACKGROUND_NAMES), size=n)
    m = rng.choice(list(MOTIONS), size=n) if motions else [None] * n
    caps = [caption(COLOR_NAMES[i], SHAPES[j], BACKGROUND_NAMES[k], mm) for i, j, k, mm in zip(c, s, b, m)]
    return caps, c, s, b


@torch.no_grad()
def text_to_image(pipe, captions: list[str], seed: int = 0, steps: int = 50, guidance: float = 7.5,
                  batch: int = 50) -> np.ndarray:
    """(n, 64, 64, 3) uint8 images, caption i sampled with torch.Generator seeded seed + i."""
    out = []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def t2i_accuracy(pipe, n: int = 200, seed: int = 3, steps: int = 50, guidance: float = 7.5,
                 motions: bool = False, batch: int = 50) -> dict[str, float]:
    captions, c, s, b = random_captions(n, seed, motions)
    images = text_to_image(pipe, captions, seed=seed * 100_000, steps=steps, guidance=guidance, batch=batch)
    return attribute_accuracy(read_frames(images), c, s, b)


def load_pipeline(path: str | Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_model_card(results: dict, path: Path) -> None:
    r = results
    train = r.get("training", {})

    def steps(stage):
        t = train.get(stage, {})
        return f"{t.get('step', '?')} steps" if t else "?"

    notes = r.get("notes", "")
    ok = {k: ("yes" if v else "**no**") for k, v in r["passes"].items()}
    sf, std = r["scaling_factor"], r["latent_std"]
    if abs(sf * std - 1) < 0.1:
        scale_note = f"scaling_factor {sf:.4f} (1/std of latents)"
    else:
        scale_note = (f"scaling_factor {sf:.5g} (latents' std is {std:.3f}, so scaled latents have std {sf * std:.2f}; "
                      "see Notes)")
    m = r.get("t2i_motion") or {}
    motion_row = (f'| text→image colour / shape / background, {m["n"]} captions with a motion phrase | '
                  f'{_pct(m["color"])} / {_pct(m["shape"])} / {_pct(m["background"])} | | |\n') if m else ""
    text = f"""# Shapes-SD: the embedded text-to-image model of ei2

A complete, tiny Stable-Diffusion-1.x-layout latent diffusion model in the diffusers
`StableDiffusionPipeline` folder format, pretrained from scratch by ei2's own scripts on the
procedural Shapes world (DESIGN §3): 64×64 images of one coloured shape on a flat background,
captions such as "a red circle on a gray background". It is the default model of every ei2
command; `assets/shapes-clip/` beside it is the CLIP (text and vision towers) whose text tower is
this model's text encoder, used by the metrics.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("assets/shapes-sd", safety_checker=None)
image = pipe("a red circle on a gray background", num_inference_steps=50, guidance_scale=7.5).images[0]
```

## The world
- colours: {", ".join(COLOR_NAMES)}; shapes: {", ".join(SHAPES)}; backgrounds: {", ".join(BACKGROUND_NAMES)}
  (72 captions); size (half side of the bounding box) 7–15 px, any position inside the frame.
- captions optionally carry a motion phrase ({", ".join(f'"{m}"' for m in MOTIONS.values())}), as the
  sample videos' captions do; it does not change the image.

## Components
| part | class | size |
| --- | --- | --- |
| tokenizer | `CLIPTokenizer` (every caption word one token; max length 32) | {r["sizes"]["tokenizer"]} |
| text_encoder | `CLIPTextModel`, 3 layers, width 64 (the text tower of shapes-clip, frozen during UNet training) | {r["sizes"]["text_encoder"]} |
| vae | `AutoencoderKL`, 4 latent channels, 64→16, channels 32/64/64, {scale_note} | {r["sizes"]["vae"]} |
| unet | `UNet2DConditionModel`, CrossAttnDown×2 + Down / Up + CrossAttnUp×2, channels 32/64/64, {r["unet_params"] / 1e6:.2f} M parameters, EMA 0.999 weights | {r["sizes"]["unet"]} |
| scheduler | `DDIMScheduler`, SD 1.x schedule: scaled_linear β 0.00085–0.012, 1000 steps, epsilon | |
| whole folder | safetensors only | {r["sizes"]["total"]} |

Training (seeded; `work_shapes/`, git-ignored, holds checkpoints and loss logs): CLIP contrastive,
each image against the 72 captions with random motion phrases ({steps("clip")}, batch 1024); VAE
MSE + L1 + 1e-4 KL ({steps("vae")}, batch 256); UNet epsilon loss on SD 1.x's DDPM schedule, 10%
empty captions for classifier-free guidance, text encoder frozen, EMA 0.999, AdamW, warm-up then
cosine decay. The UNet was first trained for 10,796 steps (4,753 at batch 512 and lr 1e-3, then 6,043
at batch 1024 and lr 6e-4) on latents scaled by Stable Diffusion's 0.18215, which is 0.2× unit variance
for this VAE; the shipped UNet starts from those weights (`--init`) and is trained {steps("unet")} more
at batch 1024 and lr 6e-4 on latents scaled by 1/std, the VAE's shipped scaling_factor. All on one
NVIDIA H200 in about 20 minutes (commands below).

## Quality (held-out renders; `python -m ei2.shapes.evaluate`)
| measure | result | bar | passes |
| --- | --- | --- | --- |
| VAE PSNR ({r["vae"]["n"]} renders, posterior mode) | {r["vae"]["psnr"]:.2f} dB | ≥ 30 dB | {ok["vae_psnr"]} |
| CLIP zero-shot colour ({r["clip"]["n"]} renders) | {_pct(r["clip"]["color"])} | ≥ 95% | {ok["clip_color"]} |
| CLIP zero-shot shape | {_pct(r["clip"]["shape"])} | ≥ 95% | {ok["clip_shape"]} |
| CLIP zero-shot background | {_pct(r["clip"]["background"])} | ≥ 95% | {ok["clip_background"]} |
| CLIP zero-shot colour / shape / background, blurred + noisy renders | {_pct(r["clip_degraded"]["color"])} / {_pct(r["clip_degraded"]["shape"])} / {_pct(r["clip_degraded"]["background"])} | | |
| text→image colour ({r["t2i"]["n"]} random captions, DDIM {r["t2i"]["steps"]} steps, guidance {r["t2i"]["guidance"]}) | {_pct(r["t2i"]["color"])} | ≥ 95% | {ok["t2i_color"]} |
| text→image shape | {_pct(r["t2i"]["shape"])} | ≥ 90% | {ok["t2i_shape"]} |
| text→image background | {_pct(r["t2i"]["background"])} | ≥ 95% | {ok["t2i_background"]} |
| text→image all three at once | {_pct(r["t2i"]["all"])} | | |
{motion_row}
The oracle (`ei2.shapes.oracle`) reads the generated images: it is 100% right on clean renders and
≥ 99% on renders with mild blur and noise (tests/test_shapes.py).
Measured {r["date"]} on {r["machine"]} in {r["seconds"]:.0f} s.

## Commands
```bash
python -m ei2.shapes.train clip --device cuda --workers 16 --steps 100000 --max-minutes 1.2
python -m ei2.shapes.train vae  --device cuda --workers 16 --steps 100000 --max-minutes 2.2
python -m ei2.shapes.train unet --device cuda --workers 16 --steps 100000 --max-minutes 4.4
python -m ei2.shapes.train unet --device cuda --workers 16 --steps 100000 --max-minutes 6.2 \
    --resume --batch-size 1024 --lr 6e-4                          # at scaling_factor 0.18215 (see above)
cp work_shapes/unet/final.safetensors init_unet.safetensors
python -m ei2.shapes.train unet --device cuda --workers 16 --steps 100000 --max-minutes 5.5 \
    --batch-size 1024 --lr 6e-4 --init init_unet.safetensors     # at 1/std: the shipped UNet
python -m ei2.shapes.train export     # work_shapes/*/final.* -> assets/shapes-clip, assets/shapes-sd
python -m ei2.shapes.evaluate         # the numbers above; writes this card
```
`--max-minutes` ends a stage's cosine schedule at that time or at `--steps`, whichever comes first.
On a 2-core CPU, `python -m ei2.shapes.train all` (the default step counts: CLIP 3k, VAE 4k, UNet 15k
steps) takes a few hours; add `--resume` to continue from `work_shapes/<stage>/checkpoint.safetensors`.

## Notes
{notes}
## Limits
One shape per image, no position or size in the captions, 64×64 only. It is a test and demo model,
not a general text-to-image model.
"""
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 1e6:.1f} MB" if total > 1e5 else f"{total / 1e3:.0f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ei2.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "shapes-sd"))
    parser.add_argument("--clip", default=str(REPO / "assets" / "shapes-clip"))
    parser.add_argument("--captions", type=int, default=200, help="random captions for text to image (>= 200)")
    parser.add_argument("--motion-captions", type=int, default=100,
                        help="random captions with a motion phrase, measured apart (0: skip)")
    parser.add_argument("--batch", type=int, default=50, help="captions sampled at once")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--card", help="model card to write (default: MODEL_CARD.md in --model)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--notes", help="text of the card's Notes section (default: NOTES in this module)")
    parser.add_argument("--work", default="work_shapes", help="training folder, for the step counts in the card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import CLIPModel

    from .tokenizer import load_tokenizer

    t0 = time.time()
    model = Path(args.model)
    pipe = load_pipeline(model).to(args.device)
    clip = CLIPModel.from_pretrained(args.clip).eval().to(args.device)
    clip_tok = load_tokenizer(args.clip)
    results: dict = {}
    results["vae"] = {"psnr": vae_psnr(pipe.vae), "n": 1000}
    print(f"VAE PSNR {results['vae']['psnr']:.2f} dB", flush=True)
    results["clip"] = {**clip_zero_shot(clip, clip_tok), "n": 2000}
    results["clip_degraded"] = clip_zero_shot(clip, clip_tok, degraded=True)
    print(f"CLIP zero-shot {results['clip']}  degraded {results['clip_degraded']}", flush=True)
    settings = {"n": args.captions, "steps": args.steps, "guidance": args.guidance}
    results["t2i"] = {**t2i_accuracy(pipe, args.captions, steps=args.steps, guidance=args.guidance, batch=args.batch), **settings}
    print(f"text to image {results['t2i']}", flush=True)
    results["t2i_motion"] = {}
    if args.motion_captions:
        results["t2i_motion"] = {**t2i_accuracy(pipe, args.motion_captions, seed=4, steps=args.steps,
                                                guidance=args.guidance, motions=True, batch=args.batch),
                                 **settings, "n": args.motion_captions}
    print(f"text to image, motion captions {results['t2i_motion']}", flush=True)
    results["passes"] = {
        "vae_psnr": results["vae"]["psnr"] >= BARS["vae_psnr"],
        **{f"clip_{k}": results["clip"][k] >= BARS["clip"] for k in ("color", "shape", "background")},
        **{f"t2i_{k}": results["t2i"][k] >= BARS[f"t2i_{k}"] for k in ("color", "shape", "background")},
    }
    results["sizes"] = {k: _size(model / k) for k in ("tokenizer", "text_encoder", "vae", "unet")}
    results["sizes"]["total"] = _size(model)
    results["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    results["latent_std"] = latent_std(pipe.vae)
    results["unet_params"] = sum(p.numel() for p in pipe.unet.parameters())
    work = Path(args.work)
    results["training"] = {s: json.loads((work / s / "final.json").read_text()) for s in ("clip", "vae", "unet")
                           if (work / s / "final.json").exists()}
    results["training"] = {s: {"step": v["step"]} for s, v in results["training"].items()}
    results["notes"] = args.notes if args.notes is not None else NOTES
    results["date"] = time.strftime("%Y-%m-%d")
    results["machine"] = (torch.cuda.get_device_name() if args.device == "cuda" else
                          f"{platform.machine()} CPU, {args.threads} threads") + f", torch {torch.__version__}"
    results["seconds"] = time.time() - t0
    write_model_card(results, Path(args.card) if args.card else model / "MODEL_CARD.md")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["passes"]))
    return 0 if all(results["passes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

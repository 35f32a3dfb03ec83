"""Time each stage of an edit (tuning step, inversion, editing) for 8 frames, per recipe, side by side.

Model: a tiny Stable Diffusion-layout UNet (block_out_channels 32,32,64,64; layers_per_block 1;
cross_attention_dim 32; 8 heads; 16 norm groups; random weights), latents (1, 4, 8, 16, 16), fp32.
The original Tune-A-Video code takes about 0.25 s per tuning step and 0.11 s per forward pass on
this model with 2 threads of a 2-core machine. Targets: `tune-a-video` no slower than that per step,
`ei2` within 1.2x of `tune-a-video`.

Stages are the library's own code paths: `ei2.tuning.tune` (forward under accelerate, MSE, backward,
grad clip, AdamW; with and without gradient checkpointing), `ei2.inversion.ddim_invert` (one forward
per step) and `ei2.inversion.ddim_sample` with classifier-free guidance (a batch of 2 per step).
Recipes are measured in alternating rounds, so a load change on a shared machine hits both alike;
the median of the rounds is reported.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/stages/bench_stages.py            # writes RESULTS.md
    PYTHONPATH=src python benchmarks/stages/bench_stages.py --rounds 1 --steps 3 --no-write   # smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = {"tuning step": 0.25, "forward": 0.11}  # Tune-A-Video's original code, same model and machine


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tiny_sd_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )


def measure(recipe: str, unet2d, scheduler, args, device) -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler

    from ei2.inversion import ddim_invert, ddim_sample
    from ei2.sampling import Sampling
    from ei2.models import VideoUNet
    from ei2.tuning import TuningConfig, tune

    vu = VideoUNet.from_2d(unet2d, recipe=recipe).to(device)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.frames, 16, 16, generator=g).to(device)
    text = torch.randn(1, 77, 32, generator=g).to(device)
    uncond = torch.randn(1, 77, 32, generator=g).to(device)
    out = {}
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    for checkpointing in (True, False):
        config = TuningConfig(steps=args.steps + 1, gradient_checkpointing=checkpointing)
        # the first step warms up (allocations, SVD of STAM's spectral norm); timed: the rest
        times = []
        last = [time.perf_counter()]

        def lap(step, loss):
            now = time.perf_counter()
            if step > 1:
                times.append(now - last[0])
            last[0] = now

        tune(vu, noise_scheduler, latents, text, config, progress=False, callback=lap)
        out[f"tuning step{' (grad ckpt)' if checkpointing else ''}"] = statistics.median(times)
    vu.eval()
    with torch.no_grad():
        vu(latents, 500, text)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            vu(latents, 500, text)
            times.append(time.perf_counter() - t)
    out["forward"] = statistics.median(times)
    ddim = DDIMScheduler.from_config(scheduler.config)
    t = time.perf_counter()
    inverted = ddim_invert(vu, ddim, latents, text, args.inference_steps)
    out["inversion"] = time.perf_counter() - t
    t = time.perf_counter()
    ddim_sample(vu, ddim, inverted, text, Sampling(args.inference_steps, guidance_scale=12.5), uncond)
    out["editing"] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["tune-a-video", "ei2"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed tuning steps / forward passes per round")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write RESULTS.md")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    unet2d = tiny_sd_unet()
    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {r: [] for r in args.recipes}
    for i in range(args.rounds):
        for recipe in args.recipes:
            result = measure(recipe, unet2d, scheduler, args, device)
            rounds[recipe].append(result)
            print(f"round {i + 1} {recipe}: " + ", ".join(f"{k} {v:.3f}s" for k, v in result.items()), flush=True)
    load_after = os.getloadavg()
    stages = list(rounds[args.recipes[0]][0])
    median = {r: {s: statistics.median(x[s] for x in rounds[r]) for s in stages} for r in args.recipes}

    command = "OMP_NUM_THREADS={} PYTHONPATH=src python benchmarks/stages/bench_stages.py {}".format(
        args.threads, " ".join(argv if argv is not None else sys.argv[1:])).strip()
    lines = [
        "# Stage timings: tuning step, inversion, editing (8 frames)", "",
        f"Command: `{command}`", "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, device {device}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(a shared machine: other jobs ran meanwhile).", "",
        f"Model: tiny SD-layout UNet (32,32,64,64; 1 layer/block; cross-attention dim 32; 8 heads; 16 norm groups), "
        f"latents (1, 4, {args.frames}, 16, 16), fp32. Median of {args.rounds} alternating rounds; per-step rows are "
        f"medians of {args.steps} steps; inversion and editing are {args.inference_steps} DDIM steps "
        "(editing with classifier-free guidance, batch 2).", "",
        "| stage | " + " | ".join(args.recipes) + " | " + (
            f"{args.recipes[1]} / {args.recipes[0]} | " if len(args.recipes) > 1 else "") + "Tune-A-Video original |",
        "|---" * (len(args.recipes) + 2 + (len(args.recipes) > 1)) + "|",
    ]
    for s in stages:
        row = f"| {s} | " + " | ".join(f"{median[r][s]:.3f} s" for r in args.recipes) + " | "
        if len(args.recipes) > 1:
            row += f"{median[args.recipes[1]][s] / median[args.recipes[0]][s]:.2f}x | "
        ref = REFERENCE.get(s.replace(" (grad ckpt)", "")) if s != "tuning step (grad ckpt)" else None
        row += (f"{ref:.2f} s |" if ref else "– |")
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        tmp = Path(args.results).with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

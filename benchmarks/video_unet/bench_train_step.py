"""Train-step time and activation memory of each recipe against the plain 2D UNet on the same frames.

    python benchmarks/video_unet/bench_train_step.py --frames 4 8 16 24 --out benchmarks/video_unet/RESULTS.md

Model: a tiny Stable-Diffusion-1.x-layout UNet (4 down blocks: 3 cross-attention + 1 plain, block_out_channels
32,32,64,64, 1 layer per block, cross_attention_dim 32, 8 heads, 16 norm groups), latents (1, 4, f, 32, 32), fp32.
A train step is forward, MSE, backward, AdamW step on the recipe's trainable tensors (the 2D UNet: the same
attn1/attn2 query maps, on the f frames as a batch). Rows are measured interleaved, median of --repeats.
Memory: on CUDA the peak allocated bytes; on CPU the bytes of tensors autograd saves for backward (activation
memory), counted with saved-tensor hooks. Also times the frame-attention processors alone at one level
(32x32 tokens, 64 channels) to show how their cost grows with frames.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ei2 import RECIPES, Recipe, VideoUNet
from ei2.models.context import VideoContext
from ei2.models.frame_attention import frame_attention_processor

EXTRA = {"full+stam (reference)": Recipe("full+stam", "full", "stam", "after-self")}


def tiny_sd_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


class SavedBytes:
    def __init__(self):
        self.total = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def make_step(model, video: bool, f: int, device, size: int):
    torch.manual_seed(1)
    x = torch.randn(1, 4, f, size, size, device=device)
    text = torch.randn(1, 8, 32, device=device)
    target = torch.randn_like(x)
    if video:
        params = model.set_trainable()
    else:
        model.requires_grad_(False)
        params = [p for n, p in model.named_parameters() if n.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))]
        for p in params:
            p.requires_grad_(True)
        x2d, text2d, target2d = x[0].permute(1, 0, 2, 3), text.repeat(f, 1, 1), target[0].permute(1, 0, 2, 3)
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        if video:
            loss = torch.nn.functional.mse_loss(model(x, 500, text).sample, target)
        else:
            loss = torch.nn.functional.mse_loss(model(x2d, 500, text2d).sample, target2d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def timed(step, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory(step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with SavedBytes() as saved:
        step()
    return saved.total


def ablation(f, device, size, repeats):
    """Where the time of `ei2` goes at f frames: the 2D UNet, then one module of the recipe switched on at a time."""
    base, ei2 = tiny_sd_unet().to(device), RECIPES["ei2"]
    variants = {
        "2D UNet (frames as batch)": None,
        "per-frame SA, no temporal, frame GroupNorm": dataclasses.replace(ei2, frame_attention="self", temporal="none",
                                                                          group_norm="frame"),
        "+ video GroupNorm": dataclasses.replace(ei2, frame_attention="self", temporal="none"),
        "+ STAM": dataclasses.replace(ei2, frame_attention="self"),
        "+ FFAM (= ei2)": ei2,
        "video GroupNorm + FFAM, no STAM": dataclasses.replace(ei2, temporal="none"),
        "video GroupNorm + SCA, no temporal": dataclasses.replace(ei2, frame_attention="sparse-causal", temporal="none"),
    }
    steps = {name: make_step(base if r is None else VideoUNet.from_2d(base, r).to(device), r is not None, f, device, size)
             for name, r in variants.items()}
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def attention_costs(frames, device, repeats):
    """Time of one frame-attention call at a 32x32 level with 64 channels, per processor."""
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=8, dim_head=8).to(device)
    ctx = VideoContext()
    rows = []
    for f in frames:
        ctx.set(f, 32, 32)
        hidden = torch.randn(f, 32 * 32, 64, device=device)
        row = {"frames": f}
        for kind in ("self", "sparse-causal", "ffam", "full"):
            attn.set_processor(frame_attention_processor(kind, ctx, 0, 2))
            with torch.no_grad():
                attn(hidden)
                row[kind] = timed(lambda: attn(hidden), device, repeats)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 24])
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = tiny_sd_unet().to(device)
    recipes = {**{name: RECIPES[name] for name in RECIPES}, **EXTRA}

    lines = [f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} CPU threads'}), "
             f"torch {torch.__version__}, latents (1, 4, f, {args.size}, {args.size}), fp32, median of {args.repeats}", ""]
    mem_label = "peak allocated MiB" if device.type == "cuda" else "saved activations MiB"
    lines += ["| frames | model | step s | × 2D | " + mem_label + " | × 2D |", "|---|---|---|---|---|---|"]
    for f in args.frames:
        models = {"2D UNet (frames as batch)": (base, False)}
        models.update({name: (VideoUNet.from_2d(base, r).to(device), True) for name, r in recipes.items()})
        steps = {name: make_step(m, video, f, device, args.size) for name, (m, video) in models.items()}
        for step in steps.values():  # warm up
            step()
        times = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so background load hits every row alike
            for name, step in steps.items():
                times[name].append(timed(step, device, 1))
        mems = {name: memory(step, device) for name, step in steps.items()}
        t2d, m2d = statistics.median(times["2D UNet (frames as batch)"]), mems["2D UNet (frames as batch)"]
        for name in steps:
            t = statistics.median(times[name])
            lines.append(f"| {f} | {name} | {t:.3f} | {t / t2d:.2f} | {mems[name] / 2**20:.1f} | {mems[name] / m2d:.2f} |")
        print("\n".join(lines[-len(steps):]), flush=True)

    ab = ablation(8, device, args.size, args.repeats)
    t2d = ab["2D UNet (frames as batch)"]
    lines += ["", "Where the time of `ei2` goes, 8 frames (same model and latents; each row one change):", "",
              "| model | step s | × 2D |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {t / t2d:.2f} |" for name, t in ab.items()]
    lines += ["", "Frame attention alone, one call at a 32×32 level, 64 channels, 8 heads (seconds):", "",
              "| frames | self | sparse-causal | ffam | full | ffam / self | full / self | predicted ffam / self |",
              "|---|---|---|---|---|---|---|---|"]
    for row in attention_costs(args.frames, device, args.repeats):
        f, n, m = row["frames"], 32 * 32, 16 * 16
        predicted = (n + (f - 1) * m) / n
        lines.append(f"| {f} | {row['self']:.4f} | {row['sparse-causal']:.4f} | {row['ffam']:.4f} | {row['full']:.4f} | "
                     f"{row['ffam'] / row['self']:.2f} | {row['full'] / row['self']:.2f} | {predicted:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Video UNet: train step and memory per recipe\n\nCommand:\n\n    python " +
                     " ".join(["benchmarks/video_unet/bench_train_step.py"] + __import__("sys").argv[1:]) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()

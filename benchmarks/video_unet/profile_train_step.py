"""Where one train step of a recipe spends its time, by module, against this machine's matmul rate (issue 18, item 4).

    python benchmarks/video_unet/profile_train_step.py --frames 8 24 --threads 2

Model and step as bench_vs_tav.py (bench_train_step.tiny_sd_unet inflated with --recipe, latents
(1, 4, f, size, size), fp32, forward + MSE + backward + clip_grad_norm_ + AdamW step). Per module group:
- time (torch.profiler, mean of --steps profiled steps after 2 warm-up steps and one of the profiler's): forward time is the span of the group's
  modules (forward hooks open and close a `record_function` range around each); backward time is the time of the
  autograd nodes those forward ranges created (matched by the profiler's sequence number), so the backward of
  every op is charged to the module whose forward made it; the optimiser is its own range (clip, step, zero_grad);
- FLOPs (torch.utils.flop_counter.FlopCounterMode, forward and backward, with the CPU flash-attention kernels
  counted as SDPA; the model's own, i.e. without frame attention's zero-padded head channels): matmul-class
  FLOPs only (mm, addmm, bmm, convolutions, SDPA); elementwise work, norms, softmax and the optimiser count 0;
- attention scores (one exp each in forward, one again in backward, which recomputes them);
- achieved rate = FLOPs / time, against the rate of a plain torch.mm (square fp32 and bf16 products, the best
  of a few sizes) measured in the same run with the same thread count.
Groups: frame attention (attn1: FFAM for `ei2`), temporal (STAM / TA), cross-attention (attn2), feed-forward,
ResNets (ResnetBlock2D with their GroupNorms), other (LayerNorms, proj_in/out, conv_in/out, down/upsamplers,
time embedding, loss; the remainder of forward and backward), optimiser.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as fc
from diffusers.models.resnet import ResnetBlock2D
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from ei2 import VideoUNet
from ei2.models import frame_attention
from ei2.models.video_unet import VideoTransformerBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import tiny_sd_unet  # noqa: E402
from bench_vs_tav import make_inputs  # noqa: E402

GROUPS = ("frame attention", "temporal", "cross-attention", "feed-forward", "ResNets", "other", "optimiser")
ATEN = torch.ops.aten
SDPA_CPU = {  # FlopCounterMode counts the CUDA SDPA kernels; these are the CPU ones, counted the same way
    ATEN._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v),
}


def module_groups(model: VideoUNet) -> dict[str, str]:
    """Qualified name (as FlopCounterMode writes it) -> group, for the modules that open a group."""
    groups = {}
    for name, m in model.unet.named_modules():
        if isinstance(m, VideoTransformerBlock):
            groups[f"{name}.attn1"] = "frame attention"
            groups[f"{name}.attn2"] = "cross-attention"
            groups[f"{name}.ff"] = "feed-forward"
            if m.temporal_name:
                groups[f"{name}.{m.temporal_name}"] = "temporal"
        elif isinstance(m, ResnetBlock2D):
            groups[name] = "ResNets"
    return {f"VideoUNet.unet.{k}": v for k, v in groups.items()}


@contextlib.contextmanager
def group_ranges(model: VideoUNet):
    """Open a `record_function("group::<g>")` range around the forward of each group's modules."""
    modules = dict(model.unet.named_modules())
    handles, open_ranges = [], []
    for qualified, group in module_groups(model).items():
        m = modules[qualified.removeprefix("VideoUNet.unet.")]

        def pre(mod, args, group=group):
            r = record_function(f"group::{group}")
            r.__enter__()
            open_ranges.append(r)

        def post(mod, args, out):
            open_ranges.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def make_step(model: VideoUNet, inputs, bf16=False):
    x, text, target = inputs
    params = model.set_trainable()
    opt = torch.optim.AdamW(params, lr=3e-5)

    def step():
        with record_function("step::forward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = model(x, 500, text).sample
            loss = F.mse_loss(pred.float(), target)
        with record_function("step::backward"):
            loss.backward()
        with record_function("group::optimiser"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def group_times(events, steps: int) -> dict[str, float]:
    """Seconds per step of each group, from the profiler's events (see the module docstring)."""
    seq_group, times = {}, defaultdict(float)
    totals = defaultdict(float)

    def walk(event, group):
        if event.sequence_nr is not None and event.sequence_nr >= 0:
            seq_group.setdefault(event.sequence_nr, group)
        for child in event.cpu_children:
            walk(child, group)

    for e in events:
        span = (e.time_range.end - e.time_range.start) / 1e6
        if e.name.startswith("group::"):
            group = e.name.removeprefix("group::")
            if group != "optimiser":
                walk(e, group)
            times[group] += span  # forward spans (groups do not nest), and the optimiser
        elif e.name.startswith("step::"):
            totals[e.name.removeprefix("step::")] += span
    backward = defaultdict(float)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function:"):
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("autograd::engine::evaluate_function:"):
                parent = parent.cpu_parent
            if parent is None:  # top-level backward nodes only; nested ones are inside their parent's span
                backward[seq_group.get(e.sequence_nr, "other")] += (e.time_range.end - e.time_range.start) / 1e6
    forward_groups = sum(t for g, t in times.items() if g != "optimiser")
    times["other"] = totals["forward"] - forward_groups
    for g, t in backward.items():
        times[g] += t
    times["backward unattributed"] = totals["backward"] - sum(backward.values())  # engine work outside the nodes
    times["other"] += times["backward unattributed"]
    out = {g: times[g] / steps for g in GROUPS}
    out["total"] = (totals["forward"] + totals["backward"] + times["optimiser"]) / steps
    out["forward"], out["backward"] = totals["forward"] / steps, totals["backward"] / steps
    out["backward unattributed"] = times["backward unattributed"] / steps
    return out


def _scores(q, k, *args, out_shape=None, **kwargs):
    return q[0] * q[1] * q[2] * k[2]  # B H L S: one exp per score


# every op counts 0 except SDPA, which counts its scores (forward: one exp each; backward: one, recomputed)
EXPS = {**{op: (lambda *a, **k: 0) for op in fc.flop_registry},
        ATEN._scaled_dot_product_flash_attention_for_cpu: _scores,
        ATEN._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, *a, **kw: _scores(q, k)}


def group_flops(model: VideoUNet, step, mapping=SDPA_CPU) -> dict[str, int]:
    """FLOPs (or with EXPS, attention scores) per group of one step: the model's own, so counted with the CPU head
    padding of frame attention off (its zero channels are work the kernel does, not FLOPs of the model)."""
    groups = module_groups(model)
    counter = fc.FlopCounterMode(display=False, custom_mapping=mapping)
    pad, frame_attention.CPU_HEAD_PAD = frame_attention.CPU_HEAD_PAD, 0
    try:
        with counter:
            step()
    finally:
        frame_attention.CPU_HEAD_PAD = pad
    counts = counter.get_flop_counts()
    flops = {g: 0 for g in GROUPS}
    for name, group in groups.items():
        flops[group] += sum(counts.get(name, {}).values())
    flops["other"] = counter.get_total_flops() - sum(flops.values())
    flops["total"] = counter.get_total_flops()
    return flops


def matmul_rate(threads: int) -> dict[str, float]:
    """GFLOP/s of a plain torch.mm of square matrices, best of a few sizes, fp32 and bf16."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (256, 512, 1024, 2048):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            reps = max(3, int(2e9 / (2 * n**3)))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b)
                times.append((time.perf_counter() - t0) / reps)
            rate = 2 * n**3 / min(times) / 1e9
            rates[f"{dtype}".removeprefix("torch.") + f" {n}"] = rate
            best = max(best, rate)
        rates[f"{dtype}".removeprefix("torch.")] = best
    return rates


def exp_rate() -> float:
    """G exp/s of torch.exp on 64k fp32 values in cache (as the attention kernel's blocks are), preallocated output:
    the elementwise bound of a softmax."""
    x, out = torch.randn(1 << 16), torch.empty(1 << 16)
    torch.exp(x, out=out)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            torch.exp(x, out=out)
        times.append((time.perf_counter() - t0) / 200)
    return x.numel() / min(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--recipe", default="ei2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--bf16", action="store_true", help="forward under CPU bf16 autocast")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = tiny_sd_unet()
    inputs = make_inputs(args.frames, args.size)
    rates = [(matmul_rate(args.threads), exp_rate())]
    measured = {}
    for f in args.frames:
        model = VideoUNet.from_2d(base, args.recipe)
        step = make_step(model, inputs[f], args.bf16)
        flops = group_flops(model, step)
        exps = group_flops(model, step, EXPS)
        for _ in range(2):
            step()
        plain = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t0)
        with group_ranges(model):
            # one step of profiler warm-up (not recorded), then --steps recorded
            with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=args.steps,
                                                                              repeat=1)) as prof:
                for _ in range(1 + args.steps):
                    step()
                    prof.step()
        measured[f] = {"times": group_times(prof.events(), args.steps), "flops": flops, "exps": exps,
                       "plain_step": statistics.median(plain)}
    # the rates again after the profiles; the best of both (other load on the machine only slows them down)
    rates.append((matmul_rate(args.threads), exp_rate()))
    mm = {k: max(r[0][k] for r in rates) for k in rates[0][0]}
    exp_gs = max(r[1] for r in rates)
    peak = mm["bfloat16" if args.bf16 else "float32"]
    lines = [f"torch {torch.__version__}, {args.threads} threads, recipe `{args.recipe}`, latents (1, 4, f, {args.size}, "
             f"{args.size}), {'bf16 autocast' if args.bf16 else 'fp32'}, mean of {args.steps} profiled steps", "",
             "torch.mm on this CPU, same run, best of before and after the profiles (GFLOP/s): " +
             ", ".join(f"{k}: {v:.0f}" for k, v in mm.items() if " " in k) +
             f"; best fp32 {mm['float32']:.0f}, bf16 {mm['bfloat16']:.0f}. torch.exp in cache: {exp_gs:.2f} G/s "
             f"(before {rates[0][1]:.2f}, after {rates[1][1]:.2f}).", "",
             "bound s = GFLOP / mm peak + attention scores (one exp each, forward and recomputed in backward) / exp "
             "rate: the time the part would take at the plain matmul and exp rates of this CPU.", ""]
    for f, r in measured.items():
        times, flops, exps = r["times"], r["flops"], r["exps"]
        lines += [f"**{f} frames**: step {r['plain_step']:.3f} s unprofiled (median of {args.steps}), "
                  f"{times['total']:.3f} s profiled (forward {times['forward']:.3f}, backward {times['backward']:.3f}, "
                  f"of it {times['backward unattributed']:.3f} outside autograd nodes); "
                  f"{flops['total'] / 1e9:.2f} GFLOP per step", "",
                  "| part | time s | share | GFLOP | share | GFLOP/s | × mm peak | M scores | bound s | time / bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in GROUPS + ("total",):
            t, fl, ex = times[g], flops[g], exps[g]
            rate = fl / t / 1e9 if t > 0 else 0.0
            bound = fl / (peak * 1e9) + ex / (exp_gs * 1e9)
            name = "**step**" if g == "total" else g
            lines.append(f"| {name} | {t:.4f} | {t / times['total']:.0%} | {fl / 1e9:.3f} | {fl / flops['total']:.0%} | "
                         f"{rate:.1f} | {rate / peak:.2f} | {ex / 1e6:.0f} | {bound:.4f} | "
                         + (f"{t / bound:.1f}×" if bound > 0 else "–") + " |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": mm, "exp_g_per_s": exp_gs, "rates": rates,
                                               "frames": measured}, indent=1))


if __name__ == "__main__":
    main()

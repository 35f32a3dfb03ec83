"""Train step of ei2 against Tune-A-Video's original code, side by side in one run (issue 18, item 4).

    python benchmarks/video_unet/bench_vs_tav.py --frames 8 24 --size 16 --repeats 15 --threads 2 --before --bf16

Needs Tune-A-Video's code and its own venv (--tav-src, --tav-python; how to make them: RESULTS.md, "Setup").

Rows, on the same 2D UNet (bench_train_step.tiny_sd_unet: the same config and the same weights), the same
latents (1, 4, f, size, size), text (1, 8, 32), fp32, no gradient checkpointing:
- Tune-A-Video's original UNet3DConditionModel (showlab/Tune-A-Video on diffusers 0.11.1), inflated by its own
  `from_pretrained_2d` from this 2D UNet, in its own venv: `tav_worker.py`, a subprocess this script drives;
- ei2's `tune-a-video` recipe and its `ei2` recipe (VideoUNet.from_2d of the same 2D UNet);
- the 2D UNet with the frames as a batch (the attn1/attn2 query maps trainable);
- with --compile / --bf16: the `ei2` recipe under torch.compile / under CPU bf16 autocast; with --before: the
  `tune-a-video` and `ei2` recipes as ei2 ran them before issue 18 (`as_before`: the same functions).
A train step is forward, MSE, backward, clip_grad_norm_, AdamW step on the recipe's trainable tensors
(Tune-A-Video: train_tuneavideo.py's attn1.to_q, attn2.to_q, attn_temp). The rows are timed interleaved (one step
of each row per repeat, so background load hits every row alike), each after --warmup steps; median of --repeats.
The Tune-A-Video worker times its own step (no pipe in the timing) with the same thread count.

Check that the comparison is like for like: ei2's `tune-a-video` recipe loaded with the worker's inflated weights
(`VideoUNet.load_tune_a_video`) must give Tune-A-Video's outputs; the largest difference is printed and written.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from ei2 import VideoUNet
from ei2.models import ShiftRestrictedTemporalAttention, TemporalAttention, frame_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import tiny_sd_unet  # noqa: E402

HERE = Path(__file__).resolve().parent
TAV_CONFIG_KEYS = (  # the arguments of Tune-A-Video's UNet3DConditionModel that this 2D config sets
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "dual_cross_attention",
    "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
)


def make_inputs(frames, size):
    inputs = {}
    for f in frames:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, f, size, size, generator=g)
        text = torch.randn(1, 8, 32, generator=g)
        inputs[f] = (x, text, torch.randn(x.shape, generator=g))
    return inputs


def write_2d(base, folder: Path):
    """The 2D UNet as Tune-A-Video's from_pretrained_2d reads it: config.json and diffusion_pytorch_model.bin."""
    config = {k: v for k, v in dict(base.config).items() if k in TAV_CONFIG_KEYS}
    config["mid_block_type"] = "UNetMidBlock3DCrossAttn"
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(base.state_dict(), folder / "diffusion_pytorch_model.bin")


class TavWorker:
    def __init__(self, python, src, model_dir, inputs_path, dump, threads):
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([python, str(HERE / "tav_worker.py"), "--tav-src", src], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.ask(cmd="load", model_dir=str(model_dir), inputs=str(inputs_path), dump=str(dump),
                             threads=threads)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("TAV "):
                return json.loads(line[4:])
        raise RuntimeError(f"Tune-A-Video worker exited with {self.proc.wait()}")

    def step_fn(self, f):
        return lambda: self.ask(cmd="step", frames=f)["t"]

    def close(self):
        try:
            self.ask(cmd="quit")
        finally:
            self.proc.wait(timeout=30)


def as_before(model: VideoUNet):
    """The model as ei2 ran it before issue 18, the same function: STAM and TA folded (b f) n c -> (b n) f c, through
    the diffusers Attention, unfolded; frame attention without the CPU head padding (`frame_attention.CPU_HEAD_PAD`
    is 0 while its step runs). Returns the model and a wrapper for its step function."""
    def stam(self, hidden_states):
        z = rearrange(hidden_states, "(b f) n c -> (b n) f c", f=self.context.num_frames)
        z = z + self.attn(self.centering(z))
        return rearrange(z, "(b n) f c -> (b f) n c", n=hidden_states.shape[1])

    def ta(self, hidden_states):
        z = rearrange(hidden_states, "(b f) n c -> (b n) f c", f=self.context.num_frames)
        z = z + self.attn(self.norm(z))
        return rearrange(z, "(b n) f c -> (b f) n c", n=hidden_states.shape[1])

    for m in model.modules():
        if isinstance(m, ShiftRestrictedTemporalAttention):
            m.forward = types.MethodType(stam, m)
        elif isinstance(m, TemporalAttention):
            m.forward = types.MethodType(ta, m)

    def wrap(step):
        def unpadded():
            pad = frame_attention.CPU_HEAD_PAD
            frame_attention.CPU_HEAD_PAD = 0
            try:
                return step()
            finally:
                frame_attention.CPU_HEAD_PAD = pad
        return unpadded

    return model, wrap


def local_step(model, video: bool, inputs, compile_model=False, bf16=False):
    """A train step on the given inputs; returns a function that runs it and returns its time."""
    x, text, target = inputs
    if video:
        params = model.set_trainable()
        net = torch.compile(model, dynamic=False) if compile_model else model
    else:
        model.requires_grad_(False)
        params = [p for n, p in model.named_parameters() if n.endswith(("attn1.to_q.weight", "attn2.to_q.weight"))]
        for p in params:
            p.requires_grad_(True)
        net = model
        f = x.shape[2]
        x, text, target = x[0].permute(1, 0, 2, 3), text.repeat(f, 1, 1), target[0].permute(1, 0, 2, 3)
    opt = torch.optim.AdamW(params, lr=3e-5)

    def step():
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = net(x, 500, text).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--repeats", type=int, default=17)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tav-python", default="/work/tav-venv/bin/python")
    parser.add_argument("--tav-src", default="/work/tav-src", help="checkout of showlab/Tune-A-Video")
    parser.add_argument("--compile", action="store_true", help="add a row: the ei2 recipe under torch.compile")
    parser.add_argument("--bf16", action="store_true", help="add a row: the ei2 recipe under CPU bf16 autocast")
    parser.add_argument("--before", action="store_true",
                        help="add rows: the tune-a-video and ei2 recipes as ei2 ran them before issue 18 (as_before)")
    parser.add_argument("--json", default=None, help="write the raw times here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = tiny_sd_unet()
    inputs = make_inputs(args.frames, args.size)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_2d(base, tmp)
        torch.save(inputs, tmp / "inputs.pt")
        worker = TavWorker(args.tav_python, args.tav_src, tmp, tmp / "inputs.pt", tmp / "dump.pt", args.threads)
        dump = torch.load(tmp / "dump.pt")
        try:
            # like for like: ei2's tune-a-video recipe with Tune-A-Video's own inflated weights gives its outputs
            check = VideoUNet.from_2d(base, "tune-a-video")
            check.load_tune_a_video(dump["state_dict"])
            with torch.no_grad():
                agreement = {f: (check(x, 500, text).sample - dump["outputs"][f]).abs().max().item()
                             for f, (x, text, _) in inputs.items()}
            print("ei2 tune-a-video with Tune-A-Video's weights, largest |difference| of outputs:", agreement, flush=True)
            del check
            results = {}
            for f in args.frames:
                rows = {
                    "Tune-A-Video original (diffusers 0.11.1)": worker.step_fn(f),
                    "ei2 `tune-a-video` recipe": local_step(VideoUNet.from_2d(base, "tune-a-video"), True, inputs[f]),
                    "ei2 `ei2` recipe": local_step(VideoUNet.from_2d(base, "ei2"), True, inputs[f]),
                    "2D UNet (frames as batch)": local_step(base, False, inputs[f]),
                }
                first = {}
                if args.before:
                    for recipe in ("tune-a-video", "ei2"):
                        model, wrap = as_before(VideoUNet.from_2d(base, recipe))
                        rows[f"ei2 `{recipe}` recipe as before issue 18"] = wrap(local_step(model, True, inputs[f]))
                if args.bf16:
                    rows["ei2 `ei2` recipe, bf16 autocast"] = local_step(VideoUNet.from_2d(base, "ei2"), True, inputs[f],
                                                                         bf16=True)
                if args.compile:
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()  # graphs and graph breaks of this frame count only
                    # every ResNet/attention frame after a graph break compiles once per shape: more than dynamo's
                    # default 8 shapes, after which it would silently run the rest eagerly
                    torch._dynamo.config.recompile_limit = 64
                    step = local_step(VideoUNet.from_2d(base, "ei2"), True, inputs[f], compile_model=True)
                    first["ei2 `ei2` recipe, torch.compile"] = step()  # compile time (forward and backward graphs)
                    stats = torch._dynamo.utils.counters
                    first["graphs"] = stats["stats"]["unique_graphs"]
                    first["graph breaks"] = sum(stats["graph_break"].values())
                    rows["ei2 `ei2` recipe, torch.compile"] = step
                for step in rows.values():
                    for _ in range(args.warmup):
                        step()
                times = {name: [] for name in rows}
                for r in range(args.repeats):
                    for name, step in rows.items():
                        times[name].append(step())
                    print(f"{f} frames, repeat {r + 1}/{args.repeats}: " +
                          ", ".join(f"{t[-1]:.3f}" for t in times.values()), flush=True)
                results[f] = {"median": {n: statistics.median(t) for n, t in times.items()}, "times": times,
                              "first_step": first}
                for name, t in results[f]["median"].items():
                    print(f"{f:3d} frames  {name:45s} {t:.3f} s", flush=True)
                if args.json:  # partial results survive a run stopped later
                    Path(args.json).write_text(json.dumps({"args": vars(args), "agreement": agreement,
                                                           "results": results}, indent=1))
        finally:
            worker.close()

    tav = "Tune-A-Video original (diffusers 0.11.1)"
    names = list(results[args.frames[0]]["median"])
    lines = [f"torch {torch.__version__} (both venvs: Tune-A-Video worker torch {worker.info['torch']}), "
             f"{args.threads} threads, latents (1, 4, f, {args.size}, {args.size}), fp32 unless marked, "
             f"median of {args.repeats} interleaved steps after {args.warmup} warm-up steps", "",
             "| train step | " + " | ".join(f"{f} frames" for f in args.frames) + " |",
             "|---|" + "---|" * len(args.frames)]
    for name in names:
        cells = []
        for f in args.frames:
            t, t_tav = results[f]["median"][name], results[f]["median"][tav]
            cells.append(f"{t:.3f} s" if name == tav else f"{t:.3f} s ({t / t_tav:.2f}×)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for f in args.frames:
        first = results[f]["first_step"]
        for name, t in first.items():
            if name not in ("graphs", "graph breaks"):
                lines.append(f"\n{name}, {f} frames: first step (compiling forward and backward) {t:.1f} s; "
                             f"{first['graphs']} graphs, {first['graph breaks']} graph breaks")
    lines.append("\nei2 `tune-a-video` recipe loaded with Tune-A-Video's inflated weights, largest |output difference| "
                 "to Tune-A-Video's UNet: " + ", ".join(f"{agreement[f]:.1e} ({f} frames)" for f in args.frames))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "agreement": agreement, "results": results}, indent=1))


if __name__ == "__main__":
    main()

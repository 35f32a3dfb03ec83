"""Tuning shared across processes (issue 18, item 2): time per tuning step on 1 and 2 processes.

    OMP_NUM_THREADS=1 python benchmarks/tuning/bench_processes.py --frames 24 --window 8 --steps 20 --warmup 4

The bundled Shapes model (`assets/shapes-sd`, 64x64, recipe `ei2`) is tuned on a 24-frame Shapes video (a red
circle moving right and back) in clips of `--window` frames, gradient checkpointing on, fp32 on the CPU, as `ei2
tune` does. Each configuration runs in fresh processes; a step's time is the wall time between two `tune`
callbacks of rank 0 (the all_reduce of the gradients included), the median over the steps after `--warmup`:

- 1 process, 1 thread, 1 micro-batch per step (`ei2 tune` as it was);
- 1 process, 1 thread, `gradient_accumulation` 2: the same 2 micro-batches per step as 2 processes;
- 2 processes (`accelerate launch --multi_gpu --num_processes 2`, gloo), 1 thread each, 1 micro-batch each;
- with `--two-threads`: 1 process, 2 threads, `gradient_accumulation` 2 (the same cores as 2 processes; on a
  machine shared with other jobs 2 OpenMP threads can run many times slower than 1).

Rows go to stdout and `results/processes.json`. The speed-up of N processes is bounded by the cores: on a
machine with 2 cores it cannot exceed 2x for 2 processes, and only if nothing else runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parents[1]
PROMPT = "a red circle on a gray background"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def scene_video(num_frames: int) -> np.ndarray:
    """(f, 64, 64, 3) uint8: a red circle going right and back across a gray background."""
    from ei2.shapes.world import BACKGROUND_NAMES, COLOR_NAMES, RESOLUTION, SHAPES, Scenes, render

    size = 9.0
    lo, hi = size + 3, RESOLUTION - size - 3
    phase = np.linspace(0.0, 2.0, num_frames)
    cx = lo + (hi - lo) * np.where(phase < 1, phase, 2 - phase)
    cy = np.full(num_frames, RESOLUTION / 2)
    return render(Scenes(color=COLOR_NAMES.index("red"), shape=SHAPES.index("circle"),
                         background=BACKGROUND_NAMES.index("gray"), cx=cx, cy=cy, size=size))


def worker(args) -> None:
    """One configuration, in this process (or in each process of a launch): tune, time the steps."""
    import torch
    from diffusers import DDPMScheduler

    from ei2.pipeline import EI2Pipeline
    from ei2.tuning import TuningConfig, tune

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = EI2Pipeline.from_pretrained(None, recipe="ei2", device="cpu")
    latents = pipe.encode_frames(scene_video(args.frames))
    text = pipe.encode_prompt(PROMPT).expand(latents.shape[0], -1, -1)
    marks = [time.perf_counter()]
    config = TuningConfig(steps=args.steps, learning_rate=3e-5, window=args.window, seed=0,
                          gradient_accumulation=args.accumulation, gradient_checkpointing=True)
    result = tune(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), latents, text, config,
                  progress=False, callback=lambda step, loss: marks.append(time.perf_counter()), across_processes=True)
    steps = np.diff(marks)[args.warmup:]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({
            "processes": result.processes, "threads_per_process": args.threads,
            "gradient_accumulation": args.accumulation, "micro_batches_per_step": result.micro_batches,
            "step_s_median": round(float(statistics.median(steps)), 4),
            "step_s_mean": round(float(np.mean(steps)), 4),
            "micro_batch_s": round(float(statistics.median(steps)) / result.micro_batches, 4),
            "timed_steps": len(steps), "last_loss": round(result.losses[-1], 5),
        }), flush=True)


def run(args) -> None:
    base = [str(Path(__file__).resolve()), "_worker", "--frames", str(args.frames), "--window", str(args.window),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    configurations = [  # (label, launcher, threads, accumulation)
        ("1 process, 1 thread", [sys.executable], 1, 1),
        ("1 process, 1 thread, accumulation 2", [sys.executable], 1, 2),
        ("2 processes, 1 thread each", LAUNCH, 1, 1),
    ]
    if args.two_threads:
        configurations.append(("1 process, 2 threads, accumulation 2", [sys.executable], 2, 2))
    rows = []
    for label, launcher, threads, accumulation in configurations:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": str(REPO / "src")}
        command = [*launcher, *base, "--threads", str(threads), "--accumulation", str(accumulation)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        row = {"configuration": label, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "processes.json").write_text(json.dumps({
        "frames": args.frames, "window": args.window, "steps": args.steps, "warmup": args.warmup,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "_worker"))
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--two-threads", action="store_true", help="also 1 process with 2 threads, accumulation 2")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.mode == "_worker" else run(args)


if __name__ == "__main__":
    main()

"""How Gaussian the DDIM-inverted noise of the Shapes benchmark videos is: x_T's std per frame (N(0, 1) noise: 1).

    python benchmarks/shapes/inverted_noise.py                          # the bundled Shapes model
    python benchmarks/shapes/inverted_noise.py --model /tmp/v2/shapes-sd --noise-regularization

Each of the 12 videos of `--spec`, untuned (the inflated `ei2` model), inverted under its source prompt with
25 DDIM steps on the model's own schedule. Prints the mean, min and max over the 96 frames of the per-frame std
of x_T, and the mean per-frame |mean|.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    from ei2.bench.spec import load_spec
    from ei2.inversion import NoiseRegularization
    from ei2.pipeline import EI2Pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(REPO / "benchmarks" / "shapes" / "spec.yaml"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--noise-regularization", action="store_true")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    pipe = EI2Pipeline.from_pretrained(args.model, recipe="ei2", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_noise_regularization(NoiseRegularization() if args.noise_regularization else None)
    stds, means = [], []
    for video in spec.videos:
        frames, _, _ = video.load({"frames": 8, "stride": 1, "start": 0}, pipe.default_size)
        x_t = pipe.invert(frames, video.source_prompt, num_inference_steps=args.inference_steps, use_cache=False)
        per_frame = x_t[0].transpose(0, 1).flatten(1)  # f, (c h w)
        stds.append(per_frame.std(1).numpy())
        means.append(per_frame.mean(1).abs().numpy())
    stds, means = np.concatenate(stds), np.concatenate(means)
    sched = pipe.scheduler.config
    print(f"model {args.model or 'shapes-sd (bundled)'}: {sched.prediction_type}, zero SNR "
          f"{bool(sched.get('rescale_betas_zero_snr'))}, spacing {sched.get('timestep_spacing')}, noise "
          f"regularisation {args.noise_regularization}")
    print(f"x_T std per frame over {len(stds)} frames: mean {stds.mean():.3f}, min {stds.min():.3f}, "
          f"max {stds.max():.3f}; |mean| per frame {means.mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

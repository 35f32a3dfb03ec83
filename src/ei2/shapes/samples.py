"""The bundled sample videos of `assets/samples/`: rendered Shapes videos, as mp4, with captions.

    python -m ei2.shapes.samples [--out assets/samples]

Each sample is `<name>.mp4` (8 frames, 64x64, 8 fps) with its caption in `<name>.txt`; `index.json`
lists them all with their ground truth (motion, colour, shape, background, per-frame centre and size).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..video import write_mp4
from .world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, ShapesVideo, caption, render, video_scenes

REPO = Path(__file__).resolve().parents[3]
SAMPLES_DIR = REPO / "assets" / "samples"
NUM_FRAMES = 8
FPS = 8.0

# name: (motion, colour, shape, background, seed); the first is the demo's source video
SAMPLES = {
    "red_circle_right": ("right", "red", "circle", "gray", 1),
    "blue_square_down": ("down", "blue", "square", "black", 2),
    "green_triangle_circling": ("circular", "green", "triangle", "white", 3),
    "yellow_diamond_bouncing": ("bouncing", "yellow", "diamond", "gray", 4),
    "purple_circle_diagonal": ("diagonal", "purple", "circle", "black", 5),
    "orange_square_growing": ("growing", "orange", "square", "white", 6),
    "green_square_left_background": ("left", "green", "square", "gray", 7),  # the demo's background edit
}


def sample_video(name: str, num_frames: int = NUM_FRAMES):
    """(frames (f, 64, 64, 3) uint8, ShapesVideo ground truth) of a named sample."""
    motion, color, shape, background, seed = SAMPLES[name]
    scenes = video_scenes(motion, num_frames, COLOR_NAMES.index(color), SHAPES.index(shape),
                          BACKGROUND_NAMES.index(background), seed=seed)
    return render(scenes), ShapesVideo(motion, scenes, caption(color, shape, background, motion))


def write_samples(out: str | Path = SAMPLES_DIR) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name in SAMPLES:
        frames, truth = sample_video(name)
        write_mp4(frames, out / f"{name}.mp4", fps=FPS)
        (out / f"{name}.txt").write_text(truth.caption + "\n")
        index[name] = {"video": f"{name}.mp4", "fps": FPS, "frames": NUM_FRAMES, **truth.as_dict()}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / "index.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ei2.shapes.samples", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SAMPLES_DIR))
    args = parser.parse_args(argv)
    print(f"wrote {write_samples(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

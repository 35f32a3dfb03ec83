"""Gallery of a finished Shapes benchmark run: each row a source video or one recipe's edit of it, 8 frames.

    python benchmarks/shapes/gallery.py outputs/bench-shapes benchmarks/shapes/results/gallery-seed0.png
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ei2.video import read_video

RECIPES = ["ei2", "ei2-after-cross", "tune-a-video", "tune-a-video+stam", "ei2-ta", "untuned"]
ROWS = [("red-circle-right", "01-color"), ("green-square-left", "02-shape"), ("orange-square-circular", "03-background")]
LABEL = 200


def strip(path: Path) -> np.ndarray:
    frames = read_video(path).frames[:8]
    return np.concatenate(list(frames), axis=1)


def main(run: str, out: str, seed: int = 0) -> None:
    jobs = Path(run) / "jobs"
    rows = []
    for video, edit in ROWS:
        rows.append((f"{video} source", strip(jobs / f"{video}--ei2--s{seed}" / "source.gif")))
        for recipe in RECIPES:
            rows.append((f"{recipe} ({edit[3:]})", strip(jobs / f"{video}--{recipe}--s{seed}" / "edits" / f"{edit}.gif")))
    height, width = rows[0][1].shape[:2]
    canvas = Image.new("RGB", (LABEL + width, height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(rows):
        canvas.paste(Image.fromarray(image), (LABEL, i * height))
        draw.text((4, i * height + height // 2 - 6), label, fill="black")
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""The Shapes world (DESIGN §3): seeded, vectorised renders of one coloured shape on a flat background.

A scene is one shape: colour, kind, background, centre (cx, cy) in pixels and size = half its
bounding box's side. Pixel (row i, column j) covers [j, j+1) x [i, i+1); edges are anti-aliased
from a signed distance, so the rendered bounding box of a shape is exactly
[cx - size, cx + size] x [cy - size, cy + size].

    scenes = random_scenes(1000, seed=0)       # a Scenes batch, every field shaped (n,)
    frames = render(scenes)                    # (n, 64, 64, 3) uint8
    scenes.captions()                          # ["a red circle on a gray background", ...]

Videos are scenes per frame: `random_video(seed)` -> (frames (f, 64, 64, 3) uint8, ShapesVideo).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

RESOLUTION = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
COLOR_RGB = np.array(list(COLORS.values()), dtype=np.float32)
BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)

# Motions of the videos, with the phrase a caption uses for each.
MOTIONS: dict[str, str] = {
    "right": "moving right",
    "left": "moving left",
    "up": "moving up",
    "down": "moving down",
    "diagonal": "moving diagonally",
    "circular": "circling",
    "bouncing": "bouncing",
    "growing": "growing",
}
MIN_SIZE, MAX_SIZE = 7.0, 15.0  # half-side of the bounding box, pixels (images)
MARGIN = 2.0  # pixels kept free between a shape and the frame's edge


def caption(color: str, shape: str, background: str, motion: str | None = None) -> str:
    """"a red circle on a gray background", or with a motion "a red circle moving right on a gray background"."""
    article = "an" if color[0] in "aeiou" else "a"
    verb = f" {MOTIONS[motion]}" if motion else ""
    return f"{article} {color} {shape}{verb} on a {background} background"


def all_captions(motion: str | None = None) -> list[str]:
    """Every (colour, shape, background) caption, in the order of `class_index`."""
    return [caption(c, s, b, motion) for c in COLOR_NAMES for s in SHAPES for b in BACKGROUND_NAMES]


def class_index(color: np.ndarray, shape: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Index into `all_captions()` of (colour, shape, background) indices."""
    return (np.asarray(color) * len(SHAPES) + np.asarray(shape)) * len(BACKGROUNDS) + np.asarray(background)


def caption_words() -> list[str]:
    """Every word any caption of this world uses."""
    words = {"a", "an", "on", "background", *COLOR_NAMES, *SHAPES, *BACKGROUND_NAMES}
    for phrase in MOTIONS.values():
        words.update(phrase.split())
    return sorted(words)


@dataclass
class Scenes:
    """A batch of scenes; every field is an array shaped (n,)."""

    color: np.ndarray  # int, index into COLOR_NAMES
    shape: np.ndarray  # int, index into SHAPES
    background: np.ndarray  # int, index into BACKGROUND_NAMES
    cx: np.ndarray  # float, pixels
    cy: np.ndarray  # float, pixels
    size: np.ndarray  # float, half-side of the bounding box, pixels

    def __post_init__(self):
        n = max(np.size(getattr(self, f.name)) for f in fields(self))
        for f in fields(self):
            value = np.broadcast_to(np.asarray(getattr(self, f.name)), (n,))
            setattr(self, f.name, value.astype(np.int64 if f.name in ("color", "shape", "background") else np.float32))

    def __len__(self) -> int:
        return len(self.color)

    def __getitem__(self, index) -> "Scenes":
        return Scenes(**{f.name: np.atleast_1d(getattr(self, f.name)[index]) for f in fields(self)})

    def captions(self, motion: str | None = None) -> list[str]:
        return [
            caption(COLOR_NAMES[c], SHAPES[s], BACKGROUND_NAMES[b], motion)
            for c, s, b in zip(self.color, self.shape, self.background)
        ]

    def class_index(self) -> np.ndarray:
        return class_index(self.color, self.shape, self.background)


def random_scenes(n: int, seed: int | np.random.Generator = 0, min_size: float = MIN_SIZE, max_size: float = MAX_SIZE) -> Scenes:
    """n scenes with uniform colour, shape, background, size, and a centre that keeps the shape inside."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(min_size, max_size, n)
    lo, hi = size + MARGIN, RESOLUTION - size - MARGIN
    return Scenes(
        color=rng.integers(len(COLORS), size=n),
        shape=rng.integers(len(SHAPES), size=n),
        background=rng.integers(len(BACKGROUNDS), size=n),
        cx=rng.uniform(lo, hi),
        cy=rng.uniform(lo, hi),
        size=size,
    )


def _signed_distance(shape: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of one kind of shape; dx, dy are (n, h, w), r is (n, 1, 1)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if SHAPES[shape] == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if SHAPES[shape] == "square":
        return np.maximum(adx, ady) - r
    if SHAPES[shape] == "triangle":  # pointing up: apex (0, -r), base y = +r from x = -r to +r
        return np.maximum(dy - r, (2 * adx - dy - r) * np.float32(1 / np.sqrt(5)))
    return (adx + ady - r) * np.float32(1 / np.sqrt(2))  # diamond


def render(scenes: Scenes, resolution: int = RESOLUTION, chunk: int = 4096) -> np.ndarray:
    """Render scenes to (n, resolution, resolution, 3) uint8 frames."""
    n = len(scenes)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    centers = np.arange(resolution, dtype=np.float32) + 0.5
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        dx = np.broadcast_to(centers[None, None, :] - scenes.cx[sl, None, None], (sl.stop - sl.start, resolution, resolution))
        dy = np.broadcast_to(centers[None, :, None] - scenes.cy[sl, None, None], (sl.stop - sl.start, resolution, resolution))
        dist = np.empty((sl.stop - sl.start, resolution, resolution), np.float32)
        for k in range(len(SHAPES)):
            idx = np.flatnonzero(scenes.shape[sl] == k)
            if len(idx):
                dist[idx] = _signed_distance(k, dx[idx], dy[idx], scenes.size[sl][idx, None, None])
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # (n, h, w, 1), one pixel of anti-aliasing
        fg = COLOR_RGB[scenes.color[sl]][:, None, None, :]
        bg = BACKGROUND_RGB[scenes.background[sl]][:, None, None, :]
        out[sl] = np.rint(bg + alpha * (fg - bg)).astype(np.uint8)
    return out


def degrade(frames: np.ndarray, seed: int | np.random.Generator = 0, blur: float = 0.6, noise: float = 4.0) -> np.ndarray:
    """Mild Gaussian blur (sigma in pixels) and Gaussian noise (std in 0..255 units) on uint8 frames."""
    rng = np.random.default_rng(seed)
    x = frames.astype(np.float32)
    if blur > 0:
        radius = int(np.ceil(3 * blur))
        k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur) ** 2)
        k = (k / k.sum()).astype(np.float32)
        for axis in (-3, -2):  # rows, then columns, with edge padding
            pad = [(0, 0)] * x.ndim
            pad[axis] = (radius, radius)
            xp = np.pad(x, pad, mode="edge")
            length = x.shape[axis]
            x = sum(w * np.take(xp, np.arange(i, i + length), axis=axis) for i, w in enumerate(k))
    x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass
class ShapesVideo:
    """Ground truth of a rendered video: the motion and the scene of every frame."""

    motion: str
    scenes: Scenes  # one entry per frame
    caption: str = field(default="")

    def as_dict(self) -> dict:
        return {
            "caption": self.caption,
            "motion": self.motion,
            "color": COLOR_NAMES[int(self.scenes.color[0])],
            "shape": SHAPES[int(self.scenes.shape[0])],
            "background": BACKGROUND_NAMES[int(self.scenes.background[0])],
            "cx": [round(float(v), 3) for v in self.scenes.cx],
            "cy": [round(float(v), 3) for v in self.scenes.cy],
            "size": [round(float(v), 3) for v in self.scenes.size],
        }


def video_scenes(
    motion: str, num_frames: int = 8, color: int = 0, shape: int = 0, background: int = 0,
    seed: int | np.random.Generator = 0,
) -> Scenes:
    """Per-frame scenes of one shape following `motion` (a key of MOTIONS) inside the frame."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    if not 2 <= num_frames <= 64:
        raise ValueError(f"num_frames={num_frames}; use 2 to 64 frames (8 to 16 is typical)")
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
    r = np.float32(rng.uniform(8.0, 11.0))
    lo, hi = r + MARGIN, RESOLUTION - r - MARGIN
    cx = np.full(num_frames, rng.uniform(lo + 4, hi - 4), np.float32)
    cy = np.full(num_frames, rng.uniform(lo + 4, hi - 4), np.float32)
    size = np.full(num_frames, r, np.float32)
    travel = np.float32(rng.uniform(0.6, 0.9) * (hi - lo))
    start = np.float32(rng.uniform(lo, hi - travel))
    if motion in ("right", "left", "up", "down", "diagonal"):
        path = start + travel * (t if motion in ("right", "down", "diagonal") else 1 - t)
        if motion in ("right", "left", "diagonal"):
            cx = path
        if motion in ("up", "down"):
            cy = path
        if motion == "diagonal":
            cy = np.float32(rng.uniform(lo, hi - travel)) + travel * t
    elif motion == "circular":
        radius = np.float32(rng.uniform(8.0, (hi - lo) / 2))
        ox, oy = rng.uniform(lo + radius, hi - radius, 2).astype(np.float32)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        angle = phase + 2 * np.pi * t * (num_frames - 1) / num_frames
        cx, cy = ox + radius * np.cos(angle), oy + radius * np.sin(angle)
    elif motion == "bouncing":
        bounces = 2 if num_frames >= 12 else 1
        cy = hi - travel * np.abs(np.sin(np.pi * bounces * t))
    elif motion == "growing":
        size = np.float32(6.0) + (r + np.float32(4.0) - 6.0) * t
        lo, hi = r + 4 + MARGIN, RESOLUTION - r - 4 - MARGIN
        cx = np.full(num_frames, rng.uniform(lo, hi), np.float32)
        cy = np.full(num_frames, rng.uniform(lo, hi), np.float32)
    return Scenes(color=color, shape=shape, background=background, cx=cx, cy=cy, size=size)


def random_video(seed: int = 0, num_frames: int = 8, motion: str | None = None) -> tuple[np.ndarray, ShapesVideo]:
    """A random video: (frames (f, 64, 64, 3) uint8, its ground truth with the caption)."""
    rng = np.random.default_rng(seed)
    motion = motion or str(rng.choice(list(MOTIONS)))
    c, s, b = (int(rng.integers(k)) for k in (len(COLORS), len(SHAPES), len(BACKGROUNDS)))
    scenes = video_scenes(motion, num_frames, c, s, b, seed=rng)
    truth = ShapesVideo(motion, scenes, caption(COLOR_NAMES[c], SHAPES[s], BACKGROUND_NAMES[b], motion))
    return render(scenes), truth

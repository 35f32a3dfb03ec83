"""Structure maps of a video, one per frame, for a ControlNet (DESIGN §1.12).

Every kind takes `(f, h, w, 3)` uint8 frames and returns `(f, h, w, 3)` uint8 maps (a map is an image, as
ControlNet annotators return them); `as_condition` turns maps into the ControlNet's input, `(f, 3, h, w)`
float in [0, 1].

    maps = canny(frames, low=50, high=100)      # OpenCV's Canny on the RGB frames (binary edges)
    maps = softedge(frames)                     # weight-free soft edges (below)
    maps = layout(frames)                       # where things are and how big, not their outline (below)
    maps = depth(frames, "path/to/dpt-model")   # transformers' depth estimation, local weights only
    maps = user_maps("maps/", num_frames=8, size=(512, 512))   # a folder of images or a video

`softedge` is the gradient magnitude of the Gaussian-smoothed frame (sigma 1 px), the largest over R, G, B,
divided by the magnitude a full-contrast (0 -> 255) step edge gives, and clipped to [0, 1]. HED and PiDiNet,
the soft-edge annotators of ControlNet, need network weights that cannot be downloaded here; this map needs
none. It keeps what Canny throws away (how strong an edge is, and a continuous profile across it), and its
fixed scale (no per-frame normalisation) keeps the maps of a video from flickering.

`layout` is the Canny map low-passed with a Gaussian of sigma = 1/10 of the frame's short side, in units of
three straight 1-px edges low-passed the same way (clipped to [0, 1]). It keeps where the edges are and how far
they reach (an object's place and size) and drops their outline: a circle and a square of the same size give
nearly the same blob; binary edges make it independent of contrast (a new background leaves it alone). Edges and soft edges hold the source's outline, so an edit that changes a shape
fights them; this map is for such edits (the role of ControlNet's coarse conditions, scribble and
segmentation, which need annotator weights).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelError

CANNY_LOW, CANNY_HIGH = 50, 100  # OpenCV thresholds, as ControlNet's canny annotator and diffusers' examples
SOFTEDGE_SIGMA = 1.0
LAYOUT_FRACTION = 0.1  # layout's low-pass sigma, as a fraction of the frame's short side


def _check(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (f, h, w, 3) uint8, not {frames.shape} {frames.dtype}")
    return frames


def canny(frames: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """OpenCV Canny edges of each RGB frame (largest gradient over the channels), as 3-channel 0/255 maps."""
    import cv2

    frames = _check(frames)
    if not 0 <= low <= high:
        raise ConfigError(f"canny thresholds must satisfy 0 <= low <= high, not low={low}, high={high}")
    edges = np.stack([cv2.Canny(np.ascontiguousarray(f), low, high) for f in frames])
    return np.repeat(edges[..., None], 3, axis=-1)


def _step_response(sigma: float) -> float:
    """Sobel magnitude at the centre of a smoothed 0 -> 255 step edge: the map's unit."""
    import cv2

    step = np.zeros((33, 33), np.float32)
    step[:, 16:] = 255.0
    step = cv2.GaussianBlur(step, (0, 0), sigma) if sigma > 0 else step
    gx = cv2.Sobel(step, cv2.CV_32F, 1, 0, ksize=3)
    return float(gx.max())


def softedge(frames: np.ndarray, sigma: float = SOFTEDGE_SIGMA) -> np.ndarray:
    """Weight-free soft edges (module docstring): |grad| of the smoothed frame / a full step's, in [0, 255]."""
    import cv2

    frames = _check(frames)
    if not sigma >= 0:
        raise ConfigError(f"softedge sigma must be >= 0, not {sigma}")
    unit = _step_response(sigma)
    out = np.empty(frames.shape[:3], np.uint8)
    for i, f in enumerate(frames):
        x = f.astype(np.float32)
        if sigma > 0:
            x = cv2.GaussianBlur(x, (0, 0), sigma)
        gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
        mag = np.sqrt(gx * gx + gy * gy).max(axis=-1)
        out[i] = np.clip(np.rint(mag / unit * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


LAYOUT_UNIT = 3.0  # layout's unit: three straight edges' worth of low-passed edge (no object saturates)


def layout(frames: np.ndarray, fraction: float = LAYOUT_FRACTION) -> np.ndarray:
    """Where things are, not their outline (module docstring): Canny edges low-passed at sigma = fraction of
    the short side, in units of LAYOUT_UNIT straight 1-px edges low-passed the same way, in [0, 255]."""
    import cv2

    frames = _check(frames)
    if not 0 < fraction <= 1:
        raise ConfigError(f"layout fraction must be in (0, 1], not {fraction}")
    blur = fraction * min(frames.shape[1:3])
    n = 2 * int(4 * blur) + 3
    line = np.zeros((n, n), np.float32)
    line[:, n // 2] = 1.0
    unit = LAYOUT_UNIT * float(cv2.GaussianBlur(line, (0, 0), blur).max())
    edges = canny(frames)[..., 0].astype(np.float32) / 255.0
    out = np.stack([cv2.GaussianBlur(e, (0, 0), blur) for e in edges]) / unit
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def load_depth_estimator(model: str | os.PathLike):
    """transformers' depth-estimation pipeline from a local folder or the Hugging Face cache (never downloaded)."""
    from transformers import pipeline

    try:
        return pipeline("depth-estimation", model=str(model), model_kwargs={"local_files_only": True})
    except Exception as e:  # OSError, ValueError, ...: the model is not here
        raise ModelError(
            f"cannot load the depth model {str(model)!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local folder of a transformers depth-estimation model (e.g. Intel/dpt-hybrid-midas saved with "
            "save_pretrained) or an id already in your Hugging Face cache") from None


def depth(frames: np.ndarray, estimator) -> np.ndarray:
    """Relative depth per frame from a transformers depth-estimation pipeline (or a model path to load one),
    min-max normalised over the whole video (one scale for every frame), near = bright."""
    from PIL import Image

    frames = _check(frames)
    if isinstance(estimator, (str, os.PathLike)):
        estimator = load_depth_estimator(estimator)
    h, w = frames.shape[1:3]
    raw = []
    for f in frames:
        d = estimator(Image.fromarray(f))["predicted_depth"]
        d = np.asarray(d.float().cpu() if hasattr(d, "cpu") else d, dtype=np.float32).squeeze()
        raw.append(_resize_float(d, (h, w)))
    raw = np.stack(raw)
    lo, hi = float(raw.min()), float(raw.max())
    norm = (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
    out = np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1)


def _resize_float(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if x.shape == tuple(size):
        return x
    return cv2.resize(x, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def user_maps(path: str | os.PathLike, num_frames: int, size: tuple[int, int], stride: int = 1,
              start: int = 0) -> np.ndarray:
    """Maps the user brings: a folder of images or a video, sampled like the source (start, stride) and
    resized/centre-cropped to the frames' (h, w); it must hold at least `num_frames` maps."""
    from ..video import read_video, VideoError

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"control maps {path} do not exist; pass a folder of images, a video, or a kind "
                          f"({', '.join(KINDS)})")
    try:
        video = read_video(path, num_frames=num_frames, stride=stride, start=start, size=size)
    except VideoError as e:
        raise ConfigError(f"control maps {path}: {e}") from None
    return video.frames


def as_condition(maps: np.ndarray):
    """(f, h, w, 3) uint8 maps -> (f, 3, h, w) float32 tensor in [0, 1], the ControlNet's input."""
    import torch

    maps = _check(maps)
    return torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 3, 1, 2).float().div(255.0)


# The kinds computed from the source frames (user maps are a path instead of a kind).
KINDS = ("canny", "softedge", "layout", "depth")


def compute(kind: str, frames: np.ndarray, depth_model: str | os.PathLike | None = None,
            canny_low: int = CANNY_LOW, canny_high: int = CANNY_HIGH) -> np.ndarray:
    """The maps of one kind for the frames."""
    if kind == "canny":
        return canny(frames, canny_low, canny_high)
    if kind == "softedge":
        return softedge(frames)
    if kind == "layout":
        return layout(frames)
    if kind == "depth":
        if depth_model is None:
            raise ConfigError("the depth condition needs a depth model: pass --depth-model PATH_OR_ID (a local "
                              "transformers depth-estimation folder or an id in your Hugging Face cache)")
        return depth(frames, depth_model)
    raise ConfigError(f"unknown condition kind {kind!r}; use one of {', '.join(KINDS)} or a path to maps")

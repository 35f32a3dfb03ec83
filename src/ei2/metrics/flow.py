"""Warp error: a pixel-level temporal consistency metric with no learned model.

For each pair of consecutive frames (x_t, x_{t+1}), OpenCV's Farnebäck optical flow gives the backward
flow F from frame t+1 to frame t; frame t is warped along it, W(x_t)(p) = x_t(p + F(p)), and compared with
frame t+1 over the pixels that are visible in both (the warp lands inside the frame and the forward and
backward flows agree: |F_b + F_f∘(id + F_b)|² <= 0.01 (|F_b|² + |F_f|²) + 0.5, as Lai et al. (ECCV 2018),
"Learning Blind Video Temporal Consistency", mask occlusions):

    warp_error = mean_t mean_{p visible} |x_{t+1}(p) - W(x_t)(p)|      (RGB, 0..255 units)

Lower is smoother. The flow can come from another video of the same size (`flow_frames`, e.g. the
source video: then the metric also asks whether the edit moves as the source does).
"""
from __future__ import annotations

import numpy as np

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=5, poly_n=5, poly_sigma=1.1, flags=0)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the warp error needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def _gray(frame: np.ndarray) -> np.ndarray:
    return _cv2().cvtColor(np.ascontiguousarray(frame), _cv2().COLOR_RGB2GRAY)


def optical_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Farnebäck flow (h, w, 2) as (dx, dy) with a(p) ≈ b(p + flow(p)); a, b are (h, w, 3) uint8 RGB."""
    return _cv2().calcOpticalFlowFarneback(_gray(a), _gray(b), None, **FARNEBACK)


def _sample(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image(p + flow(p)) by bilinear interpolation (border replicated)."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def visible_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Pixels of frame t+1 whose backward flow lands inside frame t and agrees with the forward flow."""
    h, w = backward.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    x, y = gx + backward[..., 0], gy + backward[..., 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    forward_there = _sample(forward.astype(np.float32), backward)
    gap = ((backward + forward_there) ** 2).sum(-1)
    scale = (backward ** 2).sum(-1) + (forward_there ** 2).sum(-1)
    return inside & (gap <= 0.01 * scale + 0.5)


def warp_errors(frames: np.ndarray, flow_frames: np.ndarray | None = None) -> np.ndarray:
    """Warp error of each consecutive pair, (f - 1,) in 0..255 units; flow from `flow_frames` (default: frames)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (f, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
    flow_frames = frames if flow_frames is None else np.asarray(flow_frames)
    if flow_frames.shape != frames.shape:
        raise ValueError(f"flow frames {flow_frames.shape} and frames {frames.shape} must have the same shape")
    errors = []
    for t in range(len(frames) - 1):
        backward = optical_flow(flow_frames[t + 1], flow_frames[t])
        forward = optical_flow(flow_frames[t], flow_frames[t + 1])
        mask = visible_mask(backward, forward)
        warped = _sample(frames[t].astype(np.float32), backward)
        diff = np.abs(frames[t + 1].astype(np.float32) - warped).mean(-1)
        errors.append(float(diff[mask].mean()) if mask.any() else float("nan"))
    return np.array(errors)


def warp_error(frames: np.ndarray, flow_frames: np.ndarray | None = None) -> float:
    """Mean warp error over consecutive pairs (see the module docstring); NaN for a single frame."""
    errors = warp_errors(frames, flow_frames)
    errors = errors[np.isfinite(errors)]
    return float(errors.mean()) if errors.size else float("nan")


def flow_metrics(frames: np.ndarray, source_frames: np.ndarray | None = None) -> dict[str, float]:
    """`warp_err` (flow of the edit itself) and, with the source, `warp_err_src` (the source's flow)."""
    out = {"warp_err": warp_error(frames)}
    if source_frames is not None and np.shape(source_frames) == np.shape(frames):
        out["warp_err_src"] = warp_error(frames, source_frames)
    return out

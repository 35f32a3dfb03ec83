"""The Shapes oracle: reads colour, shape, background, centre and size back from 64x64 frames.

Recipe (DESIGN §3), vectorised over a batch of frames:
1. background = median of the border pixels, nearest background palette entry;
2. foreground = pixels far (> 60 in RGB) from that border colour; colour = median of the foreground,
   nearest shape palette entry;
3. object mask = pixels nearer the found colour than the background along the line between them
   (half coverage, so anti-aliased edges count by half), cleaned of specks by a morphological
   opening; its bounding box gives centre and size (= half the box's larger side);
4. shape from how much of its bounding box the mask fills (square ~1, circle ~0.79,
   triangle/diamond ~0.5) and how much of it lies in the box's upper half (triangle ~0.25, others 0.5).
5. collapsed frames: a frame that decoded to texture instead of one shape on a flat background reports
   no object (`found` False, `collapsed` True), so that metrics count it as a failed frame. Texture is
   any of: a border that is not flat (< 80% of border pixels near the background colour), a foreground
   larger than 40% of the frame (the largest shape covers 22%), a foreground of many colours (< 50% of
   it nearest the object's palette colour) or a scattered one (< 60% of it in the object's region).

    reading = read_frames(frames)     # frames (n, 64, 64, 3) uint8 -> Reading of arrays shaped (n,)
    reading.color_names()             # ["red", ...]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import BACKGROUND_NAMES, BACKGROUND_RGB, COLOR_NAMES, COLOR_RGB, SHAPES

FOREGROUND_DISTANCE = 60.0
# collapse (texture) thresholds, step 5 of the recipe
FLAT_BORDER, MAX_FOREGROUND, MIN_PURITY, MIN_COHERENCE = 0.8, 0.4, 0.5, 0.6
# (fill of the bounding box, share of the area in the box's upper half) of each shape, in SHAPES order
SHAPE_FEATURES = np.array([[np.pi / 4, 0.5], [1.0, 0.5], [0.5, 0.25], [0.5, 0.5]], dtype=np.float32)
FEATURE_SCALE = np.array([0.1, 0.08], dtype=np.float32)


@dataclass
class Reading:
    """What the oracle read from each frame; arrays shaped (n,). `found` is False for frames with no object."""

    color: np.ndarray  # int index into COLOR_NAMES
    shape: np.ndarray  # int index into SHAPES
    background: np.ndarray  # int index into BACKGROUND_NAMES
    cx: np.ndarray  # float, pixels
    cy: np.ndarray
    size: np.ndarray  # half of the bounding box's larger side, pixels
    found: np.ndarray  # bool
    fill: np.ndarray  # feature values, for diagnostics
    top_share: np.ndarray
    collapsed: np.ndarray | None = None  # bool: the frame is texture, not a shape (then found is False)

    def __len__(self) -> int:
        return len(self.color)

    def color_names(self) -> list[str]:
        return [COLOR_NAMES[i] for i in self.color]

    def shape_names(self) -> list[str]:
        return [SHAPES[i] if ok else "none" for i, ok in zip(self.shape, self.found)]

    def background_names(self) -> list[str]:
        return [BACKGROUND_NAMES[i] for i in self.background]


def _shift_or(mask: np.ndarray, op) -> np.ndarray:
    """3x3 dilation (op=np.logical_or) or erosion (op=np.logical_and) of (n, h, w) bool masks, separably."""
    fill = op is np.logical_and  # outside the frame counts as set for erosion, so edges do not erode
    p = np.pad(mask, ((0, 0), (1, 1), (0, 0)), constant_values=fill)
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    p = np.pad(rows, ((0, 0), (0, 0), (1, 1)), constant_values=fill)
    return op(op(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)


def read_frames(frames: np.ndarray) -> Reading:
    """Read (n, h, w, 3) or (h, w, 3) uint8 frames."""
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames have shape {x.shape}; pass (n, h, w, 3) or (h, w, 3) RGB frames")
    x = x.astype(np.float32)
    n, h, w, _ = x.shape
    # 1. background from the border
    border = np.concatenate([x[:, :2].reshape(n, -1, 3), x[:, -2:].reshape(n, -1, 3),
                             x[:, 2:-2, :2].reshape(n, -1, 3), x[:, 2:-2, -2:].reshape(n, -1, 3)], axis=1)
    bg = np.median(border, axis=1)  # (n, 3)
    background = _nearest(bg, BACKGROUND_RGB)
    # 2. colour of the far-from-background pixels: the palette colour most of them are nearest to,
    #    then the mean of the pixels that voted for it (the object's colour as rendered or generated)
    diff = x - bg[:, None, None, :]
    fg = (diff * diff).sum(-1) > FOREGROUND_DISTANCE ** 2  # (n, h, w)
    found = fg.reshape(n, -1).sum(1) >= 4
    border_diff = border - bg[:, None, :]
    flat_border = ((border_diff * border_diff).sum(-1) <= FOREGROUND_DISTANCE ** 2).mean(1)
    pix = x.reshape(n, -1, 3)
    d2 = (pix * pix).sum(-1)[..., None] - 2 * pix @ COLOR_RGB.T + (COLOR_RGB * COLOR_RGB).sum(-1)  # (n, hw, k)
    vote = d2.argmin(-1)  # (n, hw)
    onehot = (vote[..., None] == np.arange(len(COLOR_RGB))) & fg.reshape(n, -1, 1)
    color = onehot.sum(1).argmax(1)
    chosen = onehot[np.arange(n), :, color]  # (n, hw)
    obj = (pix * chosen[..., None]).sum(1) / np.maximum(chosen.sum(1), 1)[:, None]
    obj = np.where(found[:, None], obj, bg)
    # 3. object mask: at least half way from the background to the object's colour
    axis = obj - bg
    denom = np.maximum((axis ** 2).sum(-1), 1.0)[:, None, None]
    t = (diff * axis[:, None, None, :]).sum(-1) / denom
    mask = (t > 0.5) & found[:, None, None]
    opened = _shift_or(_shift_or(mask, np.logical_and), np.logical_or)
    region = _shift_or(_shift_or(opened, np.logical_or), np.logical_or)
    mask &= region
    # 5. texture instead of a shape: reported as no object
    fg_count = np.maximum(fg.reshape(n, -1).sum(1), 1)
    purity = (chosen & fg.reshape(n, -1)).sum(1) / fg_count
    coherence = (fg & region).reshape(n, -1).sum(1) / fg_count
    collapsed = found & ((flat_border < FLAT_BORDER) | (fg_count > MAX_FOREGROUND * h * w)
                         | (purity < MIN_PURITY) | (coherence < MIN_COHERENCE))
    found &= ~collapsed
    mask &= found[:, None, None]
    rows, cols = mask.any(2), mask.any(1)
    found &= rows.any(1)
    top = np.where(found, rows.argmax(1), 0)
    bottom = np.where(found, h - rows[:, ::-1].argmax(1), 1)
    left = np.where(found, cols.argmax(1), 0)
    right = np.where(found, w - cols[:, ::-1].argmax(1), 1)
    bw, bh = (right - left).astype(np.float32), (bottom - top).astype(np.float32)
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    area = mask.reshape(n, -1).sum(1).astype(np.float32)
    # 4. shape from fill and the share of the area above the box's middle (half rows count by half)
    fill = area / np.maximum(bw * bh, 1.0)
    row_area = mask.sum(2).astype(np.float32)  # (n, h)
    row_index = np.arange(h, dtype=np.float32)[None] + 0.5
    weight = np.clip(cy[:, None] - (row_index - 0.5), 0.0, 1.0)  # coverage of each row by the upper half
    top_share = (row_area * weight).sum(1) / np.maximum(area, 1.0)
    features = np.stack([fill, top_share], 1)
    shape = np.argmin((((features[:, None] - SHAPE_FEATURES[None]) / FEATURE_SCALE) ** 2).sum(-1), axis=1)
    return Reading(color=color, shape=shape, background=background, cx=cx.astype(np.float32),
                   cy=cy.astype(np.float32), size=np.maximum(bw, bh) / 2.0, found=found, fill=fill,
                   top_share=top_share, collapsed=collapsed)


def attribute_accuracy(reading: Reading, color, shape, background) -> dict[str, float]:
    """Share of frames where the oracle found the given colour, shape and background (index arrays)."""
    ok_color = reading.found & (reading.color == np.asarray(color))
    ok_shape = reading.found & (reading.shape == np.asarray(shape))
    ok_bg = reading.background == np.asarray(background)
    return {
        "color": float(ok_color.mean()),
        "shape": float(ok_shape.mean()),
        "background": float(ok_bg.mean()),
        "all": float((ok_color & ok_shape & ok_bg).mean()),
    }

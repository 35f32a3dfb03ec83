"""Shapes oracle metrics of an edited video: ground truth instead of a learned judge (DESIGN §3).

The oracle (`ei2.shapes.oracle.read_frames`) reads colour, shape, background and centre from each
frame. Against the target prompt and the source video:

- **edit accuracy** per attribute: share of frames showing the target's colour / shape / background
  (`acc_color`, `acc_shape`, `acc_background`, `acc_all` for all three at once); `edit_acc` averages
  the attributes the edit changes, `keep_acc` those it should keep;
- **structure preservation**: `centre_err`, mean distance in pixels between the edited object's centre
  and the source's centre in the same frame (over frames where an object was found; `found` is
  their share); `path_kept`, 1 when every frame has an object and the mean distance is within 4 px;
  `collapsed`, the share of frames that decoded to texture (the oracle reports no object there);
- **attribute flicker**: share of frames that disagree with the clip's majority value, averaged over
  colour, shape and background (0 for a clip that never changes; no object counts as its own value).

    target = parse_caption("a blue circle moving right on a gray background")
    oracle_metrics(edited, target, source_frames=source, source=parse_caption(source_prompt))
"""
from __future__ import annotations

import numpy as np

from ..shapes.oracle import Reading, read_frames
from ..shapes.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES

ATTRIBUTES = ("color", "shape", "background")
PATH_PX = 4.0  # an edit keeps the source's path when its mean centre error is within this many pixels
_VOCAB = {"color": COLOR_NAMES, "shape": SHAPES, "background": BACKGROUND_NAMES}


def parse_caption(text: str) -> dict[str, str | None]:
    """Colour, shape and background named in a Shapes caption (None where it names none).

    The background is the colour word right before "background"; the object colour is the first other
    colour word: "a white square on a black background" -> white, square, black.
    """
    words = text.lower().replace(",", " ").split()
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    for i, w in enumerate(words):
        if w == "background" and i > 0 and words[i - 1] in BACKGROUND_NAMES:
            out["background"] = words[i - 1]
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if out["color"] is None and w in COLOR_NAMES and nxt != "background":
            out["color"] = w
        if out["shape"] is None and w in SHAPES:
            out["shape"] = w
    return out


def is_shapes_caption(text: str) -> bool:
    """True when the caption names a colour, a shape and a background of the Shapes world."""
    return all(v is not None for v in parse_caption(text).values())


def _values(reading: Reading, attribute: str) -> np.ndarray:
    v = getattr(reading, attribute).astype(np.int64)
    return v if attribute == "background" else np.where(reading.found, v, -1)


def flicker(values: np.ndarray) -> float:
    """Share of entries that differ from the most common value."""
    values = np.asarray(values)
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    return float(1.0 - counts.max() / values.size)


def oracle_metrics(
    frames: np.ndarray,
    target: dict[str, str | None] | str,
    *,
    source: dict[str, str | None] | str | None = None,
    source_frames: np.ndarray | None = None,
    source_centres: np.ndarray | None = None,
) -> dict[str, float]:
    """Oracle metrics of an edited Shapes video (f, h, w, 3) uint8.

    `target`/`source`: captions or parsed attributes. The source trajectory is `source_centres`
    (f, 2) as (cx, cy) in pixels (e.g. the renderer's ground truth), else read from `source_frames`.
    """
    target = parse_caption(target) if isinstance(target, str) else dict(target)
    source = parse_caption(source) if isinstance(source, str) else (dict(source) if source else None)
    reading = read_frames(frames)
    out: dict[str, float] = {}
    hits = []
    for attr in ATTRIBUTES:
        if target.get(attr) is None:
            continue
        want = _VOCAB[attr].index(target[attr])
        ok = _values(reading, attr) == want
        out[f"acc_{attr}"] = float(ok.mean())
        hits.append(ok)
    if len(hits) == len(ATTRIBUTES):
        out["acc_all"] = float(np.logical_and.reduce(hits).mean())
    if source is not None:
        changed = [a for a in ATTRIBUTES if target.get(a) and source.get(a) and target[a] != source[a]]
        kept = [a for a in ATTRIBUTES if target.get(a) and source.get(a) and target[a] == source[a]]
        if changed:
            out["edit_acc"] = float(np.mean([out[f"acc_{a}"] for a in changed]))
        if kept:
            out["keep_acc"] = float(np.mean([out[f"acc_{a}"] for a in kept]))
    if source_centres is None and source_frames is not None:
        src = read_frames(source_frames)
        source_centres = np.where(src.found[:, None], np.stack([src.cx, src.cy], 1), np.nan)
    out["found"] = float(reading.found.mean())
    out["collapsed"] = float(reading.collapsed.mean())
    if source_centres is not None:
        source_centres = np.asarray(source_centres, dtype=np.float64)
        if source_centres.shape != (len(reading), 2):
            raise ValueError(f"source centres have shape {source_centres.shape}; expected ({len(reading)}, 2)")
        dist = np.hypot(reading.cx - source_centres[:, 0], reading.cy - source_centres[:, 1])
        valid = reading.found & np.isfinite(dist)
        out["centre_err"] = float(dist[valid].mean()) if valid.any() else float("nan")
        # the edit keeps the path: an object in every frame, mean centre error within PATH_PX
        out["path_kept"] = float(bool(valid.all()) and float(dist.mean()) <= PATH_PX)
    out["flicker"] = float(np.mean([flicker(_values(reading, a)) for a in ATTRIBUTES]))
    return out

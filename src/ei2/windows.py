"""Long videos: overlapping windows, anchor frames and per-step merges (DESIGN §1.10).

A video of f frames longer than a window of w frames is covered by windows starting every `stride`
frames (default w // 2), the last one aligned to the end of the video:

    starts = 0, stride, 2 stride, ..., f - w

At every DDIM step of inversion and of sampling, `WindowedUNet` runs the UNet on every window (the
latents of frames s..s+w-1, `b c f h w -> b c w h w`), and merges each frame's model output from the
windows that hold it, with weights that sum to 1 per frame:

    eps[:, :, i] = sum_k  weight[k, i - s_k] * eps_k[:, :, i - s_k]        (i in window k)

The weights are a triangular ramp across each window, min(j + 1, w - j) for position j, normalised per
frame, so a frame near the edge of one window leans on the window where it sits in the middle. The DDIM
update is affine in eps (and v-prediction is affine in the model output), so merging the outputs is
merging the next latents: every window starts each step from the same merged latents, and no seam is
ever sampled. With w >= f nothing is windowed: callers use the plain UNet (`Windowing.applies`).

Anchor frames: a few frames evenly spaced over the whole video (`anchor_indices`) are run through the
UNet once per step, alone ("record"), and every frame-attention layer with FFAM keeps their coarse keys
and values (`VideoContext.anchor_tokens`); each window's FFAM then adds those tokens to every frame's
keys/values ("attend"), the same set for every window, so content is tied across the whole video. STAM,
TA and the video GroupNorm see the window only. No new weights.

Controls: the Prompt-to-Prompt controller and the structure-preserving injection see each window's
batch in turn (windows are then not stacked in one batch); their step counters advance once per DDIM
step, in the sampler's callback, not once per window. The cross-attention maps a controller stores for
one step are merged over the windows with the same weights, so they are maps of the whole video.

Under `accelerate launch --multi_gpu --num_processes N` (torch.distributed initialised), process r runs windows
r, r + N, ... and the partial merges (outputs and controllers' maps) are summed with one `all_reduce` at every
step, in a layout every process agrees on (a process with no window adds zeros): the same result as one
process.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from einops import rearrange

from . import defaults
from .control.processors import ControlledCrossAttention, ControlledFrameAttention
from .distributed import processes
from .errors import SettingError
from .models.video_unet import VideoUNetOutput


# ---------------------------------------------------------------------------------------------- geometry
def window_starts(num_frames: int, window: int, stride: int | None = None) -> list[int]:
    """First frame of every window: every `stride` frames (default window // 2), the last one ending at the end."""
    if window >= num_frames:
        return [0]
    stride = stride or max(1, window // 2)
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] != num_frames - window:
        starts.append(num_frames - window)
    return starts


def window_ramp(window: int) -> torch.Tensor:
    """Unnormalised weight of each position of a window: min(j + 1, w - j), a triangle, > 0 everywhere."""
    j = torch.arange(window, dtype=torch.float64)
    return torch.minimum(j + 1, window - j)


def merge_weights(num_frames: int, window: int, starts: list[int]) -> torch.Tensor:
    """(windows, window) fp32: weight of each window's output for each of its frames; they sum to 1 per frame."""
    window = min(window, num_frames)
    ramp = window_ramp(window)
    total = torch.zeros(num_frames, dtype=torch.float64)
    for s in starts:
        total[s : s + window] += ramp
    if (total == 0).any():
        raise ValueError(f"windows {starts} of {window} frames leave frames of {num_frames} uncovered")
    return torch.stack([ramp / total[s : s + window] for s in starts]).float()


def anchor_indices(num_frames: int, count: int) -> list[int]:
    """`count` frames evenly spaced over the video, first and last included (one: the middle frame)."""
    count = min(count, num_frames)
    if count <= 0:
        return []
    if count == 1:
        return [num_frames // 2]
    return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})


@dataclass(frozen=True)
class Windowing:
    """How a long video is cut: windows of `window` frames every `stride` (None: window // 2), `anchors` anchor
    frames, `batch` windows per UNet call."""

    window: int = defaults.WINDOW
    stride: int | None = None
    anchors: int = defaults.ANCHOR_FRAMES
    batch: int = defaults.WINDOW_BATCH

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise SettingError("window", f"must be at least 2 frames (a window of {self.window!r} has no frames to "
                                         f"share), got {self.window!r}")
        if self.stride is not None and not 1 <= self.stride <= self.window:
            raise SettingError("window_stride", f"must be between 1 and the window ({self.window}), got {self.stride}")
        if self.anchors < 0:
            raise SettingError("anchor_frames", f"must be 0 or more, got {self.anchors}")
        if self.batch < 1:
            raise SettingError("window_batch", f"must be at least 1 window per UNet call, got {self.batch}")

    def applies(self, num_frames: int) -> bool:
        """True when a video of `num_frames` is longer than one window (else it is edited in one piece)."""
        return self.window < num_frames

    def starts(self, num_frames: int) -> list[int]:
        return window_starts(num_frames, self.window, self.stride)

    def key(self, num_frames: int) -> str:
        """Part of a cache key: empty when nothing is windowed (the keys of unwindowed edits are unchanged)."""
        if not self.applies(num_frames):
            return ""
        return f"windows:{self.window}/{self.stride or max(1, self.window // 2)}/{self.anchors}"

    def record(self, num_frames: int) -> dict:
        """What run.json records."""
        starts = self.starts(num_frames) if self.applies(num_frames) else [0]
        return {**dataclasses.asdict(self), "stride": self.stride or max(1, self.window // 2),
                "windowed": self.applies(num_frames), "windows": len(starts), "starts": starts,
                "anchor_frames": anchor_indices(num_frames, self.anchors) if self.applies(num_frames) else []}


# ---------------------------------------------------------------------------------------------- the windowed UNet
@contextlib.contextmanager
def anchor_mode(context, mode: str | None):
    """Put a VideoContext in anchor mode "record" or "attend" for one forward pass."""
    previous = context.anchor_mode
    context.anchor_mode = mode
    try:
        yield context
    finally:
        context.anchor_mode = previous


def _processors(video_unet):
    inner = getattr(video_unet, "unet", None)
    return list(inner.attn_processors.values()) if inner is not None and hasattr(inner, "attn_processors") else []


class WindowedUNet:
    """A VideoUNet called window by window; its output is the merge of the windows' outputs (module docstring).

    Same call as the VideoUNet: `(sample (b, c, f, h, w), timestep, encoder_hidden_states (b, L, D))`. Every
    other attribute (`unet`, `context`, `parameters`, `requires_grad_`, ...) is the VideoUNet's, so samplers,
    null-text inversion and attention control take it in place of the UNet.
    `on_window(k, n)` is called before window k (1-based) of n, e.g. to show it on a progress bar.
    """

    def __init__(self, unet, windowing: Windowing, num_frames: int,
                 on_window: Callable[[int, int], None] | None = None):
        if not windowing.applies(num_frames):
            raise ValueError(f"{num_frames} frames fit in one window of {windowing.window}: use the UNet itself")
        self.video_unet = unet
        self.windowing = windowing
        self.num_frames = num_frames
        self.starts = windowing.starts(num_frames)
        self.weights = merge_weights(num_frames, windowing.window, self.starts)  # n w
        recipe = getattr(unet, "recipe", None)
        ffam = recipe is None or recipe.frame_attention == "ffam"  # only FFAM reads anchors
        self.anchors = anchor_indices(num_frames, windowing.anchors) if ffam else []
        self.on_window = on_window

    def __getattr__(self, name):
        return getattr(self.__dict__["video_unet"], name)

    def __call__(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None, control=None,
                 return_dict=True):
        """`control` (a structure condition over the whole video's frames) is sliced like `sample`: each window,
        and the anchor pass, gets the maps of its own frames."""
        b, _, f = sample.shape[:3]
        if f != self.num_frames:
            raise ValueError(f"windowed UNet made for {self.num_frames} frames got {f}")
        unet, context, w = self.video_unet, self.video_unet.context, self.windowing.window
        timestep = torch.as_tensor(timestep, device=sample.device)
        processors = _processors(unet)
        controllers = {id(p.controller): p.controller for p in processors if isinstance(p, ControlledCrossAttention)}
        controlled = any(isinstance(p, (ControlledCrossAttention, ControlledFrameAttention)) for p in processors)
        # controllers read one window's batch layout; a structure condition gives each window its own maps
        per_call = 1 if controlled or control is not None else self.windowing.batch
        # windows are shared out among processes, merged by all_reduce; not under autograd (null-text
        # inversion), where every process runs every window so that gradients are whole
        rank, world = (0, 1) if torch.is_grad_enabled() else processes()
        mine = [k for k in range(len(self.starts)) if k % world == rank]

        def run(x, t, text, frames):
            inputs = {} if control is None else {"control": control.select_frames(frames)}
            return unet(x, t, text, cross_attention_kwargs=cross_attention_kwargs, **inputs).sample

        # 1. Anchors: their coarse keys/values at every FFAM layer, for this step (their output is not used)
        context.anchor_tokens = {}
        if self.anchors:
            with anchor_mode(context, "record"):
                run(sample[:, :, self.anchors], timestep, encoder_hidden_states, self.anchors)
            for c in controllers.values():
                c.take_step_maps()  # the anchor pass is not a step of the video: its maps are not kept
        # 2. Every window (stacked `per_call` at a time in the batch), merged with weights summing to 1 per frame
        out, maps = None, {}
        try:
            for first in range(0, len(mine), per_call):
                group = mine[first : first + per_call]
                if self.on_window is not None:
                    self.on_window(group[-1] + 1, len(self.starts))
                n = len(group)
                x = torch.cat([sample[:, :, self.starts[k] : self.starts[k] + w] for k in group])  # (n b) c w h w
                t = timestep.repeat(n) if timestep.ndim == 1 and timestep.shape[0] == b else timestep
                with anchor_mode(context, "attend" if self.anchors else None):
                    eps = run(x, t, encoder_hidden_states.repeat(n, 1, 1),
                              slice(self.starts[group[0]], self.starts[group[0]] + w))  # one window when controlled
                eps = rearrange(eps.float(), "(n b) c w h v -> n b c w h v", n=n)
                if out is None:
                    out = sample.new_zeros((b, *eps.shape[2:3], f, *eps.shape[4:]), dtype=torch.float32)
                for j, k in enumerate(group):
                    s, weight = self.starts[k], self.weights[k].to(sample.device)
                    frames = torch.arange(s, s + w, device=sample.device)
                    out = out.index_add(2, frames, eps[j] * weight[None, None, :, None, None])  # b c f h w
                    for c in controllers.values():  # this window's maps, p w n L, into the whole video's
                        for place, m in c.take_step_maps().items():
                            full = maps.setdefault((id(c), place), m.new_zeros((m.shape[0], f, *m.shape[2:])))
                            full.index_add_(1, frames.to(m.device), m * weight.to(m)[None, :, None, None])
        finally:
            context.anchor_tokens = {}
        if world > 1:
            out, maps = _sum_over_processes(out, maps, list(controllers), sample,
                                            share_layout=len(self.starts) < world)
        for cid, c in controllers.items():
            c.put_step_maps({place: m for (owner, place), m in maps.items() if owner == cid})
        return VideoUNetOutput(sample=out) if return_dict else (out,)


def _sum_over_processes(out, maps, controller_ids, sample, share_layout):
    """Sum every process's partial merges (`out`, b c f h w, and the controllers' maps) with one `all_reduce`.

    Every process makes the same collective calls, whichever windows it ran: the tensors are flattened into
    one in an agreed layout, the output first, then the maps sorted by (controller, layer name), a process
    without a map (or without any window) putting zeros in its place. The layout is the same in every process
    that ran a window (the same controllers and layers see every window); when some process ran none
    (`share_layout`: more processes than windows), rank 0, which always runs window 0, sends it to all.
    Returns the summed `out` and `maps`, keyed as `maps` is.
    """
    index = {cid: i for i, cid in enumerate(controller_ids)}  # controllers in the UNet's processor order
    layout = sorted(((index[cid], place, tuple(m.shape)) for (cid, place), m in maps.items()),
                    key=lambda entry: (entry[0], entry[1].name))
    out_shape = None if out is None else tuple(out.shape)
    if share_layout:
        box = [(out_shape, layout)]
        torch.distributed.broadcast_object_list(box, src=0, device=sample.device)
        out_shape, layout = box[0]
    if out is None:  # more processes than windows: this one adds nothing
        out = sample.new_zeros(out_shape, dtype=torch.float32)
    parts = [out]
    for i, place, shape in layout:
        m = maps.get((controller_ids[i], place))
        parts.append(out.new_zeros(shape) if m is None else m.to(out))
    flat = torch.cat([part.reshape(-1) for part in parts])
    torch.distributed.all_reduce(flat)
    pieces = flat.split([part.numel() for part in parts])
    summed = {(controller_ids[i], place): piece.view(shape) for (i, place, shape), piece in zip(layout, pieces[1:])}
    return pieces[0].view(out.shape), summed  # fp32, as the controllers store their maps

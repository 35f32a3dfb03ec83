"""Shape of the video being processed, shared by every inflated layer of one VideoUNet.

The UNet folds frames into the batch once, at entry: `b c f h w -> (b f) c h w`. Layers that mix
frames (frame attention, temporal modules, video GroupNorm) need `f`, and frame attention needs the
exact spatial grid of its UNet level: diffusers halves a side with ceil at every downsampler, so
level k of an (h, w) latent is ceil(h / 2^k) x ceil(w / 2^k), odd sizes included.

Long videos (DESIGN §1.10, `ei2.windows`): the context also carries the anchor frames shared by every
window. `anchor_mode` is None (no anchors: every layer works as without windows), "record" (a forward
pass over the anchor frames: FFAM keeps each layer's coarse keys/values in `anchor_tokens`) or "attend"
(a forward pass over one window: FFAM adds those tokens to every frame's keys/values).
"""
from __future__ import annotations


def level_grid(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """(h, w) of UNet level `level` of an (h, w) latent: diffusers halves each side with ceil at every downsampler."""
    h, w = latent_size
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class VideoContext:
    def __init__(self):
        self.num_frames = 1
        self.latent_size = None  # (h, w) of the UNet input
        self.anchor_mode: str | None = None  # None, "record" or "attend" (DESIGN §1.10)
        self.anchor_tokens: dict = {}  # frame-attention processor -> (b, a, m, c) coarse keys/values of the anchors

    def set(self, num_frames: int, height: int, width: int) -> None:
        self.num_frames = num_frames
        self.latent_size = (height, width)

    def grid(self, level: int, num_tokens: int) -> tuple[int, int]:
        """Spatial grid (h_k, w_k) of UNet level `level`; checked against the token count."""
        if self.latent_size is None:
            raise RuntimeError("VideoContext.grid called outside a VideoUNet forward")
        h, w = level_grid(self.latent_size, level)
        if h * w != num_tokens:
            raise RuntimeError(f"level {level} of a {self.latent_size} latent is {h}x{w}, but got {num_tokens} tokens")
        return h, w

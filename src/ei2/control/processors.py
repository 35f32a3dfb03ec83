"""Attention processors that let a controller see and edit attention maps (DESIGN §1.8, seed eq. 1).

    Attention(z, c) = softmax(Q K^T / sqrt(d)) V,   Q = z W_q, K = c W_k, V = c W_v

- `ControlledCrossAttention` (attn2) computes the probabilities explicitly, hands them to the
  controller as `b f h n L`, and multiplies the returned map by V.
- `ControlledFrameAttention` (attn1) wraps the block's frame-attention processor: it builds each
  frame's keys/values with that processor's own `frame_context` (FFAM, SCA, full; the frame itself
  for per-frame self-attention) and, where the controller replaces self-attention maps, gives the
  target branch the source's queries and keys: softmax(Q_s K_s^T / sqrt(d)) V_t is exactly "the
  source's map applied to the target's values", without materialising the (n x m) maps, which for
  FFAM at 512² with 8 frames would not fit in memory.

`attention_control(unet, controller)` installs them on every transformer block of a `VideoUNet` and
restores the original processors on exit. Same weights, no new parameters.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange

from ..models.context import VideoContext
from ..models.video_unet import VideoTransformerBlock, _transformer_levels
from .controllers import AttentionStore, LayerPlace


def _heads(attn, x: torch.Tensor) -> torch.Tensor:  # (b f) n (h d) -> (b f) h n d
    return rearrange(x, "bf n (h d) -> bf h n d", h=attn.heads)


def _output(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](rearrange(out, "bf h n d -> bf n (h d)")))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _check_plain(attn, hidden_states, attention_mask):
    if hidden_states.ndim != 3 or attention_mask is not None or attn.spatial_norm is not None \
            or attn.group_norm is not None:
        raise ValueError("attention control supports Stable Diffusion transformer blocks "
                         "(3-D hidden states, no attention mask, no spatial/group norm)")


class ControlledCrossAttention:
    """attn2 with explicit probabilities: the controller edits/stores softmax(QK^T/sqrt(d)), b f h n L."""

    def __init__(self, controller: AttentionStore, place: LayerPlace, context: VideoContext):
        self.controller, self.place, self.context = controller, place, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_plain(attn, hidden_states, attention_mask)
        if encoder_hidden_states is None:
            raise ValueError("cross-attention needs encoder_hidden_states (the text embeddings)")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        q = _heads(attn, attn.to_q(hidden_states))
        k = _heads(attn, attn.to_k(encoder_hidden_states))
        v = _heads(attn, attn.to_v(encoder_hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * attn.scale
        probs = rearrange(scores.softmax(-1), "(b f) h n m -> b f h n m", f=self.context.num_frames)
        probs = self.controller.cross_attention(probs, self.place)
        probs = rearrange(probs, "b f h n m -> (b f) h n m").to(v.dtype)
        return _output(attn, probs @ v, hidden_states)


class ControlledFrameAttention:
    """attn1 around a frame-attention processor: its `frame_context` keys/values, source maps on the targets."""

    def __init__(self, original, controller: AttentionStore, place: LayerPlace, context: VideoContext):
        self.original, self.controller, self.place, self.context = original, controller, place, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_plain(attn, hidden_states, attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError("frame attention is self-attention; it takes no encoder_hidden_states")
        frame_context = getattr(self.original, "frame_context", None)  # None: per-frame self-attention
        q = _heads(attn, attn.to_q(hidden_states))
        k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
        if frame_context is not None:  # gathered after projection, as the frame-attention processors do
            k, v = frame_context(torch.cat([k, v], dim=-1)).chunk(2, -1)  # (b f) m c
        k, v = _heads(attn, k), _heads(attn, v)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if self.controller.replaces_self(self.place):
            f = self.context.num_frames
            q, k = self.controller.replace_self_queries_keys(
                rearrange(q, "(b f) h n d -> b f h n d", f=f), rearrange(k, "(b f) h m d -> b f h m d", f=f)
            )
            q, k = rearrange(q, "b f h n d -> (b f) h n d"), rearrange(k, "b f h m d -> (b f) h m d")
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # as the frame-attention processors
        return _output(attn, out, hidden_states)


def transformer_block_places(unet) -> list[tuple[VideoTransformerBlock, LayerPlace]]:
    """Every transformer block of a VideoUNet with its place (module name, down/mid/up, level)."""
    levels = {id(t): level for t, level in _transformer_levels(unet.unet)}
    places = []
    for name, module in unet.unet.named_modules():
        if id(module) in levels:
            location = name.split(".")[0].split("_")[0]  # down_blocks / mid_block / up_blocks
            for i, block in enumerate(module.transformer_blocks):
                places.append((block, LayerPlace(f"{name}.transformer_blocks.{i}", location, levels[id(module)])))
    return places


@contextlib.contextmanager
def attention_control(unet, controller: AttentionStore):
    """Install controlled processors on every transformer block of `unet` (a VideoUNet); restore on exit."""
    originals = []
    try:
        for block, place in transformer_block_places(unet):
            if not isinstance(block, VideoTransformerBlock):
                raise TypeError(f"{place.name} is not an inflated block; attention control needs a VideoUNet")
            originals.append((block, block.attn1.processor, block.attn2.processor))
            block.attn1.set_processor(ControlledFrameAttention(block.attn1.processor, controller, place, unet.context))
            block.attn2.set_processor(ControlledCrossAttention(controller, place, unet.context))
        yield controller
    finally:
        for block, attn1, attn2 in originals:
            block.attn1.set_processor(attn1)
            block.attn2.set_processor(attn2)

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

`attention_control(unet, controller, injection)` installs them on the transformer blocks of a `VideoUNet`
(with a structure-preserving `injection`, `ei2.control.injection`, also its ResNet hooks) and restores the
original processors on exit. Same weights, no new parameters.
"""
from __future__ import annotations

import contextlib

import torch
from einops import rearrange

from ..models.context import VideoContext
from ..models.frame_attention import attention_output, frame_qkv, scaled_dot_product_attention
from ..models.video_unet import VideoTransformerBlock, transformer_levels
from .controllers import AttentionStore, LayerPlace
from .injection import FeatureInjection


def _heads(attn, x: torch.Tensor) -> torch.Tensor:  # (b f) n (h d) -> (b f) h n d
    return rearrange(x, "bf n (h d) -> bf h n d", h=attn.heads)


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
        return attention_output(attn, probs @ v, hidden_states)


class ControlledFrameAttention:
    """attn1 around a frame-attention processor: its `frame_context` keys/values, source maps on the targets.

    `editors`: one or several objects with `replaces_self(place)` and `replace_self_queries_keys(q, k)` (a
    Prompt-to-Prompt controller, a `FeatureInjection`); each that acts at this step edits q and k in turn.
    """

    def __init__(self, original, editors, place: LayerPlace, context: VideoContext):
        self.original, self.place, self.context = original, place, context
        self.editors = tuple(editors) if isinstance(editors, (list, tuple)) else (editors,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        _check_plain(attn, hidden_states, attention_mask)
        if encoder_hidden_states is not None:
            raise ValueError("frame attention is self-attention; it takes no encoder_hidden_states")
        frame_context = getattr(self.original, "frame_context", None)  # None: per-frame self-attention
        q, k, v = frame_qkv(attn, hidden_states, frame_context)  # as the frame-attention processors
        active = [e for e in self.editors if e.replaces_self(self.place)]
        if active:
            f = self.context.num_frames
            q, k = rearrange(q, "(b f) h n d -> b f h n d", f=f), rearrange(k, "(b f) h m d -> b f h m d", f=f)
            for editor in active:
                q, k = editor.replace_self_queries_keys(q, k)
            q, k = rearrange(q, "b f h n d -> (b f) h n d"), rearrange(k, "b f h m d -> (b f) h m d")
        out = scaled_dot_product_attention(q, k, v, scale=attn.scale)  # the frame-attention processors' kernel
        return attention_output(attn, out, hidden_states)


def transformer_block_places(unet) -> list[tuple[VideoTransformerBlock, LayerPlace]]:
    """Every transformer block of a VideoUNet with its place (module name, down/mid/up, level)."""
    levels = {id(t): level for t, level in transformer_levels(unet.unet)}
    places = []
    for name, module in unet.unet.named_modules():
        if id(module) in levels:
            location = name.split(".")[0].split("_")[0]  # down_blocks / mid_block / up_blocks
            for i, block in enumerate(module.transformer_blocks):
                places.append((block, LayerPlace(f"{name}.transformer_blocks.{i}", location, levels[id(module)])))
    return places


@contextlib.contextmanager
def attention_control(unet, controller: AttentionStore | None = None, injection: FeatureInjection | None = None):
    """Install controlled processors on `unet` (a VideoUNet) for a Prompt-to-Prompt `controller` and/or a
    structure-preserving `injection`; restore the original processors and remove every hook on exit.

    With a controller every block gets controlled frame and cross attention; with an injection alone only
    the frame attention of the blocks it acts on is wrapped (cross-attention keeps its own processor).
    """
    originals = []
    try:
        for block, place in transformer_block_places(unet):
            if not isinstance(block, VideoTransformerBlock):
                raise TypeError(f"{place.name} is not an inflated block; attention control needs a VideoUNet")
            editors = [e for e in (controller,) if e is not None]
            if injection is not None and injection.attention_place(place):
                editors.append(injection)
            if not editors:
                continue
            originals.append((block, block.attn1.processor, block.attn2.processor))
            block.attn1.set_processor(ControlledFrameAttention(block.attn1.processor, editors, place, unet.context))
            if controller is not None:
                block.attn2.set_processor(ControlledCrossAttention(controller, place, unet.context))
        with injection.feature_hooks(unet) if injection is not None else contextlib.nullcontext():
            yield controller
    finally:
        for block, attn1, attn2 in originals:
            block.attn1.set_processor(attn1)
            block.attn2.set_processor(attn2)

"""Frame attention: what replaces the self-attention (SA) of each transformer block (DESIGN §1.3, §1.5).

Each processor keeps the pretrained W_q, W_k, W_v, W_out of SA and only changes which tokens a
frame's queries attend to. Every token is projected once (Q, K, V of all frames, as SA does); each
frame's keys/values are then gathered from the projected K and V into a per-frame context
`(b f) m c` by `frame_context`, and attention is PyTorch SDPA, as in diffusers' AttnProcessor2_0 (on the CPU
with heads narrower than 16 zero-padded to 16 for long key sequences: `scaled_dot_product_attention`).
Gathering after the projection is exact (average pooling and a linear map commute, the pooling
weights summing to 1) and avoids projecting each coarse token f-1 times.

- `SparseCausalAttention` (Tune-A-Video): frame i attends to frames 0 and i-1 (frame 0 to itself).
- `FineCoarseFrameAttention` (FFAM, EI²): frame i attends to all of its own tokens ("fine") and to
  every other frame average-pooled by `coarse_factor` on the spatial grid ("coarse", ceil mode).
  Pooling is done on the projected keys/values: projection and average pooling commute.
  Scores per frame: hw * (hw + (f-1) * ceil(h/s) * ceil(w/s)).
- `FullFrameAttention`: frame i attends to all tokens of all frames.
With f = 1 each of them is exactly SA.

Anchor frames (long videos, DESIGN §1.10): when the shared `VideoContext` is in anchor mode, FFAM
records the coarse keys/values of the anchor frames ("record") or appends them, the same a*m tokens,
to every frame's keys/values ("attend"): frame i of a window attends to its fine tokens, the coarse
tokens of the other frames of its window and the coarse tokens of the anchors. No new weights; without
anchor mode FFAM is exactly as above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from einops import rearrange

from .context import VideoContext


# PyTorch's CPU flash-attention kernel runs heads narrower than one AVX-512 vector (16 fp32 lanes) on its scalar
# tails: zero-padding such heads to 16 channels gives the same scores and outputs (the padded channels add 0 to
# every q·k and carry 0 through softmax·V), and is 26% (4-channel heads) to 34% (8-channel heads) faster at 704 keys,
# 9-17% at 176-432 keys (benchmarks/video_unet/RESULTS.md, issue 18). Under ~128 keys (temporal attention over
# frames, cross-attention over text, the small levels) it costs more than it saves, and heads of 16 channels or more
# gain nothing. SD's own heads are 40-160 wide: this acts on small models (the Shapes model, the test and benchmark
# UNets). 0 turns it off.
CPU_HEAD_PAD = 16
CPU_HEAD_PAD_MIN_KEYS = 256
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _PaddedHeadsAttention(torch.autograd.Function):
    """PyTorch's CPU flash attention on heads zero-padded to CPU_HEAD_PAD channels, saving the unpadded q, k, v and
    output for backward (their padded channels are exact zeros; backward pads them again): the same saved bytes as
    F.scaled_dot_product_attention, where saving the padded tensors would keep up to 16/d times as many."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        width = q.shape[-1]
        out, lse = _FLASH_CPU(*(_pad_heads(t) for t in (q, k, v)), scale=scale)
        # (b h n d) over memory (b n h d), as SDPA returns it: merging the heads afterwards stays a view
        out = out.transpose(1, 2)[..., :width].contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        width = q.shape[-1]
        grads = _FLASH_CPU_BACKWARD(*(_pad_heads(t) for t in (grad_out, q, k, v, out)), lse, 0.0, False,
                                    scale=ctx.scale)
        return (*(g[..., :width] for g in grads), None)


def _pad_heads(t: torch.Tensor) -> torch.Tensor:
    return F.pad(t, (0, CPU_HEAD_PAD - t.shape[-1]))


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, scale=scale); on the CPU, fp32 heads narrower than CPU_HEAD_PAD with at
    least CPU_HEAD_PAD_MIN_KEYS keys are zero-padded (see above; not under autocast, whose casts SDPA does itself).

    Exact up to the order of floating-point sums: the padded channels are zeros in q, k and v, and are cut from the
    output and the gradients.
    """
    width = q.shape[-1]
    if (
        q.device.type == "cpu" and width < CPU_HEAD_PAD and k.shape[-2] >= CPU_HEAD_PAD_MIN_KEYS
        and q.dtype == k.dtype == v.dtype == torch.float32 and v.shape[-1] == width and q.ndim == 4
        and not torch.is_autocast_enabled("cpu") and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None
    ):
        return _PaddedHeadsAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def frame_qkv(attn, hidden_states: torch.Tensor, frame_context=None):
    """Q of every token and K, V of each frame's key/value tokens, split into heads.

    hidden_states (b f) n c -> q (b f) h n d, k and v (b f) h m d. Every token is projected once; the
    frame's tokens are then gathered from the projected K and V by `frame_context` (None: the frame itself).
    """
    q = attn.to_q(hidden_states)
    k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
    if frame_context is not None:
        k, v = frame_context(torch.cat([k, v], dim=-1)).chunk(2, -1)
    q, k, v = (rearrange(t, "bf n (h d) -> bf h n d", h=attn.heads) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def attention_output(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Heads (b f) h n d merged, W_out, then the layer's residual and output rescaling (as diffusers' processors)."""
    out = attn.to_out[1](attn.to_out[0](rearrange(out, "bf h n d -> bf n (h d)")))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class FrameAttentionProcessor:
    """Base: build each frame's key/value tokens, then run diffusers' SDPA attention over them."""

    def __init__(self, context: VideoContext, level: int):
        self.context = context
        self.level = level

    def frame_context(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (b f) n c -> (b f) m c
        """Frame i's key/value tokens, gathered (and pooled) from the tokens of the clip; linear in its input."""
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is a self-attention processor; it takes no encoder states or mask")
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            # e.g. the attention of a VAE or UNet mid-block: its group/spatial norm would normalise the
            # queries but not the gathered keys, which is no frame attention
            raise ValueError(
                f"{type(self).__name__} supports the self-attention (attn1) of Stable Diffusion transformer blocks: "
                "(b f) n c tokens, no group_norm or spatial_norm; this layer has "
                f"{hidden_states.ndim}-D inputs, group_norm={attn.group_norm is not None}, "
                f"spatial_norm={attn.spatial_norm is not None}"
            )
        q, k, v = frame_qkv(attn, hidden_states, self.frame_context)
        out = scaled_dot_product_attention(q, k, v, attn.scale).to(q.dtype)
        return attention_output(attn, out, hidden_states)


class SparseCausalAttention(FrameAttentionProcessor):
    """Tune-A-Video's sparse-causal attention: keys of frame i are frames 0 and i-1."""

    def frame_context(self, hidden_states):
        f = self.context.num_frames
        x = rearrange(hidden_states, "(b f) n c -> b f n c", f=f)
        previous = (torch.arange(f, device=x.device) - 1).clamp(min=0)
        # frame 0 sees [frame 0, frame 0]: duplicated keys give the same softmax as frame 0 alone
        keys = torch.cat([x[:, [0] * f], x[:, previous]], dim=2)  # b f (2 n) c
        return rearrange(keys, "b f m c -> (b f) m c")


class FineCoarseFrameAttention(FrameAttentionProcessor):
    """FFAM: fine tokens of frame i, then coarse (pooled) tokens of every other frame j != i, in order."""

    def __init__(self, context: VideoContext, level: int, coarse_factor: int = 2):
        super().__init__(context, level)
        self.coarse_factor = coarse_factor

    def frame_context(self, hidden_states):
        f = self.context.num_frames
        anchors = self.context.anchor_mode
        if f == 1 and anchors is None:
            return hidden_states
        h, w = self.context.grid(self.level, hidden_states.shape[1])
        s = self.coarse_factor
        grid = rearrange(hidden_states, "bf (h w) c -> bf c h w", h=h, w=w)
        # ceil mode without padding: a partial window at an odd edge averages its valid cells only
        coarse = F.avg_pool2d(grid, kernel_size=s, stride=s, ceil_mode=True)
        coarse = rearrange(coarse, "(b f) c h w -> b f (h w) c", f=f)
        fine = rearrange(hidden_states, "(b f) n c -> b f n c", f=f)
        j = torch.arange(f - 1, device=fine.device)
        others = j + (j >= torch.arange(f, device=fine.device)[:, None])  # f (f-1): row i is every frame but i
        coarse_others = rearrange(coarse[:, others], "b f g m c -> b f (g m) c")
        tokens = [fine, coarse_others]
        if anchors == "record":  # this pass runs on the anchor frames: keep their coarse keys/values, b a m c
            self.context.anchor_tokens[self] = coarse
        elif anchors == "attend":  # every frame of the window also sees the anchors' coarse tokens
            shared = self.context.anchor_tokens[self]  # b' a m c, b' = b or b / (windows stacked in the batch)
            shared = rearrange(shared, "b a m c -> b (a m) c").repeat(fine.shape[0] // shared.shape[0], 1, 1)
            tokens.append(shared[:, None].expand(-1, f, -1, -1))  # b f (a m) c
        return rearrange(torch.cat(tokens, dim=2), "b f m c -> (b f) m c")


class FullFrameAttention(FrameAttentionProcessor):
    """Every frame attends to all tokens of all frames of its clip."""

    def frame_context(self, hidden_states):
        f = self.context.num_frames
        x = rearrange(hidden_states, "(b f) n c -> b (f n) c", f=f)
        return x.repeat_interleave(f, dim=0)


def frame_attention_processor(kind: str, context: VideoContext, level: int, coarse_factor: int):
    if kind == "self":
        return AttnProcessor2_0()
    if kind == "sparse-causal":
        return SparseCausalAttention(context, level)
    if kind == "ffam":
        return FineCoarseFrameAttention(context, level, coarse_factor)
    if kind == "full":
        return FullFrameAttention(context, level)
    raise ValueError(f"unknown frame attention {kind!r}")

"""Temporal modules: attention along frames at each spatial position (DESIGN §1.4, §1.5).

Both attend along frames at every spatial position, `(b f) (h w) c` seen as `(b h w) f c`. The fold is not
materialised: IC and LayerNorm act per position or per token, and W_q, W_k, W_v, W_L per token, so they run on
the `(b f) n c` tokens as they are; only the attention itself sees the frames of a position as one sequence
(`temporal_attention`: one SDPA call over strided views). This is the same function as folding, running the
diffusers Attention on `(b n) f c` and unfolding, without the two transposing copies around every module.

- `ShiftRestrictedTemporalAttention` (STAM, seed eq. 19): STAM(z) = z + L̄(Ā(IC(z), IC(z))), with
  instance centering IC instead of LayerNorm, and value map W_v and output map W_L normalised to
  spectral norm 1. W_q = 0 and b_L = 0 at init, so STAM starts as the identity. By seed Prop. 1–3 its
  mean shift is b_L and its covariance shift is at most ‖W_L‖²‖W_v‖²‖Σ(ẑ)‖ ≤ ‖Σ(z)‖.
- `TemporalAttention` (TA, Tune-A-Video): z + W_out·Attn(LN(z)), output linear zero-initialised
  (weight and bias: Tune-A-Video zeroes only the weight; zeroing the bias too makes TA the identity
  at step 0 while keeping the same tensors).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn.utils import parametrize

from .context import VideoContext


class InstanceCentering(nn.Module):
    """IC: subtract, per channel, the mean over the frames of each position. No scale, no affine.

    Frames on dim 1, `(b h w) f c` or `b f n c`: µ(IC(z)) = 0 and Σ(IC(z)) = Σ(z) (seed A.5).
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - z.mean(dim=1, keepdim=True)


class SpectralNormalization(nn.Module):
    """Parametrization W -> W / σ(W), with σ the largest singular value, computed once per change of W.

    σ is recomputed only when the weight tensor changes (an optimiser step, a load): its version
    counter is the key. So the forward pass and its recomputation under gradient checkpointing use
    the same σ, and σ is converged, not one power-iteration step behind (as
    torch.nn.utils.parametrizations.spectral_norm is in train mode). σ = uᵀWv with the cached singular
    vectors u, v, so the gradient flows through σ as in spectral normalisation. σ is computed in fp32
    with autocast off, whatever the caller's mixed precision, so ‖W/σ‖₂ ≤ 1 holds to fp32 accuracy.
    """

    def __init__(self, tolerance: float = 1e-5, max_iterations: int = 50):
        super().__init__()
        self.tolerance = tolerance
        self.max_iterations = max_iterations
        self._key = None
        self._u = None
        self._v = None

    def power_vectors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The singular vectors (u, v) the next training step warm-starts from (None before the first)."""
        return None if self._u is None else (self._u, self._v)

    def warm_start(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Continue from saved `power_vectors` (a resumed tuning): the next training forward starts its power
        iteration from them, as the uninterrupted run does."""
        self._u, self._v, self._key = u, v, None

    @torch.no_grad()
    def _singular_vectors(self, weight: torch.Tensor, warm: bool):
        w = weight.detach().float()
        if warm and self._v is not None and self._v.shape[0] == w.shape[1]:
            # power iteration warm-started from the previous step's vectors, run until (u, v) is a
            # singular pair (residual ‖Wᵀu − σv‖ ≤ tol·σ, so σ is off by ~tol²); else exact SVD
            v = self._v.to(w.device)
            for _ in range(self.max_iterations):
                u = torch.nn.functional.normalize(w @ v, dim=0)
                wt_u = w.T @ u
                sigma = wt_u.norm()
                converged = (wt_u - sigma * v).norm() <= self.tolerance * sigma
                v = wt_u / sigma
                if converged:
                    return u, v
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, 0], vh[0]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # σ (its power iteration and uᵀWv) in fp32 with autocast off: under the caller's fp16/bf16 autocast
        # the matrix products would be rounded (and on the CPU a bf16 product cannot meet the fp32 u in
        # torch.dot); the normalised weight is returned in the weight's dtype, autocast casts it where the
        # linear layer runs
        if weight.is_meta:  # built without storage (diffusers' from_pretrained): nothing to normalise yet
            return weight
        with torch.autocast(weight.device.type, enabled=False):
            u, v = self._cached_vectors(weight)
            w = weight.float()
            sigma = torch.dot(u.to(w), w @ v.to(w))
            return (w / sigma).to(weight.dtype)

    @torch.compiler.disable
    def _cached_vectors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # outside torch.compile's graphs: the key (version counter, storage) changes at every optimiser step and
        # would make a compiled graph guarded on it recompile every step. Training (grad enabled) warm-starts the
        # power iteration from the last step's vectors; inference takes them from the SVD of W alone, so that an
        # edit right after tuning and one from the reloaded adapter use the same σ to the last bit
        warm = torch.is_grad_enabled()
        key = (weight._version, weight.data_ptr(), weight.device, weight.shape, warm)
        if key != self._key:
            self._u, self._v = self._singular_vectors(weight, warm)
            self._key = key
        return self._u, self._v


def spectral_norm_of(linear: nn.Linear) -> float:
    """‖W‖₂ of the weight a linear layer applies (after parametrizations)."""
    return torch.linalg.matrix_norm(linear.weight.detach().float(), ord=2).item()


def temporal_attention(attn: Attention, z: torch.Tensor) -> torch.Tensor:
    """W_out·softmax(QKᵀ/√d)·V along frames, at every position, of the tokens z (b, f, n, c) -> (b, f, n, c).

    The same as diffusers' AttnProcessor2_0 on the folded `(b n) f c` (no mask, no norms, no residual), with the
    projections on the unfolded tokens and the fold done by strides only.
    """
    b, f, n, _ = z.shape
    heads = attn.heads

    def split(t):  # b f n (h d) -> (b n) h f d, a view when b == 1
        return t.unflatten(-1, (heads, -1)).permute(0, 2, 3, 1, 4).flatten(0, 1)

    q, k, v = split(attn.to_q(z)), split(attn.to_k(z)), split(attn.to_v(z))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (b n) h f d
    out = out.unflatten(0, (b, n)).permute(0, 3, 1, 2, 4).flatten(-2)  # b f n (h d)
    return attn.to_out[1](attn.to_out[0](out))


def _frames(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    return hidden_states.unflatten(0, (-1, num_frames))  # (b f) n c -> b f n c, a view


class ShiftRestrictedTemporalAttention(nn.Module):
    """STAM (seed eq. 19). `attn` is a diffusers Attention; its W_v and W_L are spectrally normalised."""

    def __init__(self, dim: int, heads: int, context: VideoContext):
        super().__init__()
        self.context = context
        self.centering = InstanceCentering()
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
        nn.init.zeros_(self.attn.to_q.weight)
        nn.init.zeros_(self.attn.to_out[0].bias)
        parametrize.register_parametrization(self.attn.to_v, "weight", SpectralNormalization())
        parametrize.register_parametrization(self.attn.to_out[0], "weight", SpectralNormalization())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (b f) n c
        z = _frames(hidden_states, self.context.num_frames)  # b f n c: IC over dim 1
        return hidden_states + temporal_attention(self.attn, self.centering(z)).flatten(0, 1)


class TemporalAttention(nn.Module):
    """TA (Tune-A-Video): LayerNorm, attention over frames without positional encoding, output linear."""

    def __init__(self, dim: int, heads: int, context: VideoContext):
        super().__init__()
        self.context = context
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (b f) n c
        z = _frames(self.norm(hidden_states), self.context.num_frames)  # LayerNorm per token: no fold needed
        return hidden_states + temporal_attention(self.attn, z).flatten(0, 1)

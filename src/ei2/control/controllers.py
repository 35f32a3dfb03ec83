"""Prompt-to-Prompt attention controllers for video (Hertz et al. 2022, Video-P2P; DESIGN §1.8).

The source and target branches are denoised together: the UNet's batch is `b = p` prompts (source
first), or `2p` with classifier-free guidance (unconditional half first, as `ei2.inversion` lays it
out). Controllers see attention probabilities per frame and head,

    probs: b f h n m      (n query tokens of the level's grid, m keys: L text tokens for cross-attention)

and edit only the conditional group (the last p entries), as Prompt-to-Prompt does:

- cross-attention: target map <- alpha * edit(source map) + (1 - alpha) * target map, alpha per step
  and per token (`words.cross_replace_alpha`); edit = the source map itself (word swap), its aligned
  columns (refinement), or that scaled per token (re-weighting).
- self/frame attention (FFAM, SCA, full or per-frame): for the steps of `self_replace` the target uses
  the source's map softmax(Q_s K_s^T / sqrt(d)) with its own values. Computed without materialising the
  map, as attention over the source's queries and keys (see `processors`).
- local blend: after each step, target latents outside the mask of chosen words equal the source's:
  x_t <- x_s + M (x_t - x_s), M = mask(source words) | mask(target words) per frame.

`AttentionStore` records cross-attention maps (mean over heads) of the conditional group, per layer,
for the current step and summed over steps: local blend and `--save-attention` read them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ..models.context import level_grid


@dataclass(frozen=True)
class LayerPlace:
    """Where an attention layer sits: module name, `down`/`mid`/`up`, and UNet level (0 = full latent grid)."""

    name: str
    location: str
    level: int


class AttentionStore:
    """Records the cross-attention maps of the conditional group; edits nothing.

    `step_maps[place]`: (p, f, n, L), this step's maps, mean over heads; `sum_maps[place]`: summed over
    the steps so far (`num_stored` of them). `cur_step` is advanced by `step_callback`.
    """

    def __init__(self, num_prompts: int, store_cross: bool = True):
        self.num_prompts = num_prompts
        self.store_cross = store_cross
        self.reset()

    def reset(self) -> None:
        self.cur_step = 0
        self.step_maps: dict[LayerPlace, torch.Tensor] = {}
        self.sum_maps: dict[LayerPlace, torch.Tensor] = {}
        self.num_stored = 0
        self.latent_size: tuple[int, int] | None = None

    # ---- called by the attention processors --------------------------------------------------
    def conditional(self, x: torch.Tensor) -> slice:
        """The conditional group of a `b ...` batch: the last p entries."""
        if x.shape[0] % self.num_prompts:
            raise ValueError(f"controller for {self.num_prompts} prompts got a batch of {x.shape[0]}")
        return slice(x.shape[0] - self.num_prompts, x.shape[0])

    @property
    def last_source_step(self) -> int | None:
        """The last step that needs the source branch in the batch (None: every step; its maps are of every branch)."""
        return None

    def source_left(self) -> bool:
        last = self.last_source_step
        return last is not None and self.cur_step > last

    def cross_attention(self, probs: torch.Tensor, place: LayerPlace) -> torch.Tensor:
        """probs: b f h n L -> the (edited) probs; records the conditional group's maps (while the source is in)."""
        if self.source_left():  # the sampler dropped the source branch: nothing left to edit or record
            return probs
        probs = self.edit_cross(probs, place)
        if self.store_cross:
            self.step_maps[place] = probs[self.conditional(probs)].mean(2).detach().float()  # p f n L
        return probs

    def edit_cross(self, probs: torch.Tensor, place: LayerPlace) -> torch.Tensor:
        return probs

    def replaces_self(self, place: LayerPlace) -> bool:
        return False

    def replace_self_queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: b f h n d / b f h m d; the targets of the conditional group get the source's q and k."""
        cond = self.conditional(q)
        q, k = q.clone(), k.clone()
        q[cond.start + 1 : cond.stop] = q[cond.start]
        k[cond.start + 1 : cond.stop] = k[cond.start]
        return q, k

    # ---- called by the window code (`ei2.windows`): one step's maps, taken window by window -----------
    def take_step_maps(self) -> dict[LayerPlace, torch.Tensor]:
        """This call's maps (p, w, n, L per layer), removed: the window code merges them over the windows."""
        maps, self.step_maps = self.step_maps, {}
        return maps

    def put_step_maps(self, maps: dict[LayerPlace, torch.Tensor]) -> None:
        """The step's maps merged over the windows (p, f, n, L), as one call on the whole video would leave them."""
        self.step_maps = dict(maps)

    # ---- called by the sampler after every denoising step ------------------------------------
    def step_callback(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        """End of step i: add this step's maps to the sums, apply local blending, advance to step i + 1."""
        self.latent_size = tuple(latents.shape[-2:])
        for place, maps in self.step_maps.items():
            self.sum_maps[place] = self.sum_maps[place] + maps if place in self.sum_maps else maps.clone()
        self.num_stored += 1
        self.step_maps = {}
        latents = self.blend(i, latents)
        self.cur_step = i + 1
        return latents

    def blend(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def average_maps(self) -> dict[LayerPlace, torch.Tensor]:
        """Cross-attention maps averaged over the stored steps: place -> (p, f, n, L)."""
        return {place: maps / max(self.num_stored, 1) for place, maps in self.sum_maps.items()}

    def word_maps(self, token_weights: torch.Tensor, levels: tuple[int, ...] | None = None,
                  maps: dict[LayerPlace, torch.Tensor] | None = None) -> torch.Tensor:
        """Map of weighted tokens on the latent grid: token_weights (p, L) -> (p, f, h, w).

        Each layer's map (summed over steps unless `maps` is given) is summed over the weighted tokens on
        its own level's grid and resized (bilinear) to the latent grid; the mean over the layers of
        `levels` (all when None). Any frame count, any latent size.
        """
        maps = self.sum_maps if maps is None else maps
        if not maps or self.latent_size is None:
            raise RuntimeError("no cross-attention maps were stored; run the sampler with this controller first")
        total, count = 0.0, 0
        for place, m in maps.items():
            if levels is not None and place.level not in levels:
                continue
            gh, gw = level_grid(self.latent_size, place.level)
            w = torch.einsum("pfnl,pl->pfn", m, token_weights.to(m))
            w = rearrange(w, "p f (h w) -> (p f) 1 h w", h=gh, w=gw)
            total = total + F.interpolate(w, size=self.latent_size, mode="bilinear", align_corners=False)
            count += 1
        if count == 0:
            raise ValueError(f"no cross-attention layer at levels {levels}; stored levels are "
                             f"{sorted({p.level for p in maps})}")
        return rearrange(total / count, "(p f) 1 h w -> p f h w", p=token_weights.shape[0])


BLEND_LEVEL = 2  # Prompt-to-Prompt's masks come from the 16x16 maps of a 64x64 latent: level 2


class LocalBlend:
    """Local blending by cross-attention masks of chosen words (Prompt-to-Prompt's LocalBlend, any f, h, w).

    word_weights (p, L): 1 at the tokens of the blend words of each prompt (source row 0). Mask per frame:
    the words' maps summed over the steps so far, from the layers at `levels` (default: level 2, whose grid
    is a quarter of the latent's side as in Prompt-to-Prompt, or the nearest level that has maps), dilated
    by 1/16 of the latent's side, normalised to [0, 1] per frame (min-max: on Stable Diffusion the minimum
    is ~0 and this is P2P's division by the maximum), above `threshold[0]`; the union of the source's and
    each target's mask. `exclude_weights` (p, L): words whose mask (above `threshold[1]`, not dilated) is
    removed from it. Applied from step `start_step` on.
    """

    def __init__(self, word_weights: torch.Tensor, threshold: tuple[float, float] = (0.3, 0.3), start_step: int = 0,
                 exclude_weights: torch.Tensor | None = None, levels: tuple[int, ...] | None = None):
        self.word_weights = word_weights
        self.exclude_weights = exclude_weights
        self.threshold = threshold
        self.start_step = start_step
        self.levels = levels
        self.last_mask: torch.Tensor | None = None

    def mask_levels(self, store: AttentionStore) -> tuple[int, ...]:
        if self.levels is not None:
            return self.levels
        stored = {place.level for place in store.sum_maps}
        return (min(stored, key=lambda level: (abs(level - BLEND_LEVEL), -level)),)

    def _mask(self, store: AttentionStore, weights: torch.Tensor, threshold: float, dilate: bool) -> torch.Tensor:
        maps = store.word_maps(weights, self.mask_levels(store))  # p f h w
        if dilate:
            r = max(1, round(min(maps.shape[-2:]) / 16))
            maps = F.max_pool2d(maps, kernel_size=2 * r + 1, stride=1, padding=r)
        low, high = maps.amin(dim=(-2, -1), keepdim=True), maps.amax(dim=(-2, -1), keepdim=True)
        mask = (maps - low) / (high - low).clamp_min(1e-12) > threshold
        return mask[:1] | mask

    def __call__(self, store: AttentionStore, i: int, latents: torch.Tensor) -> torch.Tensor:
        """latents: p c f h w (source first) -> targets blended with the source outside the mask."""
        if i < self.start_step:
            return latents
        mask = self._mask(store, self.word_weights, self.threshold[0], dilate=True)
        if self.exclude_weights is not None:
            mask = mask & ~self._mask(store, self.exclude_weights, self.threshold[1], dilate=False)
        mask = rearrange(mask, "p f h w -> p 1 f h w").to(latents.dtype)
        self.last_mask = mask
        source = latents[:1]
        return source + mask * (latents - source)


class AttentionEdit(AttentionStore):
    """Base of the editing controllers: cross-attention replacement by step and token, self replacement
    for a window of steps at levels >= `self_replace_min_level`, optional local blend.

    cross_alpha: (steps, targets, L) from `words.cross_replace_alpha`; self_steps: the steps (a range).
    Without local blending and with `keep_maps` False (no attention grid wanted), the source branch is needed
    only up to the last step that replaces a map (`last_source_step`); the sampler then drops it.
    """

    def __init__(self, num_prompts: int, cross_alpha: torch.Tensor, self_steps: range,
                 self_replace_min_level: int = 0, local_blend: LocalBlend | None = None, keep_maps: bool = False):
        super().__init__(num_prompts)
        if num_prompts < 2:
            raise ValueError("attention editing needs a source and at least one target prompt")
        self.cross_alpha = cross_alpha
        self.self_steps = self_steps
        self.self_replace_min_level = self_replace_min_level
        self.local_blend = local_blend
        self.keep_maps = keep_maps

    @property
    def last_source_step(self) -> int | None:
        if self.local_blend is not None or self.keep_maps:  # blending reads the source to the end
            return None
        crossed = [i for i in range(len(self.cross_alpha)) if self.cross_alpha[i].any()]
        return max([*crossed, *self.self_steps], default=-1)

    def replace_cross(self, base: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """base: f h n L (source), targets: t f h n L -> the edited target maps, t f h n L."""
        raise NotImplementedError

    def edit_cross(self, probs, place):
        if self.cur_step >= len(self.cross_alpha):
            return probs
        alpha = self.cross_alpha[self.cur_step].to(probs)  # t L
        if not alpha.any():
            return probs
        cond = self.conditional(probs)
        base, targets = probs[cond][0], probs[cond][1:]
        alpha = rearrange(alpha, "t l -> t 1 1 1 l")
        edited = self.replace_cross(base, targets) * alpha + targets * (1 - alpha)
        probs = probs.clone()
        probs[cond.start + 1 : cond.stop] = edited
        return probs

    def replaces_self(self, place):
        return self.cur_step in self.self_steps and place.level >= self.self_replace_min_level

    def blend(self, i, latents):
        return latents if self.local_blend is None else self.local_blend(self, i, latents)


class AttentionReplace(AttentionEdit):
    """Word swap: every target token takes the source's column at the same position."""

    def replace_cross(self, base, targets):
        return base.expand_as(targets)


class AttentionRefine(AttentionEdit):
    """Refinement: aligned target tokens take the source's columns, added tokens keep their own.

    mapper (t, L) long and alphas (t, L) from `words.refinement_mapper`.
    """

    def __init__(self, num_prompts, cross_alpha, self_steps, mapper: torch.Tensor, alphas: torch.Tensor, **kwargs):
        super().__init__(num_prompts, cross_alpha, self_steps, **kwargs)
        self.mapper, self.alphas = mapper, alphas

    def replace_cross(self, base, targets):
        mapped = torch.stack([base[..., m] for m in self.mapper.to(base.device)])  # t f h n L
        alphas = rearrange(self.alphas.to(base), "t l -> t 1 1 1 l")
        return mapped * alphas + targets * (1 - alphas)


class AttentionReweight(AttentionRefine):
    """Re-weighting: the refined (or, for equal prompts, the source's) map with each token's column
    multiplied by `equalizer` (t, L): 1 everywhere except the re-weighted words."""

    def __init__(self, num_prompts, cross_alpha, self_steps, mapper, alphas, equalizer: torch.Tensor, **kwargs):
        super().__init__(num_prompts, cross_alpha, self_steps, mapper, alphas, **kwargs)
        self.equalizer = equalizer

    def replace_cross(self, base, targets):
        return super().replace_cross(base, targets) * rearrange(self.equalizer.to(base), "t l -> t 1 1 1 l")

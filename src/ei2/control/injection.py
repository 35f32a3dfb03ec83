"""Structure-preserving feature injection (Plug-and-Play, Tumanyan et al. CVPR 2023; DESIGN §1.9).

The source branch (source prompt, the same inverted x_T) is denoised beside the target branches,
source first in the batch, as for Prompt-to-Prompt. At decoder block `up_blocks[block]`:

- for the steps of `features` (the first fraction tau_f), the output of every ResNet of that block in
  each target branch is replaced by the source's:            h_t <- h_s
- for the steps of `attention` (tau_A), the frame attention (FFAM, sparse-causal, full or self) of the
  transformer blocks of `up_blocks[block:]` (that level and every finer one) uses the source's queries
  and keys with the target's own values:                     softmax(Q_s K_s^T / sqrt(d)) V_t

The layout comes from the source, the appearance from the target prompt. The replacement is done in
every classifier-free-guidance group (unconditional and conditional halves alike): target k takes the
source entry of its own group. With tau_f = tau_A = 0 nothing is replaced.

With `shared_source` (Plug-and-Play's own layout, the edit's default) the source branch runs once, without
guidance — the conditional prediction alone, the exact reverse of the DDIM inversion — and every target
entry of both halves takes it: the UNet's batch is `[source, targets (uncond), targets (cond)]`. The source
then leaves the batch after `last_source_step`, the last step that injects anything (`ddim_sample`'s `drop_after`).

Which layers: by decoder block, so one option means the same thing on every UNet. `block=1` is the
decoder's second level (Plug-and-Play's and TokenFlow's choice): 16x16 tokens of a 64x64 SD latent
(512² frames), 8x8 tokens of a 16x16 Shapes latent. Published SD settings: features 0.8, attention 0.5.

    injection = FeatureInjection(InjectionConfig(features=0.5, attention=0.5), num_prompts=2, num_steps=25)
    with injection.feature_hooks(unet):    # hooks on up_blocks[1].resnets, removed on exit
        ...                                # frame attention consults `injection` (see `processors`)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch

from .. import dataclass_io
from .controllers import LayerPlace
from .words import P2PError, Window, check_window, step_range


@dataclass(frozen=True)
class InjectionConfig:
    """Fractions of the denoising steps (from the first; or (start, end) windows) during which the source's
    decoder ResNet features (`features`) and frame-attention queries/keys (`attention`) are injected, at
    decoder block `up_blocks[block]` (features) and `up_blocks[block:]` (attention)."""

    features: float | Window = 0.0
    attention: float | Window = 0.0
    block: int = 1

    def __post_init__(self):
        check_window(self.features, "--inject-features")
        check_window(self.attention, "--inject-attention")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise P2PError(f"--inject-block must be a decoder block index >= 0, got {self.block!r}")
        for name in ("features", "attention"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)):
                object.__setattr__(self, name, tuple(value))

    def windows(self) -> tuple[Window, Window]:
        return check_window(self.features, "--inject-features"), check_window(self.attention, "--inject-attention")

    def active(self, num_steps: int) -> bool:
        """True when some step injects something (a source branch is needed)."""
        features, attention = self.windows()
        return bool(step_range(features, num_steps)) or bool(step_range(attention, num_steps))

    def to_dict(self) -> dict:
        return dataclass_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "InjectionConfig":
        return dataclass_io.from_dict(cls, data, "injection", P2PError)


def from_source(x: torch.Tensor, num_prompts: int, num_frames: int = 1) -> torch.Tensor:
    """Every target entry takes its group's source entry.

    x: `(g p) ...` (num_frames = 1) or frame-folded `(g p f) ...`, g groups of classifier-free guidance,
    p prompts with the source first in each group.
    """
    if x.shape[0] % (num_prompts * num_frames):
        raise ValueError(f"injection for {num_prompts} prompts x {num_frames} frames got a batch of {x.shape[0]}")
    groups = x.reshape(x.shape[0] // (num_prompts * num_frames), num_prompts, -1)  # g p (f ...)
    return groups[:, :1].expand_as(groups).reshape(x.shape)


def from_shared_source(x: torch.Tensor, num_prompts: int, num_frames: int = 1) -> torch.Tensor:
    """Every entry takes the first (the one source entry of a `[source, targets (uncond), targets (cond)]` batch).

    x: `b ...` (num_frames = 1) or frame-folded `(b f) ...`, b = 2 (p - 1) + 1 with guidance, p without."""
    b = x.shape[0] // num_frames if x.shape[0] % num_frames == 0 else -1
    if b not in (2 * num_prompts - 1, num_prompts):
        raise ValueError(f"injection from one shared source for {num_prompts} prompts x {num_frames} frames got a "
                         f"batch of {x.shape[0]}")
    entries = x.reshape(b, -1)
    return entries[:1].expand_as(entries).reshape(x.shape)


def decoder_block(place: LayerPlace) -> int | None:
    """Index k of `up_blocks[k]` that holds the layer at `place` (None outside the decoder)."""
    parts = place.name.split(".")
    if parts[0] != "up_blocks" or len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


class FeatureInjection:
    """The state of one sampling loop: which steps inject what; the step is advanced by `step_callback`."""

    def __init__(self, config: InjectionConfig, num_prompts: int, num_steps: int, shared_source: bool = False):
        if num_prompts < 2:
            raise ValueError("feature injection needs the source branch and at least one target")
        features, attention = config.windows()
        self.config = config
        self.num_prompts = num_prompts
        self.shared_source = shared_source
        self.feature_steps = step_range(features, num_steps)
        self.attention_steps = step_range(attention, num_steps)
        self.cur_step = 0

    @property
    def last_source_step(self) -> int:
        """The last step (of those that run) that injects features or attention, hence needs the source; -1: none."""
        return max([*self.feature_steps, *self.attention_steps], default=-1)

    def _from_source(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        if self.shared_source:
            return from_shared_source(x, self.num_prompts, num_frames)
        return from_source(x, self.num_prompts, num_frames)

    def reset(self) -> None:
        self.cur_step = 0

    # ---- frame attention (called by `processors.ControlledFrameAttention`) ---------------------
    def attention_place(self, place: LayerPlace) -> bool:
        """True for the frame-attention layers this injection acts on: `up_blocks[block:]`."""
        k = decoder_block(place)
        return k is not None and k >= self.config.block and bool(self.attention_steps)

    def replaces_self(self, place: LayerPlace) -> bool:
        return self.cur_step in self.attention_steps and self.attention_place(place)

    def replace_self_queries_keys(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: b f h n d / b f h m d -> the targets' queries and keys are their source's."""
        return self._from_source(q), self._from_source(k)

    # ---- decoder ResNet features -----------------------------------------------------------------
    def _feature_hook(self, module, inputs, output):  # output: (b f) c h w
        if self.cur_step in self.feature_steps:
            return self._from_source(output, self._context.num_frames)
        return None

    @contextlib.contextmanager
    def feature_hooks(self, unet):
        """Forward hooks on the ResNets of `up_blocks[block]` of a VideoUNet; removed on exit."""
        blocks = unet.unet.up_blocks
        if self.config.block >= len(blocks):
            raise P2PError(f"--inject-block {self.config.block}: this UNet's decoder has blocks 0..{len(blocks) - 1}")
        self._context = unet.context
        handles = []
        try:
            if self.feature_steps:
                for resnet in blocks[self.config.block].resnets:
                    handles.append(resnet.register_forward_hook(self._feature_hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def step_callback(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        self.cur_step = i + 1
        return latents

"""A structure condition per frame through one or several diffusers ControlNets (DESIGN §1.12).

`StructureControl` holds the nets, each net's maps of the video `(f, 3, H, W)` in [0, 1], their scales and
the window of steps where they act. It is a model input: the samplers hand it to the UNet unchanged
(`model_inputs={"control": control}`), and `VideoUNet.forward` calls it on the frames folded into the batch:

    down, mid = control(sample, timestep, encoder_hidden_states)     # sample (b f) c h w, text (b f) L D

The maps are repeated for every video of the batch `b` (guidance halves, source and target branches), so one
control serves any batch the sampler makes. `select_frames` gives the control of some frames (a window of a
long video, its anchor frames). `for_steps(steps)` binds the window `start … end` (fractions of the steps
that run, diffusers' `control_guidance_start/end`) to the sampling grid: at a timestep outside it the UNet
runs without the ControlNet; inversion walks the same grid, so it sees the same window. A scale of 0 gives
no residuals at all: the uncontrolled model exactly. `key()` digests what the model is given (weights,
maps, scales, window) for cache keys.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..errors import ConfigError, ModelError


def _digest_tensor(digest, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(net: torch.nn.Module) -> str:
    """Digest of a ControlNet's weights and config (one per loaded net; cached on the instance's id)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in dict(getattr(net, "config", {})).items() if not k.startswith("_")},
                             sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        _digest_tensor(digest, tensor)
    return digest.hexdigest()[:16]


def check_scale(value: float, name: str = "controlnet_conditioning_scale") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 10:
        raise ConfigError(f"{name} must be a number in [0, 10], got {value!r}")
    return float(value)


def check_window(start: float, end: float) -> tuple[float, float]:
    for name, v in (("control_guidance_start", start), ("control_guidance_end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
    if start >= end:
        raise ConfigError(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")
    return float(start), float(end)


def check_fits(net, unet_config) -> None:
    """Refuse a ControlNet made for another base model: its cross-attention width or block channels differ."""
    for key in ("cross_attention_dim", "block_out_channels", "in_channels", "layers_per_block", "down_block_types"):
        mine, theirs = net.config.get(key), unet_config.get(key)
        if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            raise ModelError(f"the ControlNet was made for another base model: its {key} is {mine}, the model's UNet "
                             f"has {theirs}; pass a ControlNet trained for this model")


def load_controlnet(path_or_id: str, device=None, dtype=None):
    """A diffusers ControlNetModel from a folder or an id already in the Hugging Face cache (never downloaded)."""
    from diffusers import ControlNetModel

    try:
        net = ControlNetModel.from_pretrained(str(path_or_id), local_files_only=True, use_safetensors=True)
    except Exception as e:  # OSError, EnvironmentError, ValueError: not a ControlNet folder, or not here
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load the ControlNet {str(path_or_id)!r} ({first}); pass a diffusers ControlNet folder "
                         "(config.json + diffusion_pytorch_model.safetensors) or an id already in your Hugging Face "
                         "cache") from None
    net.requires_grad_(False).eval()
    if device is not None or dtype is not None:
        net.to(device=device, dtype=dtype)
    return net


@dataclass(frozen=True, eq=False)
class StructureControl:
    """ControlNet(s) and their per-frame maps (module docstring).

    nets: the ControlNetModels; maps: one `(f, 3, H, W)` float tensor in [0, 1] per net; scales: one
    `controlnet_conditioning_scale` per net; start/end: the window, fractions of the steps that run.
    """

    nets: tuple
    maps: tuple
    scales: tuple
    start: float = 0.0
    end: float = 1.0
    active: frozenset | None = None  # timesteps where the nets act (None: every timestep; set by `for_steps`)
    digests: tuple = field(default=(), repr=False)  # weights_digest of each net, computed once
    guess_mode: bool = False  # diffusers' guess_mode: residuals for the conditional videos only, scaled by depth
    unconditional: tuple = ()  # videos of the batch (not frames) that get no residuals (guess mode; `guided`)

    @classmethod
    def make(cls, controlnet, maps: Sequence[torch.Tensor] | torch.Tensor,
             controlnet_conditioning_scale: float | Sequence[float] = 1.0, control_guidance_start: float = 0.0,
             control_guidance_end: float = 1.0, guess_mode: bool = False) -> "StructureControl":
        """diffusers' names: `controlnet` (a ControlNetModel, a list of them or a MultiControlNetModel), `maps` (one
        `(f, 3, H, W)` tensor in [0, 1] per net: the `image` of diffusers' ControlNet pipelines, one per frame),
        `controlnet_conditioning_scale` (one for all nets or one per net), `control_guidance_start/end`,
        `guess_mode` (as diffusers' ControlNet pipelines: under classifier-free guidance the nets see only the
        conditional half, and their residuals grow from 0.1x at the first block to 1x at the middle block)."""
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        if isinstance(controlnet, MultiControlNetModel):
            controlnet = list(controlnet.nets)
        nets = tuple(controlnet) if isinstance(controlnet, (list, tuple)) else (controlnet,)
        maps = (maps,) if isinstance(maps, torch.Tensor) else tuple(maps)
        scales, start, end = controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        if not nets or len(nets) != len(maps):
            raise ConfigError(f"give one set of maps per ControlNet: {len(nets)} ControlNet(s), {len(maps)} set(s) of maps")
        scales = (scales,) * len(nets) if isinstance(scales, (int, float)) else tuple(scales)
        if len(scales) != len(nets):
            raise ConfigError(f"give one conditioning scale per ControlNet (or one for all): {len(nets)} ControlNet(s), "
                              f"{len(scales)} scale(s)")
        scales = tuple(check_scale(s) for s in scales)
        start, end = check_window(start, end)
        frames = {m.shape[0] for m in maps}
        for m in maps:
            if m.ndim != 4 or m.shape[1] != 3:
                raise ConfigError(f"control maps must be (f, 3, H, W), got {tuple(m.shape)}")
        if len(frames) != 1:
            raise ConfigError(f"every ControlNet needs maps of the same frames; got {sorted(frames)} frames")
        return cls(nets, tuple(m.float() for m in maps), scales, start, end, None,
                   tuple(weights_digest(n) for n in nets), bool(guess_mode))

    @property
    def num_frames(self) -> int:
        return self.maps[0].shape[0]

    def check_frames(self, num_frames: int, height: int, width: int) -> None:
        """The maps must match the video: `num_frames` frames of height x width pixels."""
        f, _, h, w = self.maps[0].shape
        if f != num_frames:
            raise ConfigError(f"{f} control maps for {num_frames} frames; give one map per frame")
        if (h, w) != (height, width):
            raise ConfigError(f"control maps are {w}x{h}, the frames {width}x{height}; make them the frames' size")

    def select_frames(self, index) -> "StructureControl":
        """The control of some frames (a slice or a list of frame indices)."""
        return replace(self, maps=tuple(m[index] for m in self.maps))

    def for_steps(self, steps: Sequence[int]) -> "StructureControl":
        """Bind the window to the steps that run (noisiest first): step i of n acts when start <= i / n and
        (i + 1) / n <= end (diffusers' `controlnet_keep`)."""
        n = len(steps)
        if self.start == 0.0 and self.end == 1.0:
            return replace(self, active=None)
        active = frozenset(int(t) for i, t in enumerate(steps) if i / n >= self.start and (i + 1) / n <= self.end)
        return replace(self, active=active)

    def guided(self, unconditional: Sequence[int]) -> "StructureControl":
        """The control of a classifier-free-guidance batch whose videos `unconditional` carry the empty prompt:
        in guess mode they get no residuals; otherwise nothing changes."""
        return replace(self, unconditional=tuple(unconditional)) if self.guess_mode else self

    def scales_at(self, timestep) -> tuple[float, ...]:
        if self.active is not None and int(torch.as_tensor(timestep).reshape(-1)[0]) not in self.active:
            return (0.0,) * len(self.nets)
        return self.scales

    def key(self) -> str:
        """Digest of what the UNet is given: the nets' weights, the maps, scales and window."""
        digest = hashlib.sha256()
        active = None if self.active is None else sorted(self.active)
        digest.update(repr((self.digests, self.scales, self.start, self.end, active)
                           + (("guess_mode",) if self.guess_mode else ())).encode())
        for m in self.maps:
            _digest_tensor(digest, m)
        return "control:" + digest.hexdigest()[:16]

    def record(self) -> dict:
        return {"scales": list(self.scales), "start": self.start, "end": self.end, "nets": list(self.digests),
                "frames": self.num_frames, "guess_mode": self.guess_mode}

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        """Residuals for frames folded into the batch: sample `(b f) c h w`, text `(b f) L D`. Returns
        `(down_block_res_samples, mid_block_res_sample)`, or None where every scale is 0 here."""
        scales = self.scales_at(timestep)
        if not any(scales):
            return None
        f = self.num_frames
        if sample.shape[0] % f:
            raise ValueError(f"a batch of {sample.shape[0]} frames is not a whole number of {f}-frame videos")
        b = sample.shape[0] // f
        videos = [v for v in range(b) if v not in self.unconditional]
        if not videos:
            return None
        rows = None if len(videos) == b else torch.cat([torch.arange(v * f, (v + 1) * f) for v in videos])
        x, text = (sample, encoder_hidden_states) if rows is None else (sample[rows], encoder_hidden_states[rows])
        if timestep is not None and torch.as_tensor(timestep).numel() == sample.shape[0] and rows is not None:
            timestep = torch.as_tensor(timestep)[rows]
        down, mid = None, None
        for net, maps, scale in zip(self.nets, self.maps, scales):
            if not scale:
                continue
            cond = maps.to(sample.device, net.dtype).repeat(len(videos), 1, 1, 1)  # (b f) 3 H W
            d, m = net(x.to(net.dtype), timestep, text.to(net.dtype), controlnet_cond=cond,
                       conditioning_scale=scale, guess_mode=self.guess_mode, return_dict=False)
            if down is None:  # several nets add their residuals (diffusers' MultiControlNetModel)
                down, mid = list(d), m
            else:
                down, mid = [a + x for a, x in zip(down, d)], mid + m
        if rows is not None:  # the unconditional videos' rows stay zero (diffusers' guess mode)
            down = [r.new_zeros((sample.shape[0], *r.shape[1:])).index_copy(0, rows.to(r.device), r) for r in down]
            mid = mid.new_zeros((sample.shape[0], *mid.shape[1:])).index_copy(0, rows.to(mid.device), mid)
        return tuple(down), mid


def condition_label(control: str) -> str:
    """A short name of a condition for files and captions: the kind, or the maps' file/folder name."""
    from pathlib import Path

    from .maps import KINDS

    return control if control in KINDS else Path(control).stem or "maps"


def build_control(frames, controls: Sequence[str], controlnets: Sequence[str], scales: Sequence[float],
                  start: float, end: float, unet_config, device=None, dtype=None, depth_model=None,
                  canny_thresholds: tuple[int, int] = (50, 100), maps_sampling: dict | None = None,
                  guess_mode: bool = False):
    """The structure condition of a video: per `controls[i]` (a kind of `ei2.structure.maps`, or a path to maps the
    user brings, sampled with `maps_sampling` = {stride, start} like the source) the maps of `frames`
    `(f, h, w, 3)` uint8, and the ControlNet `controlnets[i]` (a folder or cached id), checked against the base
    UNet's config. Returns `(StructureControl, [(label, maps (f, h, w, 3) uint8), ...])`."""
    from . import maps as M

    if len(controls) != len(controlnets):
        raise ConfigError(f"give one --controlnet per --control: {len(controls)} condition(s), "
                          f"{len(controlnets)} ControlNet(s)")
    f, h, w = frames.shape[:3]
    made, nets = [], []
    for kind, source in zip(controls, controlnets):
        net = load_controlnet(source, device=device, dtype=dtype)
        check_fits(net, unet_config)
        nets.append(net)
        if kind in M.KINDS:
            m = M.compute(kind, frames, depth_model=depth_model, canny_low=canny_thresholds[0],
                          canny_high=canny_thresholds[1])
        else:
            m = M.user_maps(kind, f, (h, w), **(maps_sampling or {}))
        made.append((condition_label(kind), m))
    control = StructureControl.make(nets, [M.as_condition(m) for _, m in made], scales, start, end, guess_mode)
    return control, made


def guided_inputs(model_inputs: dict | None, unconditional: Sequence[int]) -> dict:
    """`model_inputs` for a guidance batch whose videos `unconditional` carry the empty prompt (the structure
    condition's guess mode needs to know them; every other input is unchanged)."""
    control = (model_inputs or {}).get("control")
    return model_inputs if control is None else {**model_inputs, "control": control.guided(unconditional)}

"""How an edit samples, frozen: the DDIM grid, where on it sampling starts, and classifier-free guidance
(DESIGN §1.7). One value travels from the job layer through the pipeline to the samplers, and every check
of these settings lives here, once.

    sampling = Sampling(num_inference_steps=50, strength=0.6, guidance_scale=7.5)
    sampling.start       # 20: the grid index where sampling begins (the last int(50 * 0.6) steps run)
    sampling.steps_run   # 30: the steps that are sampled (what P2P and injection fractions count)

A bad value raises `SettingError`, whose message names the setting ("strength must be in (0, 1] ..."); a front
end maps the setting's name to its own word for it (the CLI: `--strength`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .defaults import GUIDANCE_RESCALE, GUIDANCE_RESCALE_STD, GUIDANCE_SCALE, INFERENCE_STEPS, STRENGTH
from .errors import SettingError

MAX_INFERENCE_STEPS = 1000  # the training timesteps of Stable Diffusion
MAX_GUIDANCE_SCALE = 100.0
RESCALE_STDS = ("video", "frame")


def start_step(num_steps: int, strength: float = STRENGTH) -> int:
    """Index of the grid where sampling at `strength` starts: the last `int(num_steps * strength)` steps run
    (diffusers img2img's rule); strength 1 starts at 0 (x_T). A strength that runs no step is a `SettingError`."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise SettingError("strength", f"must be in (0, 1] (1: the whole DDIM grid), got {strength!r}")
    run = min(int(num_steps * strength), num_steps)
    if run < 1:
        raise SettingError("strength", f"{strength} of {num_steps} inference steps runs no step; raise it to at "
                                        f"least {1 / num_steps:.3g} or raise the inference steps")
    return num_steps - run


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of an edit (module docstring); checked when made."""

    num_inference_steps: int = INFERENCE_STEPS
    strength: float = STRENGTH
    guidance_scale: float = GUIDANCE_SCALE
    guidance_rescale: float = GUIDANCE_RESCALE
    guidance_rescale_std: str = GUIDANCE_RESCALE_STD
    negative_prompt: str | None = None

    def __post_init__(self):
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_INFERENCE_STEPS:
            raise SettingError("inference_steps", f"must be between 1 and {MAX_INFERENCE_STEPS} (the training "
                                                  f"timesteps of Stable Diffusion), got {steps!r}")
        start_step(steps, self.strength)
        g = self.guidance_scale
        if not (isinstance(g, (int, float)) and math.isfinite(g) and 0 <= g <= MAX_GUIDANCE_SCALE):
            raise SettingError("guidance_scale", f"must be between 0 and {MAX_GUIDANCE_SCALE:g} (1: no guidance; "
                                                 f"Stable Diffusion's usual 7.5), got {g!r}")
        r = self.guidance_rescale
        if not (isinstance(r, (int, float)) and 0 <= r <= 1):
            raise SettingError("guidance_rescale", f"must be in [0, 1] (0: off, 0.7: Lin et al.), got {r!r}")
        if self.guidance_rescale_std not in RESCALE_STDS:
            raise SettingError("guidance_rescale_std", f"must be one of {', '.join(RESCALE_STDS)}, got "
                                                       f"{self.guidance_rescale_std!r}")

    @property
    def start(self) -> int:
        """The grid index where sampling begins (`start_step`)."""
        return start_step(self.num_inference_steps, self.strength)

    @property
    def steps_run(self) -> int:
        """The DDIM steps that are sampled: the count Prompt-to-Prompt and injection fractions use."""
        return self.num_inference_steps - self.start

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (a scale of 1 is the conditional prediction alone)."""
        return self.guidance_scale != 1.0

    def replace(self, **changes) -> "Sampling":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_sampling(sampling: Sampling | None = None, **options) -> Sampling:
    """`sampling`, or a `Sampling` of the keyword options (its field names; unknown ones are a TypeError)."""
    if sampling is not None and options:
        raise TypeError(f"give a Sampling or its fields, not both (got {', '.join(options)})")
    if sampling is not None:
        return sampling
    unknown = [k for k in options if k not in SAMPLING_FIELDS]
    if unknown:
        raise TypeError(f"unexpected sampling option(s) {', '.join(unknown)}; use {', '.join(SAMPLING_FIELDS)}")
    return Sampling(**options)


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))

"""DDIM sampling of the source and target branches together under attention control (DESIGN §1.8, §1.9).

`ei2.inversion.ddim_sample` with the controlled processors installed: a Prompt-to-Prompt controller
and/or a structure-preserving feature injection; their step callbacks (local blending, step counting)
run after each step. Batch: `b = p` prompts (source first), `(uncond, cond)` halves with
classifier-free guidance; the unconditional embedding may change per step (null-text inversion).
An injection with `shared_source` runs the source once, without guidance (`ddim_sample`'s `unguided`). The
source branch leaves the batch after the last step where the controller and the injection need it (their
`last_source_step`; `ddim_sample`'s `drop_first`/`drop_after`): only the targets are returned then.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..inversion import ddim_sample
from ..sampling import Sampling
from .controllers import AttentionStore
from .injection import FeatureInjection
from .processors import attention_control


@torch.no_grad()
def controlled_sample(unet, scheduler, latents: torch.Tensor, text_emb: torch.Tensor, sampling: Sampling,
                      uncond_emb: torch.Tensor | None = None, *, controller: AttentionStore | None = None,
                      injection: FeatureInjection | None = None, progress: Callable | None = None,
                      callback: Callable | None = None, model_inputs: dict | None = None) -> torch.Tensor:
    """DDIM sampling (eta = 0) of `latents` (p, c, f, h, w) under `text_emb` (p, L, D), source first, as
    `sampling` says (`ei2.inversion.ddim_sample`; the controller and the injection count the steps that run).

    `uncond_emb`: (1, L, D), or (steps, 1, L, D) from null-text inversion. `controller`: an
    `AttentionStore` or an edit controller; `injection`: a `FeatureInjection`. Each is reset, installed
    for the loop and removed after. `callback(i, t, latents) -> latents | None` runs after their step callbacks.
    `model_inputs`: the UNet's other inputs (a structure condition), every branch under them.
    """
    options = dict(progress=progress, model_inputs=model_inputs)
    if controller is None and injection is None:
        return ddim_sample(unet, scheduler, latents, text_emb, sampling, uncond_emb, callback=callback, **options)
    for name, control in (("controller", controller), ("injection", injection)):
        prompts = getattr(control, "num_prompts", latents.shape[0])
        if prompts != latents.shape[0]:
            raise ValueError(f"the {name} is for {prompts} prompts, the latents have batch {latents.shape[0]}")

    def step_callback(i, t, x):
        for control in (controller, injection):
            if control is not None:
                x = control.step_callback(i, t, x)
        replaced = callback(i, t, x) if callback is not None else None
        return x if replaced is None else replaced

    if injection is not None and injection.shared_source:
        if controller is not None:
            raise ValueError("an injection from a shared source runs without a controller (its maps need every "
                             "branch's guidance halves)")
        options.update(unguided=1)
    # the source branch leaves after the last step that needs it (never, with local blending or recorded maps)
    needed = [c.last_source_step for c in (controller, injection) if c is not None]
    if None not in needed:
        options.update(drop_first=1, drop_after=max(needed))
    for control in (controller, injection):
        if control is not None:
            control.reset()
    with attention_control(unet, controller, injection):
        return ddim_sample(unet, scheduler, latents, text_emb, sampling, uncond_emb, callback=step_callback,
                           **options)

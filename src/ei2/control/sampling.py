"""DDIM sampling of the source and target branches together under an attention controller (DESIGN §1.8).

The same deterministic DDIM update and timestep grid as `ei2.inversion.ddim_sample` (`_ddim`); in addition the
unconditional embedding may change per step (null-text inversion) and a controller edits attention
and blends latents after each step. Batch: `b = p` prompts (source first), `(uncond, cond)` halves
with classifier-free guidance.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import _ddim
from .controllers import AttentionStore
from .processors import attention_control


def uncond_at(uncond_emb: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """(1, L, D) for every step, or (steps, 1, L, D) per step (null-text inversion) -> step i's (1, L, D)."""
    if uncond_emb is None or uncond_emb.ndim == 3:
        return uncond_emb
    return uncond_emb[i]


@torch.no_grad()
def controlled_sample(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    uncond_emb: torch.Tensor | None = None,
    controller: AttentionStore | None = None,
    progress: Callable | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DDIM sampling (eta = 0) of `latents` (p, c, f, h, w) under `text_emb` (p, L, D), source first.

    `uncond_emb`: (1, L, D), or (steps, 1, L, D) from null-text inversion. `controller`: an
    `AttentionStore` or an edit controller; it is reset, installed for the loop and removed after.
    `callback(i, t, latents) -> latents | None` runs after the controller's step callback.
    """
    _ddim.prediction_type(scheduler)
    if guidance_scale != 1.0 and uncond_emb is None:
        raise ValueError("classifier-free guidance needs uncond_emb (the embedding of the negative/empty prompt)")
    if controller is not None and controller.num_prompts != latents.shape[0]:
        raise ValueError(f"the controller is for {controller.num_prompts} prompts, the latents have batch {latents.shape[0]}")
    steps = _ddim.timesteps(scheduler, num_inference_steps, latents.device)
    if uncond_emb is not None and uncond_emb.ndim == 4 and uncond_emb.shape[0] != len(steps):
        raise ValueError(f"{uncond_emb.shape[0]} per-step unconditional embeddings for {len(steps)} steps; "
                         "run null-text inversion with the same number of steps")
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    if controller is not None:
        controller.reset()
    control = attention_control(unet, controller) if controller is not None else contextlib.nullcontext()
    with control:
        for i, t in enumerate(steps):
            eps = _ddim.predict_eps(unet, scheduler, x, t, text_emb, uncond_at(uncond_emb, i), guidance_scale)
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            x = _ddim.step(eps, x, _ddim.alpha(scheduler, t, x.device), _ddim.alpha(scheduler, nxt, x.device))
            if controller is not None:
                x = controller.step_callback(i, t, x)
            if callback is not None:
                replaced = callback(i, t, x)
                if replaced is not None:
                    x = replaced
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return x

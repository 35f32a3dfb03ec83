"""DDIM sampling of the source and target branches together under an attention controller (DESIGN §1.8).

`ei2.inversion.ddim_sample` with the controller's processors installed and its step callback (local
blending, step counting) run after each step. Batch: `b = p` prompts (source first), `(uncond, cond)`
halves with classifier-free guidance; the unconditional embedding may change per step (null-text inversion).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..inversion import ddim_sample
from .controllers import AttentionStore
from .processors import attention_control


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
    if controller is None:
        return ddim_sample(unet, scheduler, latents, text_emb, num_inference_steps, guidance_scale, uncond_emb,
                           progress, callback)
    if controller.num_prompts != latents.shape[0]:
        raise ValueError(f"the controller is for {controller.num_prompts} prompts, the latents have batch {latents.shape[0]}")

    def step_callback(i, t, x):
        x = controller.step_callback(i, t, x)
        replaced = callback(i, t, x) if callback is not None else None
        return x if replaced is None else replaced

    controller.reset()
    with attention_control(unet, controller):
        return ddim_sample(unet, scheduler, latents, text_emb, num_inference_steps, guidance_scale, uncond_emb,
                           progress, step_callback)

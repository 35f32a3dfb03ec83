"""Null-text inversion (Mokady et al. 2023) of video latents `(b, c, f, h, w)` (DESIGN §1.8).

Plain DDIM inversion (no guidance) gives a trajectory x*_0 -> x*_T that classifier-free guidance
(scale w) no longer follows back. Null-text inversion keeps the weights and the source prompt's
embedding c and, for each sampling step i (t_i -> t_{i+1}), optimises the unconditional embedding ∅_i,
starting from ∅_{i-1} (the empty prompt's embedding at i = 0):

    min_∅  || x*_{i+1} - DDIM(x_i, eps_∅ + w (eps_c - eps_∅)) ||²,   then x_{i+1} = DDIM(x_i, ... ∅_i)

with Adam, lr = lr_0 (1 - i / 2n), at most `num_inner_steps` iterations, stopping early once the loss
is below eps + 2e-5 i. Sampling with the per-step ∅_i (`sampling.controlled_sample`) reconstructs the
source closely, and Prompt-to-Prompt edits start from it. The result (x_T and the (steps, 1, L, D)
embeddings) is cached like inverted latents, as safetensors.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..defaults import NULL_TEXT_EARLY_STOP_EPSILON, NULL_TEXT_INNER_STEPS, NULL_TEXT_LEARNING_RATE
from ..inversion import (InversionCache, alpha, ddim_inversion_trajectory, ddim_move, model_output, prediction_type,
                         timesteps)
from ..sampling import Sampling
from ..structure.controlnet import guided_inputs


def default_progress(total: int):
    return tqdm(total=total, desc="null-text inversion", dynamic_ncols=True)


@dataclass
class NullTextInversion:
    """x_T `(b, c, f, h, w)` and the optimised unconditional embeddings `(steps, 1, L, D)`, one per sampling step."""

    latents: torch.Tensor
    uncond_embeddings: torch.Tensor


def null_text_inversion(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    uncond_emb: torch.Tensor,
    sampling: Sampling,
    *,
    num_inner_steps: int = NULL_TEXT_INNER_STEPS,
    learning_rate: float = NULL_TEXT_LEARNING_RATE,
    early_stop_epsilon: float = NULL_TEXT_EARLY_STOP_EPSILON,
    progress: Callable | None = default_progress,
    trajectory: torch.Tensor | None = None,
    model_inputs: dict | None = None,
) -> NullTextInversion:
    """Null-text inversion of clean latents `(b, c, f, h, w)` under `text_emb` (1 or b, L, D), for sampling as
    `sampling` says (its grid, guidance scale and strength).

    `uncond_emb` (1, L, D): the negative (or empty) prompt's embedding, the starting point. Sample the result with
    `controlled_sample(..., sampling, uncond_emb=result.uncond_embeddings)`.
    Only the steps from `sampling.start` (an edit strength) are optimised, and `result.latents` is the
    inversion's latent at that level.
    `trajectory`: the DDIM inversion trajectory of `latents` if already known (`ddim_inversion_trajectory`).
    `progress(total=n)`: a progress-bar factory (None: no bar); its bar counts inner iterations.
    `model_inputs`: the UNet's other inputs (`ei2.inversion.model_output`), e.g. a structure condition.
    """
    if num_inner_steps < 1:
        raise ValueError(f"num_inner_steps must be at least 1, got {num_inner_steps}")
    num_inference_steps, start, guidance_scale = sampling.num_inference_steps, sampling.start, sampling.guidance_scale
    kind = prediction_type(scheduler)
    if trajectory is None:
        trajectory = ddim_inversion_trajectory(unet, scheduler, latents, text_emb, num_inference_steps,
                                               model_inputs=model_inputs)
    steps = timesteps(scheduler, num_inference_steps, latents.device)
    n = len(steps)
    if len(trajectory) != n + 1:
        raise ValueError(f"a trajectory of {len(trajectory)} latents for {n} steps; expected {n + 1}")
    text_emb = text_emb.expand(latents.shape[0], -1, -1)
    uncond = uncond_emb.detach().clone().float()
    optimised = []
    bar = progress(total=(n - start) * num_inner_steps) if progress is not None else None
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)  # only the embedding is optimised; no gradients into (tuned) weights
    # under fp16 autocast the per-element gradients of a mean over a whole video (~1e-7) underflow:
    # scale the loss for the backward pass and unscale the embedding's (fp32) gradient, as GradScaler does
    loss_scale = 2.0**16 if torch.is_autocast_enabled() else 1.0
    try:
        x = trajectory[n - start]
        for i, t in enumerate(steps):
            if i < start:
                continue
            target = trajectory[n - i - 1]
            alpha_t = alpha(scheduler, t, x.device)
            alpha_next = alpha(scheduler, steps[i + 1] if i + 1 < n else None, x.device)
            with torch.no_grad():
                out_cond = model_output(unet, x, t, text_emb, model_inputs=model_inputs)
            uncond = uncond.detach().requires_grad_(True)
            optimizer = torch.optim.Adam([uncond], lr=learning_rate * (1.0 - i / (2 * n)))
            done = 0
            for _ in range(num_inner_steps):
                with torch.enable_grad():
                    out_uncond = model_output(unet, x, t, uncond.to(text_emb.dtype).expand_as(text_emb),
                                              model_inputs=guided_inputs(model_inputs, range(x.shape[0])))
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                    loss = F.mse_loss(ddim_move(out, x, alpha_t, alpha_next, kind).float(), target.float())
                    optimizer.zero_grad()
                    (loss * loss_scale).backward()
                uncond.grad /= loss_scale
                if not torch.isfinite(uncond.grad).all():  # fp16 overflow: smaller scale, same iteration again
                    loss_scale /= 2
                    continue
                optimizer.step()
                done += 1
                if bar is not None:
                    bar.update()
                if loss.item() < early_stop_epsilon + i * 2e-5:
                    break
            if bar is not None and done < num_inner_steps:
                bar.update(num_inner_steps - done)
            uncond = uncond.detach()
            optimised.append(uncond.clone())
            with torch.no_grad():
                out = model_output(unet, x, t, text_emb, uncond.to(text_emb.dtype), guidance_scale, model_inputs)
                x = ddim_move(out, x, alpha_t, alpha_next, kind)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()
    return NullTextInversion(trajectory[n - start].detach(), torch.stack(optimised))


def null_text_key(video_hash: str, adapter_hash: str, num_inference_steps: int, prompt: str, guidance_scale: float,
                  num_inner_steps: int, learning_rate: float, early_stop_epsilon: float, extra: str = "") -> str:
    """Cache key of a null-text inversion: the video, the adapter, steps, prompt and the optimisation settings."""
    raw = (f"null-text|{video_hash}|{adapter_hash}|{num_inference_steps}|{prompt}|{guidance_scale}|"
           f"{num_inner_steps}|{learning_rate}|{early_stop_epsilon}|{extra}")
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class NullTextCache(InversionCache):
    """Null-text inversions by key, in memory and (with `directory`) as `<key>.nulltext.safetensors`."""

    suffix = ".nulltext.safetensors"

    def get(self, key: str) -> NullTextInversion | None:
        tensors = self.get_tensors(key)
        if tensors is None or set(tensors) != {"latents", "uncond_embeddings"}:
            return None
        return NullTextInversion(tensors["latents"], tensors["uncond_embeddings"])

    def put(self, key: str, result: NullTextInversion) -> None:
        self.put_tensors(key, {"latents": result.latents, "uncond_embeddings": result.uncond_embeddings})

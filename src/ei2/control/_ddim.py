"""The DDIM arithmetic of `ei2.inversion`, restated for the controlled sampler and null-text inversion.

Same timestep grid (the scheduler's `set_timesteps`), same deterministic update (eta = 0), same
v-to-epsilon conversion; `tests/test_control.py` checks that both give identical latents. The
controlled sampler needs what `ddim_sample` does not take: a per-step unconditional embedding.

    eps = model output                              (v-prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x)
    x'  = sqrt(a') (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps
"""
from __future__ import annotations

import torch


def prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r} is not supported; use an epsilon or v-prediction model")
    return kind


def timesteps(scheduler, num_inference_steps: int, device) -> list[int]:
    scheduler.set_timesteps(num_inference_steps, device=device)
    return [int(t) for t in scheduler.timesteps]


def alpha(scheduler, t: int | None, device) -> torch.Tensor:
    """Cumulative alpha at timestep t; None means past the last step (x0)."""
    if t is None:
        return torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    return scheduler.alphas_cumprod[int(t)].float().to(device)


def predict_eps(unet, scheduler, latents, t, text_emb, uncond_emb=None, guidance_scale: float = 1.0):
    """eps (fp32) at timestep t, with classifier-free guidance (uncond half first) when `uncond_emb` is given."""
    if uncond_emb is None or guidance_scale == 1.0:
        out = unet(latents, t, text_emb).sample.float()
    else:
        b = latents.shape[0]
        both = unet(torch.cat([latents, latents]), t, torch.cat([uncond_emb.expand(b, -1, -1), text_emb])).sample
        uncond, cond = both.float().chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    if prediction_type(scheduler) == "epsilon":
        return out
    a = alpha(scheduler, t, latents.device)
    return a.sqrt() * out + (1 - a).sqrt() * latents.float()


def step(eps, sample, alpha_from, alpha_to):
    """Deterministic DDIM move of `sample` from cumulative alpha `alpha_from` to `alpha_to` (either direction)."""
    x0 = (sample.float() - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return (alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps).to(sample.dtype)

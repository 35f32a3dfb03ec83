"""DDIM inversion and DDIM sampling on video latents `(b, c, f, h, w)` (DESIGN §1.7).

Plain functions in the manner of k-diffusion's samplers: `(unet, scheduler, latents, text, steps, ...)`.
Both walk the same timestep grid, the scheduler's own `set_timesteps` (spacing, offset), with the
deterministic DDIM update (eta = 0) between cumulative alphas a -> a':

    eps = model output                              (v-prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x)
    x0  = (x - sqrt(1 - a) eps) / sqrt(a)
    x'  = sqrt(a') x0 + sqrt(1 - a') eps

Sampling goes from t_i to t_{i+1} (the final step to `final_alpha_cumprod`); inversion runs the grid
backwards. Classifier-free guidance: eps = eps_u + s (eps_c - eps_u), uncond and cond in one batch.

`InversionCache` stores inverted latents as safetensors, keyed by (video, adapter, steps, prompt).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .video import atomic_path


def _alpha(scheduler, t: int | None) -> torch.Tensor:
    """Cumulative alpha at timestep t; None means past the last step (x0)."""
    if t is None:
        return torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    return scheduler.alphas_cumprod[int(t)].float()


def _prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r} is not supported; use an epsilon or v-prediction model")
    return kind


def to_epsilon(model_output, sample, alpha, prediction_type: str = "epsilon"):
    """The noise prediction eps from the model output at cumulative alpha `alpha` (the level the model was told)."""
    if prediction_type == "epsilon":
        return model_output
    return alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample  # v: eps = sqrt(a) v + sqrt(1 - a) x


def ddim_step(eps, sample, alpha_from, alpha_to):
    """Deterministic DDIM move of `sample` from cumulative alpha `alpha_from` to `alpha_to` (either direction)."""
    x0 = (sample - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def _timesteps(scheduler, num_inference_steps: int, device) -> list[int]:
    scheduler.set_timesteps(num_inference_steps, device=device)
    return [int(t) for t in scheduler.timesteps]


def _predict_eps(unet, scheduler, kind, latents, t, text_emb, uncond_emb=None, guidance_scale=1.0,
                 cross_attention_kwargs=None):
    """eps (fp32) predicted at timestep t for `latents`, with classifier-free guidance when `uncond_emb` is given.

    v-predictions are converted with the alpha of t, the level the model was evaluated at, so inversion
    treats epsilon and v models alike.
    """
    if uncond_emb is None or guidance_scale == 1.0:
        out = unet(latents, t, text_emb, cross_attention_kwargs=cross_attention_kwargs).sample.float()
    else:
        b = latents.shape[0]
        both = unet(
            torch.cat([latents, latents]), t, torch.cat([uncond_emb.expand(b, -1, -1), text_emb]),
            cross_attention_kwargs=cross_attention_kwargs,
        ).sample.float()
        uncond, cond = both.chunk(2)
        out = uncond + guidance_scale * (cond - uncond)
    return to_epsilon(out, latents.float(), _alpha(scheduler, t).to(latents.device), kind)


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    num_inference_steps: int = 50,
    progress: Callable | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents `(b, c, f, h, w)` to x_T, without guidance.

    `progress` is an optional context-manager factory `progress(total=n)` (e.g. a pipeline's `progress_bar`).
    Returns x_T with the same shape and dtype.
    """
    kind = _prediction_type(scheduler)
    steps = _timesteps(scheduler, num_inference_steps, latents.device)
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    previous = None  # the clean end of the grid
    for t in reversed(steps):
        # eps is evaluated at the next (noisier) timestep on the current latents, as in Tune-A-Video
        eps = _predict_eps(unet, scheduler, kind, x, t, text_emb)
        x = ddim_step(eps, x.float(), _alpha(scheduler, previous).to(x.device), _alpha(scheduler, t).to(x.device))
        x = x.to(latents.dtype)
        previous = t
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return x


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    uncond_emb: torch.Tensor | None = None,
    progress: Callable | None = None,
    callback: Callable | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """DDIM sampling (eta = 0) from x_T `(b, c, f, h, w)` under `text_emb` `(b, L, D)`.

    With `uncond_emb` `(1 or b, L, D)` and `guidance_scale` != 1, classifier-free guidance is applied.
    `callback(i, t, latents) -> latents | None` runs after every step (it may replace the latents).
    """
    kind = _prediction_type(scheduler)
    if guidance_scale != 1.0 and uncond_emb is None:
        raise ValueError("classifier-free guidance needs uncond_emb (the embedding of the negative/empty prompt)")
    steps = _timesteps(scheduler, num_inference_steps, latents.device)
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    for i, t in enumerate(steps):
        eps = _predict_eps(unet, scheduler, kind, x, t, text_emb, uncond_emb, guidance_scale, cross_attention_kwargs)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        x = ddim_step(eps, x.float(), _alpha(scheduler, t).to(x.device), _alpha(scheduler, nxt).to(x.device))
        x = x.to(latents.dtype)
        if callback is not None:
            replaced = callback(i, t, x)
            if replaced is not None:
                x = replaced
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return x


# ---------------------------------------------------------------------------------------------- cache
def tensor_hash(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def inversion_key(video_hash: str, adapter_hash: str, num_inference_steps: int, prompt: str, extra: str = "") -> str:
    """Cache key of inverted latents: the video, the adapter (tuned tensors + base model), steps and prompt."""
    raw = f"{video_hash}|{adapter_hash}|{num_inference_steps}|{prompt}|{extra}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class InversionCache:
    """Inverted latents by key, in memory and (with `directory`) as `<key>.safetensors` files."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.directory is not None:
            path = self.directory / f"{key}.safetensors"
            if path.is_file():
                try:
                    latents = load_file(str(path))["latents"]
                except Exception:  # a damaged cache entry is recomputed, never trusted
                    return None
                self._memory[key] = latents
                return latents
        return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().cpu().contiguous()
        self._memory[key] = latents
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.directory / f"{key}.safetensors") as tmp:
                save_file({"latents": latents}, str(tmp))

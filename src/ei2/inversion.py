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

from .defaults import INFERENCE_STEPS
from .video import atomic_path


def alpha(scheduler, t: int | None, device=None) -> torch.Tensor:
    """Cumulative alpha at timestep t (fp32); None means past the last step (x0)."""
    if t is None:
        return torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    return scheduler.alphas_cumprod[int(t)].float().to(device)


def prediction_type(scheduler) -> str:
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
    """Deterministic DDIM move of `sample` from cumulative alpha `alpha_from` to `alpha_to` (either direction).

    Computed in fp32; returned in the dtype of `sample`.
    """
    x0 = (sample.float() - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return (alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps).to(sample.dtype)


def timesteps(scheduler, num_inference_steps: int, device) -> list[int]:
    scheduler.set_timesteps(num_inference_steps, device=device)
    return [int(t) for t in scheduler.timesteps]


def predict_eps(unet, scheduler, latents, t, text_emb, uncond_emb=None, guidance_scale=1.0,
                cross_attention_kwargs=None):
    """eps (fp32) predicted at timestep t for `latents`, with classifier-free guidance when `uncond_emb` is given
    (one batch, unconditional half first).

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
    return to_epsilon(out, latents.float(), alpha(scheduler, t, latents.device), prediction_type(scheduler))


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    num_inference_steps: int = INFERENCE_STEPS,
    progress: Callable | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents `(b, c, f, h, w)` to x_T, without guidance.

    `progress` is an optional context-manager factory `progress(total=n)` (e.g. a pipeline's `progress_bar`).
    `callback(i, t, latents)` sees the latents after every step (e.g. to record the trajectory).
    Returns x_T with the same shape and dtype.
    """
    prediction_type(scheduler)
    steps = timesteps(scheduler, num_inference_steps, latents.device)
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    previous = None  # the clean end of the grid
    for i, t in enumerate(reversed(steps)):
        # eps is evaluated at the next (noisier) timestep on the current latents, as in Tune-A-Video
        eps = predict_eps(unet, scheduler, x, t, text_emb)
        x = ddim_step(eps, x, alpha(scheduler, previous, x.device), alpha(scheduler, t, x.device))
        previous = t
        if callback is not None:
            callback(i, t, x)
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
    num_inference_steps: int = INFERENCE_STEPS,
    guidance_scale: float = 1.0,
    uncond_emb: torch.Tensor | None = None,
    progress: Callable | None = None,
    callback: Callable | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """DDIM sampling (eta = 0) from x_T `(b, c, f, h, w)` under `text_emb` `(b, L, D)`.

    With `uncond_emb` and `guidance_scale` != 1, classifier-free guidance is applied; `uncond_emb` is
    `(1 or b, L, D)`, or `(steps, 1, L, D)`, one per step (null-text inversion).
    `callback(i, t, latents) -> latents | None` runs after every step (it may replace the latents).
    """
    prediction_type(scheduler)
    if guidance_scale != 1.0 and uncond_emb is None:
        raise ValueError("classifier-free guidance needs uncond_emb (the embedding of the negative/empty prompt)")
    steps = timesteps(scheduler, num_inference_steps, latents.device)
    per_step = uncond_emb is not None and uncond_emb.ndim == 4
    if per_step and uncond_emb.shape[0] != len(steps):
        raise ValueError(f"{uncond_emb.shape[0]} per-step unconditional embeddings for {len(steps)} steps; "
                         "run null-text inversion with the same number of steps")
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    for i, t in enumerate(steps):
        uncond = uncond_emb[i] if per_step else uncond_emb
        eps = predict_eps(unet, scheduler, x, t, text_emb, uncond, guidance_scale, cross_attention_kwargs)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        x = ddim_step(eps, x, alpha(scheduler, t, x.device), alpha(scheduler, nxt, x.device))
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
    """Inverted latents by key, in memory and (with `directory`) as `<key><suffix>` safetensors files.

    `get_tensors`/`put_tensors` store any named tensors (null-text inversion keeps two); `get`/`put` the latents.
    """

    suffix = ".safetensors"

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def get_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            return self._memory[key]
        if self.directory is not None:
            path = self.directory / f"{key}{self.suffix}"
            if path.is_file():
                try:
                    tensors = load_file(str(path))
                except Exception:  # a damaged cache entry is recomputed, never trusted
                    return None
                self._memory[key] = tensors
                return tensors
        return None

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        self._memory[key] = tensors
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.directory / f"{key}{self.suffix}") as tmp:
                save_file(tensors, str(tmp))

    def get(self, key: str) -> torch.Tensor | None:
        tensors = self.get_tensors(key)
        return None if tensors is None else tensors.get("latents")

    def put(self, key: str, latents: torch.Tensor) -> None:
        self.put_tensors(key, {"latents": latents})

"""DDIM inversion and DDIM sampling on video latents `(b, c, f, h, w)` (DESIGN §1.7).

Plain functions in the manner of k-diffusion's samplers: `(unet, scheduler, latents, text, steps, ...)`.
Both walk the same timestep grid, the scheduler's own `set_timesteps` (spacing, offset), with the
deterministic DDIM update (eta = 0) between cumulative alphas a -> a':

    eps = model output                              (v-prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x)
    x0  = (x - sqrt(1 - a) eps) / sqrt(a)           (v-prediction, sampling: x0 = sqrt(a_t) x - sqrt(1 - a_t) v)
    x'  = sqrt(a') x0 + sqrt(1 - a') eps

Sampling goes from t_i to t_{i+1} (the final step to `final_alpha_cumprod`); inversion runs the grid
backwards. The grid is the scheduler's own (`leading`, `trailing` or `linspace` spacing, its offset).
A v-prediction model takes x0 from v directly, so sampling also starts at a zero-terminal-SNR t = T
(alpha_bar = 0, where eps says nothing about x0); an epsilon model cannot start there (refused).
Classifier-free guidance: out = out_u + s (out_c - out_u), uncond and cond in one batch, optionally
rescaled towards the conditional prediction's standard deviation (Lin et al. 2024, `guidance_rescale`).

Edit strength (img2img's `strength`): of an n-step grid, the last `int(n * strength)` steps are sampled,
from the inversion's latent at that level; `ddim_inversion_trajectory` keeps every level, so one inversion
serves every strength. `InversionCache` stores it as safetensors, keyed by (video, adapter, steps, prompt).

`NoiseRegularization` (pix2pix-zero): during inversion each predicted eps is pushed towards white
Gaussian noise, per frame, by gradient steps on an auto-correlation penalty (random shifts, at every
scale down to 8x8) and the KL divergence of its mean and variance from N(0, 1).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from . import defaults
from .defaults import GUIDANCE_RESCALE, GUIDANCE_RESCALE_STD, INFERENCE_STEPS
from .files import atomic_path, file_system_problem, save_tensors
from .sampling import Sampling
from .structure.controlnet import guided_inputs


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


def to_x0(model_output, sample, alpha, prediction_type: str = "epsilon"):
    """The clean estimate x0 from the model output at cumulative alpha `alpha`; a v-prediction needs no
    division (x0 = sqrt(a) x - sqrt(1 - a) v), so it holds at alpha = 0 too."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
    return alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output


def ddim_step(eps, sample, alpha_from, alpha_to, x0=None):
    """Deterministic DDIM move of `sample` from cumulative alpha `alpha_from` to `alpha_to` (either direction).

    `x0`: the clean estimate when the model gives it directly (v-prediction); else it is computed from eps.
    Computed in fp32; returned in the dtype of `sample`.
    """
    if x0 is None:
        x0 = (sample.float() - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return (alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps).to(sample.dtype)


def ddim_move(out, sample, alpha_t, alpha_to, prediction_type: str = "epsilon"):
    """The DDIM sampling step of `sample` (at alpha_t, the level the model was told) to `alpha_to`, from the
    model output `out`: x0 from v directly (so alpha_t may be 0), from eps otherwise."""
    eps = to_epsilon(out, sample.float(), alpha_t, prediction_type)
    x0 = None if prediction_type == "epsilon" else to_x0(out, sample.float(), alpha_t, prediction_type)
    return ddim_step(eps, sample, alpha_t, alpha_to, x0)


def timesteps(scheduler, num_inference_steps: int, device) -> list[int]:
    """The scheduler's own sampling grid, noisiest first (its `timestep_spacing` and `steps_offset`)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    return [int(t) for t in scheduler.timesteps]


def rescale_guidance(guided, cond, guidance_rescale: float, std: str = GUIDANCE_RESCALE_STD):
    """Guided prediction rescaled towards the conditional one's standard deviation (Lin et al. 2024, §3.4;
    diffusers' `rescale_noise_cfg`), the std taken per `video` (over c, f, h, w) or per `frame` (over c, h, w)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    if not guidance_rescale:
        return guided
    if std == "video" or guided.ndim != 5:
        return rescale_noise_cfg(guided, cond, guidance_rescale)
    if std != "frame":
        raise ValueError(f"guidance rescale std must be 'video' or 'frame', got {std!r}")
    b, c, f, h, w = guided.shape
    per_frame = lambda x: x.transpose(1, 2).reshape(b * f, c, h, w)  # noqa: E731
    out = rescale_noise_cfg(per_frame(guided), per_frame(cond), guidance_rescale)
    return out.reshape(b, f, c, h, w).transpose(1, 2)


def model_output(unet, latents, t, text_emb, uncond_emb=None, guidance_scale=1.0, model_inputs: dict | None = None,
                 guidance_rescale: float = GUIDANCE_RESCALE, rescale_std: str = GUIDANCE_RESCALE_STD,
                 unguided: int = 0):
    """The model's prediction (fp32) at timestep t for `latents`, with classifier-free guidance when `uncond_emb`
    is given (one batch, unconditional half first), optionally rescaled (`rescale_guidance`).

    `unguided`: the first entries of `latents` are predicted without guidance (conditional only); the UNet's
    batch is then `[those (conditional), the rest (unconditional), the rest (conditional)]`, and `uncond_emb`
    is `(1, L, D)` or one per guided entry.

    `model_inputs`: the model's other inputs (k-diffusion's `extra_args`), passed to every UNet call unchanged:
    `cross_attention_kwargs`, `control` (a structure condition; its maps serve any batch)."""
    inputs = model_inputs or {}
    if uncond_emb is None or guidance_scale == 1.0:
        return unet(latents, t, text_emb, **inputs).sample.float()
    k = unguided
    rest = latents[k:]
    b = rest.shape[0]
    if b == 0:
        return unet(latents, t, text_emb, **inputs).sample.float()
    out = unet(
        torch.cat([latents[:k], rest, rest]), t, torch.cat([text_emb[:k], uncond_emb.expand(b, -1, -1), text_emb[k:]]),
        **guided_inputs(inputs, range(k, k + b)),
    ).sample.float()
    lead, uncond, cond = out.split([k, b, b])
    guided = rescale_guidance(uncond + guidance_scale * (cond - uncond), cond, guidance_rescale, rescale_std)
    return torch.cat([lead, guided]) if k else guided


def predict_eps(unet, scheduler, latents, t, text_emb, uncond_emb=None, guidance_scale=1.0,
                model_inputs: dict | None = None, guidance_rescale: float = GUIDANCE_RESCALE,
                rescale_std: str = GUIDANCE_RESCALE_STD):
    """eps (fp32) predicted at timestep t for `latents` (see `model_output`).

    v-predictions are converted with the alpha of t, the level the model was evaluated at, so inversion
    treats epsilon and v models alike.
    """
    out = model_output(unet, latents, t, text_emb, uncond_emb, guidance_scale, model_inputs,
                       guidance_rescale, rescale_std)
    return to_epsilon(out, latents.float(), alpha(scheduler, t, latents.device), prediction_type(scheduler))


def check_start(scheduler, t: int) -> None:
    """An epsilon model cannot be sampled from alpha_bar = 0 (x0 = (x - eps) / 0)."""
    if prediction_type(scheduler) == "epsilon" and float(scheduler.alphas_cumprod[int(t)]) <= 0:
        raise ValueError(f"the scheduler's alpha_bar is 0 at t = {t} (a zero-terminal-SNR schedule) and the model "
                         "predicts epsilon, which gives no x0 there; use a v-prediction model with this schedule, "
                         "or the schedule the model was trained with")


@dataclass(frozen=True)
class NoiseRegularization:
    """pix2pix-zero's noise regularisation of inversion: weights of the auto-correlation and KL penalties,
    gradient steps per inversion step, random shifts per auto-correlation step, and the shifts' seed."""

    auto_corr: float = defaults.NOISE_REG_AUTO_CORR
    kl: float = defaults.NOISE_REG_KL
    steps: int = defaults.NOISE_REG_STEPS
    rolls: int = defaults.NOISE_REG_ROLLS
    seed: int = 0

    def __post_init__(self):
        if self.auto_corr < 0 or self.kl < 0 or self.steps < 1 or self.rolls < 1:
            raise ValueError(f"noise regularisation needs weights >= 0 and at least one step and roll, got {self}")

    def key(self) -> str:
        return f"noise-reg:{self.auto_corr}:{self.kl}:{self.steps}:{self.rolls}:{self.seed}"


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> (b f, c, h, w): every frame on its own; 4-D tensors pass through."""
    if x.ndim == 4:
        return x
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def auto_correlation_loss(noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sum over scales (halved down to 8x8) of the squared mean correlation of each map with itself shifted by a
    random amount in [1, h/2] along h and along w; white noise scores ~0. `noise`: (n, c, h, w) or a video.
    (pix2pix-zero draws the shift from [0, h/2): a zero shift penalises the variance itself, which shrinks white
    noise on small latents; the KL term already holds the variance at 1.)"""
    x, loss = _frames(noise), noise.new_zeros(())
    while True:
        shift = int(torch.randint(1, max(2, x.shape[2] // 2 + 1), (1,), generator=generator))
        loss = loss + ((x * torch.roll(x, shift, 2)).mean((2, 3)) ** 2).sum()
        loss = loss + ((x * torch.roll(x, shift, 3)).mean((2, 3)) ** 2).sum()
        if x.shape[2] <= 8:
            return loss
        x = torch.nn.functional.avg_pool2d(x, 2)


def kl_loss(noise: torch.Tensor) -> torch.Tensor:
    """KL divergence (up to a factor) of each frame's mean and variance from N(0, 1), summed over frames."""
    x = _frames(noise).flatten(1)
    mean, var = x.mean(1), x.var(1)
    return (var + mean**2 - 1 - torch.log(var + 1e-7)).sum()


def regularize_noise(eps: torch.Tensor, reg: NoiseRegularization, generator: torch.Generator) -> torch.Tensor:
    """eps moved `reg.steps` times down the gradients of the auto-correlation and KL penalties (pix2pix-zero)."""
    eps = eps.detach().float()
    with torch.enable_grad():
        for _ in range(reg.steps):
            if reg.auto_corr > 0:
                for _ in range(reg.rolls):
                    var = eps.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(auto_correlation_loss(var, generator), var)
                    eps = eps - reg.auto_corr * grad / reg.rolls
            if reg.kl > 0:
                var = eps.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(kl_loss(var), var)
                eps = eps - reg.kl * grad
    return eps.detach()


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    num_inference_steps: int = INFERENCE_STEPS,
    progress: Callable | None = None,
    callback: Callable | None = None,
    noise_regularization: NoiseRegularization | None = None,
    model_inputs: dict | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents `(b, c, f, h, w)` to x_T, without guidance.

    `progress` is an optional context-manager factory `progress(total=n)` (e.g. a pipeline's `progress_bar`).
    `callback(i, t, latents)` sees the latents after every step (e.g. to record the trajectory).
    `noise_regularization`: pix2pix-zero's penalties on every predicted eps (`regularize_noise`).
    `model_inputs`: the UNet's other inputs (`model_output`), e.g. a structure condition.
    Returns x_T with the same shape and dtype.
    """
    prediction_type(scheduler)
    steps = timesteps(scheduler, num_inference_steps, latents.device)
    check_start(scheduler, steps[0])
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    previous = None  # the clean end of the grid
    generator = None if noise_regularization is None else torch.Generator().manual_seed(noise_regularization.seed)
    for i, t in enumerate(reversed(steps)):
        # eps is evaluated at the next (noisier) timestep on the current latents, as in Tune-A-Video
        eps = predict_eps(unet, scheduler, x, t, text_emb, model_inputs=model_inputs)
        if noise_regularization is not None:
            eps = regularize_noise(eps, noise_regularization, generator)
        x = ddim_step(eps, x, alpha(scheduler, previous, x.device), alpha(scheduler, t, x.device))
        previous = t
        if callback is not None:
            callback(i, t, x)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return x


def ddim_inversion_trajectory(unet, scheduler, latents: torch.Tensor, text_emb: torch.Tensor,
                              num_inference_steps: int = INFERENCE_STEPS, progress: Callable | None = None,
                              noise_regularization: NoiseRegularization | None = None,
                              model_inputs: dict | None = None) -> torch.Tensor:
    """[x_0, x_1, ..., x_T] stacked, (steps + 1, b, c, f, h, w): every latent of `ddim_invert` (x_T last).

    Sampling at strength S starts from `trajectory[int(steps * S)]`, the latent at the level of
    `timesteps(...)[ei2.sampling.start_step(steps, S)]`."""
    out = [latents]
    ddim_invert(unet, scheduler, latents, text_emb, num_inference_steps, progress=progress,
                callback=lambda i, t, x: out.append(x), noise_regularization=noise_regularization,
                model_inputs=model_inputs)
    return torch.stack(out)


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    sampling: Sampling,
    uncond_emb: torch.Tensor | None = None,
    *,
    progress: Callable | None = None,
    callback: Callable | None = None,
    unguided: int = 0,
    drop_first: int = 0,
    drop_after: int | None = None,
    model_inputs: dict | None = None,
) -> torch.Tensor:
    """DDIM sampling (eta = 0) from `latents` `(b, c, f, h, w)` under `text_emb` `(b, L, D)`, as `sampling` says
    (`ei2.sampling.Sampling`: the grid, the strength, guidance and its rescale).

    A strength < 1 starts at grid index `sampling.start`: `latents` are then at that level and only the remaining
    steps run (`i` of the callback counts those, from 0). With `uncond_emb` and a guidance scale != 1,
    classifier-free guidance is applied; `uncond_emb` is `(1 or b, L, D)`, or `(steps, 1, L, D)`, one per step
    that runs (null-text inversion). (`sampling.negative_prompt` is the caller's to encode into `uncond_emb`.)
    `callback(i, t, latents) -> latents | None` runs after every step (it may replace the latents).
    `unguided`: the first entries are sampled without guidance (see `model_output`). `drop_first` entries leave
    the batch after step `drop_after` (an index of the steps that run; e.g. a source branch that is no longer
    needed); only the others are sampled on and returned.
    `model_inputs`: the UNet's other inputs (`model_output`: `cross_attention_kwargs`, a structure condition).
    """
    num_inference_steps, start, guidance_scale = sampling.num_inference_steps, sampling.start, sampling.guidance_scale
    guidance_rescale, rescale_std = sampling.guidance_rescale, sampling.guidance_rescale_std
    kind = prediction_type(scheduler)
    if not 0 <= unguided <= latents.shape[0]:
        raise ValueError(f"unguided must be between 0 and the batch size {latents.shape[0]}, got {unguided}")
    if not 0 <= drop_first < latents.shape[0]:
        raise ValueError(f"drop_first must leave at least one of the {latents.shape[0]} entries, got {drop_first}")
    if sampling.guided and uncond_emb is None:
        raise ValueError("classifier-free guidance needs uncond_emb (the embedding of the negative/empty prompt)")
    steps = timesteps(scheduler, num_inference_steps, latents.device)[start:]
    check_start(scheduler, steps[0])
    per_step = uncond_emb is not None and uncond_emb.ndim == 4
    if per_step and uncond_emb.shape[0] != len(steps):
        raise ValueError(f"{uncond_emb.shape[0]} per-step unconditional embeddings for {len(steps)} steps; "
                         "run null-text inversion with the same number of steps and strength")
    x = latents
    bar = progress(total=len(steps)) if progress is not None else None
    for i, t in enumerate(steps):
        uncond = uncond_emb[i] if per_step else uncond_emb
        out = model_output(unet, x, t, text_emb, uncond, guidance_scale, model_inputs,
                           guidance_rescale, rescale_std, unguided)
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        x = ddim_move(out, x, alpha(scheduler, t, x.device), alpha(scheduler, nxt, x.device), kind)
        if callback is not None:
            replaced = callback(i, t, x)
            if replaced is not None:
                x = replaced
        if drop_first and drop_after is not None and i == drop_after and nxt is not None:
            if not per_step and uncond_emb is not None and uncond_emb.shape[0] > 1:  # one per guided entry
                uncond_emb = uncond_emb[max(0, drop_first - unguided):]
            x, text_emb, unguided = x[drop_first:], text_emb[drop_first:], max(0, unguided - drop_first)
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
    Each file carries a digest of its tensors in its metadata: an entry that does not match it (or cannot be
    read) is removed and recomputed, with a notice. The disk is optional: if an entry cannot be written (no
    permission, no space), `notice` says so once and the cache goes on in memory.
    """

    suffix = ".safetensors"

    def __init__(self, directory: str | os.PathLike | None = None, notice: Callable[[str], None] | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.notice = notice or _stderr_notice
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _digest(tensors: dict[str, torch.Tensor]) -> str:
        return tensor_hash(*(tensors[name] for name in sorted(tensors))) + ":" + ",".join(sorted(tensors))

    def get_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            return self._memory[key]
        if self.directory is None:
            return None
        path = self.directory / f"{key}{self.suffix}"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:  # one read: the tensors and the digest beside them
                digest = (f.metadata() or {}).get("digest")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if digest != self._digest(tensors):
                raise ValueError("its tensors do not match the digest written with them")
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            self.notice(f"inversion cache entry {path} is damaged ({e}); removed, recomputing it")
            path.unlink(missing_ok=True)
            return None
        self._memory[key] = tensors
        return tensors

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        self._memory[key] = tensors
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.directory / f"{key}{self.suffix}") as tmp:
                save_tensors(tensors, str(tmp), metadata={"digest": self._digest(tensors)})
        except Exception as e:  # noqa: BLE001 - safetensors wraps the OSError in its own type
            problem = file_system_problem(e)
            if problem is None:
                raise
            self.notice(f"cannot write the inversion cache in {self.directory} ({problem.strerror}); going on "
                        "without it (set EI2_CACHE_DIR to a folder you can write to keep inversions)")
            self.directory = None

    def get(self, key: str) -> torch.Tensor | None:
        tensors = self.get_tensors(key)
        return None if tensors is None else tensors.get("latents")

    def put(self, key: str, latents: torch.Tensor) -> None:
        self.put_tensors(key, {"latents": latents})


def _stderr_notice(message: str) -> None:
    import sys

    print(f"ei2: note: {message}", file=sys.stderr)

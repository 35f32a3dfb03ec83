"""EI2Pipeline: tune -> invert -> edit a video with an inflated Stable Diffusion model (DESIGN §1.6–1.7).

Follows diffusers pipeline conventions: components (`vae`, `text_encoder`, `tokenizer`, `unet`,
`scheduler`), `from_pretrained`, `progress_bar`/`set_progress_bar_config`, `callback_on_step_end`
and a dataclass output; `set_progress_callback(fn)` reports the steps of every bar to `fn` as well.
The `unet` is a `VideoUNet` (the 2D UNet inflated with a recipe). Frames in and out are `(f, h, w, 3)`
uint8 (`(b, f, h, w, 3)` for a batch of edits); latents are `(b, c, f, h, w)`.

    pipe = EI2Pipeline.from_pretrained("path/to/stable-diffusion-v1-5", recipe="ei2")
    pipe.tune(frames, "a man is skiing")
    out = pipe.edit(frames, "a man is skiing", "an astronaut is skiing on the moon")
    out.frames[0]  # (f, h, w, 3) uint8

Long videos (DESIGN §1.10): `pipe.set_windowing(8)` makes tuning draw one clip of 8 frames per step and
inversion/editing run in overlapping windows of 8 frames merged at every step (`ei2.windows`); a video
that fits in one window is edited exactly as without windowing.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from . import defaults
from .control.null_text import NullTextCache
from .errors import EI2Error, SettingError
from .inversion import (InversionCache, NoiseRegularization, ddim_inversion_trajectory, ddim_sample, inversion_key,
                        tensor_hash, timesteps)
from .loading import (DTYPES, fit_prompt_length, load_parts, resolve_device, resolve_dtype,
                      save_pipeline)
from .models import Recipe, VideoUNet
from .sampling import SAMPLING_FIELDS, Sampling, as_sampling
from .tuning import TuningConfig, TuningResult, tune
from .windows import Windowing, WindowedUNet

_MIXED = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}

ProgressCallback = Callable[[str | None, int, int], None]  # (desc, step, total): EI2Pipeline.set_progress_callback


def check_frame_size(height: int, width: int) -> None:
    """Frames go through the VAE and the UNet's down-sampling: each side a positive multiple of 8."""
    for name, v in (("height", height), ("width", width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
            raise SettingError(name, f"{v} is not a positive multiple of 8")


class _ReportedBar:
    """A tqdm bar that also reports its steps to `callback(desc, step, total)`: step 0 when it starts."""

    def __init__(self, bar, desc: str | None, callback: ProgressCallback):
        self.bar, self.desc, self.callback, self.n = bar, desc, callback, 0
        callback(desc, 0, bar.total)

    def update(self, n: int = 1):
        self.n += n
        self.bar.update(n)
        self.callback(self.desc, self.n, self.bar.total)

    def __iter__(self):
        for item in self.bar:
            yield item
            self.n += 1
            self.callback(self.desc, self.n, self.bar.total)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getattr__(self, name):
        return getattr(self.bar, name)


@dataclass(frozen=True)
class Denoiser:
    """What one inversion or sampling calls, made per call (`EI2Pipeline.denoiser_for`), nothing set from outside:
    `model` (the video UNet, or a `WindowedUNet` over it for a long video), its other `inputs` (k-diffusion's
    `extra_args`: a structure condition), the inversion's `noise_regularization` and `bar(desc)`, the stage's
    progress-bar factory. What they make of a cache key is `EI2Pipeline.model_key` (computed only where a cache
    needs it: it hashes the condition's maps)."""

    model: torch.nn.Module
    inputs: dict | None
    noise_regularization: NoiseRegularization | None
    bar: Callable[[str], Callable]


@dataclass
class EI2PipelineOutput(BaseOutput):
    """frames: (b, f, h, w, 3) uint8 (None for output_type="latent"); latents: the final (b, c, f, h, w);
    attention, prompts: see `EI2Pipeline.edit`."""

    frames: np.ndarray | None
    latents: torch.Tensor
    attention: object | None = None  # `edit` with record_attention: the controller holding the maps
    prompts: list[str] | None = None  # its branches' prompts (the source first with P2P or injection)


class EI2Pipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: VideoUNet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        fit_prompt_length(tokenizer, text_encoder)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.mixed_precision = "fp32"  # "fp32", "fp16" or "bf16": autocast of the UNet, dtype of vae/text encoder
        self.inversion_cache = InversionCache()
        self.windowing: Windowing | None = None  # None: every video in one piece
        # pix2pix-zero's regularisation of the inverted noise (None: plain DDIM inversion; `set_noise_regularization`)
        self.noise_regularization: NoiseRegularization | None = None
        self.null_text_cache = NullTextCache()  # null-text inversions (`ei2.control`), beside inversion_cache
        self._progress_callback: ProgressCallback | None = None

    def set_windowing(self, window: int | None = defaults.WINDOW, stride: int | None = None,
                      anchors: int = defaults.ANCHOR_FRAMES, batch: int = defaults.WINDOW_BATCH) -> None:
        """Long videos (DESIGN §1.10): windows of `window` frames every `stride` (default window // 2), `anchors`
        anchor frames seen by every window, `batch` windows per UNet call. `window=None`: no windowing."""
        self.windowing = None if window is None else Windowing(window, stride, anchors, batch)

    def set_noise_regularization(self, regularization: NoiseRegularization | None) -> None:
        """pix2pix-zero's regularisation of the inverted noise for the inversions that follow (None: plain DDIM)."""
        self.noise_regularization = regularization

    def windowed(self, num_frames: int) -> bool:
        return self.windowing is not None and self.windowing.applies(num_frames)

    def denoiser(self, num_frames: int):
        """What inversion and sampling call for a video of `num_frames`: the UNet, or a `WindowedUNet` over it."""
        if not self.windowed(num_frames):
            return self.unet
        return WindowedUNet(self.unet, self.windowing, num_frames, on_window=self._show_window)

    def stage_bar(self, desc: str, num_frames: int) -> Callable:
        """The progress-bar factory `progress(total=n)` of a stage on a video of `num_frames`: `progress_bar` under
        `desc`, labelled with the windows of a long video ("editing (3 windows of 8)")."""
        label = desc
        if self.windowed(num_frames):
            label = f"{desc} ({len(self.windowing.starts(num_frames))} windows of {self.windowing.window})"
        return functools.partial(self.progress_bar, desc=label, report_as=desc)

    def denoiser_for(self, num_frames: int, control=None, inversion: bool = False) -> "Denoiser":
        """A `Denoiser` for one inversion or sampling of a video of `num_frames`, under the (bound) structure
        condition `control`; `inversion`: with the pipeline's noise regularisation."""
        return Denoiser(self.denoiser(num_frames), None if control is None else {"control": control},
                        self.noise_regularization if inversion else None,
                        functools.partial(self.stage_bar, num_frames=num_frames))

    def model_key(self, num_frames: int, control=None, inversion: bool = False) -> str:
        """The part of cache keys that `denoiser_for(num_frames, control, inversion)` makes: precision, schedule,
        the condition (nets, maps, scales, window), the noise regularisation, the windows."""
        regularization = self.noise_regularization if inversion else None
        parts = [self.mixed_precision, self._schedule_key()]
        parts += [] if control is None else [control.key()]
        parts += [] if regularization is None else [regularization.key()]
        parts += [self.windowing_key(num_frames)] if self.windowed(num_frames) else []
        return "|".join(parts)

    def windowing_key(self, num_frames: int) -> str:
        """The windowing's part of cache keys ("" when `num_frames` is edited in one piece)."""
        return self.windowing.key(num_frames) if self.windowed(num_frames) else ""

    def _show_window(self, k: int, n: int) -> None:
        bar = getattr(self, "_current_bar", None)
        if bar is not None and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"window {k}/{n}", refresh=False)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        recipe: str | Recipe | None = None,
        adapter: str | Path | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | None = "auto",
        inversion_cache_dir: str | Path | None = None,
    ) -> "EI2Pipeline":
        """Load a diffusers Stable Diffusion 1.x/2.x folder (or hub id) and inflate its UNet with `recipe`.

        `model` defaults to the embedded Shapes model. `recipe` defaults to the adapter's recipe, else `ei2`.
        `dtype` is `auto`, `fp32`, `fp16` or `bf16` (fp16/bf16: mixed precision, the UNet stays fp32 for tuning).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        parts, source = load_parts(model, recipe, adapter, DTYPES[dtype], device)
        pipe = cls(**parts)
        pipe.mixed_precision = dtype
        pipe.model_source = str(source)
        pipe.inversion_cache = InversionCache(inversion_cache_dir)
        pipe.null_text_cache = NullTextCache(inversion_cache_dir)
        for module in (pipe.vae, pipe.text_encoder, pipe.unet):
            module.requires_grad_(False)
            module.eval()
        return pipe

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def default_size(self) -> int:
        """Frame side the model was trained at: vae scale factor x UNet sample size (512 for SD 1.x)."""
        return self.vae_scale_factor * int(self.unet.unet.config.sample_size)  # the 2D UNet's config

    def autocast(self):
        """The context the UNet runs in: autocast to `mixed_precision` (fp16/bf16), a null context in fp32."""
        if self.mixed_precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.unet.device.type, dtype=DTYPES[self.mixed_precision])

    def ddim_scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler with the pipeline's scheduler config: one for each inversion or sampling loop."""
        return DDIMScheduler.from_config(self.scheduler.config)

    # ------------------------------------------------------------------------------------------ progress
    def progress_bar(self, iterable=None, total=None, desc: str | None = None, report_as: str | None = None):
        """A tqdm bar over `iterable` or of `total` steps, as diffusers' `progress_bar`: `set_progress_bar_config`
        applies, `desc` labels it. Each of its steps is also reported to the progress callback
        (`set_progress_callback`) under `report_as` (default: `desc`)."""
        if iterable is None and total is None:
            raise ValueError("Either `total` or `iterable` has to be defined.")
        config = dict(getattr(self, "_progress_bar_config", {}) or {})
        if desc is not None:
            config.setdefault("desc", desc)
        config.setdefault("dynamic_ncols", True)
        bar = tqdm(iterable, total=total, **config)
        self._current_bar = bar
        if self._progress_callback is None:
            return bar
        return _ReportedBar(bar, desc if report_as is None else report_as, self._progress_callback)

    def set_progress_callback(self, callback: ProgressCallback | None) -> None:
        """Report progress to `callback(desc, step, total)` besides the bars (also with bars disabled): it is
        called with step 0 when a bar starts and after each of its steps. `desc` is the bar's label: "inversion",
        "null-text inversion" (a step is one inner iteration) or "editing". Tuning reports through `tune`'s
        `callback`. `None` removes the callback."""
        self._progress_callback = callback

    def _progress_enabled(self) -> bool:
        return not (getattr(self, "_progress_bar_config", {}) or {}).get("disable", False)

    def check_size(self, height: int, width: int) -> None:
        check_frame_size(height, width)

    @staticmethod
    def _check_prompt(prompt, name: str) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise EI2Error(f"{name} is empty; describe the video in words, e.g. --{name.replace('_', '-')} \"a man is skiing\"")
        return prompts

    @torch.no_grad()
    def prompt_overflow(self, prompt: str) -> int:
        """How many tokens of `prompt` the text encoder cannot take (`encode_prompt` drops them; 0: none)."""
        ids = self.tokenizer(prompt, truncation=False).input_ids  # with its start and end tokens
        return max(0, len(ids) - self.tokenizer.model_max_length)

    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """Text embeddings (b, L, D), fp32."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray, batch_size: int = 8) -> torch.Tensor:
        """(f, h, w, 3) uint8 -> latents (1, c, f, h/s, w/s), fp32 (the mean of the VAE posterior, scaled)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (f, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
        self.check_size(frames.shape[1], frames.shape[2])
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # f 3 h w
        chunks = []
        for part in x.split(batch_size):
            part = part.to(self.vae.device, self.vae.dtype) / 127.5 - 1
            chunks.append(self.vae.encode(part).latent_dist.mean.float())
        latents = torch.cat(chunks) * self.vae.config.scaling_factor  # f c h w
        return latents.permute(1, 0, 2, 3).unsqueeze(0)  # 1 c f h w

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
        """(b, c, f, h, w) -> (b, f, H, W, 3) uint8."""
        b, _, f = latents.shape[:3]
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, *latents.shape[1:2], *latents.shape[3:])  # (b f) c h w
        x = x / self.vae.config.scaling_factor
        images = []
        for part in x.split(batch_size):
            images.append(self.vae.decode(part.to(self.vae.dtype)).sample.float())
        images = torch.cat(images).clamp(-1, 1)
        images = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return images.reshape(b, f, *images.shape[1:])

    def adapter_hash(self) -> str:
        """Digest of what the UNet is: base model, recipe and the current tuned tensors."""
        tensors = [p for _, p in self.unet.trainable_parameters()]
        return f"{self.unet.base_fingerprint}-{self.unet.recipe.digest()}-{tensor_hash(*tensors)}"

    def check_control(self, control, latents: torch.Tensor) -> None:
        """A structure condition must have one map per frame of the video, at the frames' pixel size."""
        if control is not None:
            f, (h, w) = latents.shape[2], latents.shape[3:]
            control.check_frames(f, h * self.vae_scale_factor, w * self.vae_scale_factor)

    def bind_control(self, control, sampling: Sampling):
        """The structure condition with its window bound to the steps `sampling` runs (None stays None)."""
        if control is None:
            return None
        steps = timesteps(self.ddim_scheduler(), sampling.num_inference_steps, "cpu")
        return control.for_steps(steps[sampling.start:])

    def inversion_key(self, latents: torch.Tensor, prompt: str, num_inference_steps: int, control=None) -> str:
        """Cache key of the DDIM inversion trajectory (every level, x_0 to x_T) of clean `latents` under
        `prompt` with this adapter, scheduler, precision and structure condition."""
        latents = latents.to(self.unet.device, torch.float32)
        return inversion_key(tensor_hash(latents), self.adapter_hash(), num_inference_steps, prompt,
                             "trajectory|" + self.model_key(latents.shape[2], control, inversion=True))

    def _schedule_key(self) -> str:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one")
        import hashlib

        return hashlib.sha256(repr([self.scheduler.config.get(k) for k in keys]).encode()).hexdigest()[:12]

    def is_inverted(self, latents: torch.Tensor, prompt: str, num_inference_steps: int, control=None,
                    strength: float = defaults.STRENGTH) -> bool:
        """Whether `invert(latents=latents, prompt=prompt, ...)` would come from the cache."""
        control = self.bind_control(control, Sampling(num_inference_steps, strength))
        return self.inversion_cache.get(self.inversion_key(latents, prompt, num_inference_steps, control)) is not None

    def save_adapter(self, directory: str | Path) -> Path:
        return self.unet.save_adapter(directory)

    def load_adapter(self, directory: str | Path) -> None:
        self.unet.load_adapter(directory)

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> Path:
        """Write the pipeline as a diffusers Stable Diffusion folder plus its adapter (`ei2.loading.save_pipeline`);
        `from_pretrained` reloads it."""
        return save_pipeline(self, save_directory, safe_serialization, **kwargs)

    # ------------------------------------------------------------------------------------------ stages
    def tune(
        self,
        frames: np.ndarray | None = None,
        source_prompt: str = "",
        *,
        latents: torch.Tensor | None = None,
        steps: int = defaults.STEPS,
        learning_rate: float = defaults.LEARNING_RATE,
        seed: int = 0,
        gradient_checkpointing: bool = True,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        callback: Callable[[int, float], None] | None = None,
        gradient_accumulation: int = 1,
        control=None,
    ) -> TuningResult:
        """One-shot tuning of the UNet's recipe tensors on the source video and prompt (DESIGN §1.6).

        With a windowing shorter than the video, each step tunes on one clip of `window` consecutive frames
        drawn from the seeded generator (DESIGN §1.10). `gradient_accumulation`: micro-batches (clips, noise
        and timesteps) per optimiser step; under `ei2.tuning.across_processes()` they are shared out.
        `control`: a structure condition (`ei2.structure.StructureControl`) to tune under (its window is not used:
        tuning draws every timestep)."""
        self._check_prompt(source_prompt, "source_prompt")
        if latents is None:
            if frames is None:
                raise ValueError("give frames or latents")
            latents = self.encode_frames(frames)
        text = self.encode_prompt(source_prompt).expand(latents.shape[0], -1, -1)
        config = TuningConfig(
            steps=steps, learning_rate=learning_rate, seed=seed, gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, mixed_precision=_MIXED[self.mixed_precision],
            window=self.windowing.window if self.windowed(latents.shape[2]) else None,
            gradient_accumulation=gradient_accumulation,
        )
        noise_scheduler = DDPMScheduler.from_config(self.scheduler.config)
        self.check_control(control, latents)
        result = tune(self.unet, noise_scheduler, latents.to(self.unet.device), text.to(self.unet.device), config,
                      checkpoint_dir=checkpoint_dir, resume=resume, progress=self._progress_enabled(), callback=callback,
                      control=control)
        self.unet.eval()
        return result

    @torch.no_grad()
    def invert_trajectory(
        self,
        frames: np.ndarray | None = None,
        prompt: str = "",
        *,
        latents: torch.Tensor | None = None,
        num_inference_steps: int = defaults.INFERENCE_STEPS,
        use_cache: bool = True,
        control=None,
    ) -> torch.Tensor:
        """DDIM inversion of the source video (frames or clean latents) under `prompt`, no guidance: every level
        `[x_0, x_1, ..., x_T]`, `(steps + 1, b, c, f, h, w)` fp32.

        Cached per (video latents, adapter, scheduler, steps, prompt, windowing, `noise_regularization`, structure
        condition): editing several prompts at any strengths inverts once. `control`: a structure condition the
        inversion runs under (bound to the steps that run, `bind_control`).
        """
        if latents is None:
            if frames is None:
                raise ValueError("give frames or latents")
            latents = self.encode_frames(frames)
        latents = latents.to(self.unet.device, torch.float32)
        self.check_control(control, latents)
        key = self.inversion_key(latents, prompt, num_inference_steps, control)
        cached = self.inversion_cache.get(key) if use_cache else None
        if cached is not None and cached.shape[1:] == latents.shape:
            return cached.to(latents.device)
        text = self.encode_prompt(prompt).expand(latents.shape[0], -1, -1)
        d = self.denoiser_for(latents.shape[2], control, inversion=True)
        with self.autocast():
            trajectory = ddim_inversion_trajectory(d.model, self.ddim_scheduler(), latents, text, num_inference_steps,
                                                   progress=d.bar("inversion"),
                                                   noise_regularization=d.noise_regularization, model_inputs=d.inputs)
        trajectory = trajectory.float().contiguous()  # as the cache returns it: the same strides, the same numbers
        if use_cache:
            self.inversion_cache.put(key, trajectory)
        return trajectory

    def invert(
        self,
        frames: np.ndarray | None = None,
        prompt: str = "",
        *,
        latents: torch.Tensor | None = None,
        num_inference_steps: int = defaults.INFERENCE_STEPS,
        strength: float = defaults.STRENGTH,
        use_cache: bool = True,
        control=None,
    ) -> torch.Tensor:
        """DDIM inversion of the source video under `prompt` -> the latent where sampling at `strength` starts
        (x_T at strength 1), from the cached trajectory (`invert_trajectory`), under the structure condition
        `control` if given (its window bound to the steps sampling at `strength` runs)."""
        sampling = Sampling(num_inference_steps, strength)
        trajectory = self.invert_trajectory(frames, prompt, latents=latents, num_inference_steps=num_inference_steps,
                                            use_cache=use_cache,
                                            control=self.bind_control(control, sampling))
        return trajectory[len(trajectory) - 1 - sampling.start].clone()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        frames: np.ndarray | None = None,
        source_prompt: str | None = None,
        *,
        latents: torch.Tensor | None = None,
        source_latents: torch.Tensor | None = None,
        inversion_prompt: str | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = defaults.INFERENCE_STEPS,
        guidance_scale: float = defaults.GUIDANCE_SCALE,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        cross_attention_kwargs: dict | None = None,
        strength: float = defaults.STRENGTH,
        guidance_rescale: float = defaults.GUIDANCE_RESCALE,
        guidance_rescale_std: str = defaults.GUIDANCE_RESCALE_STD,
        control=None,
        control_inversion: bool = True,
    ):
        """Edit (or generate) a video under `prompt`.

        Starting latents x_T are, in order: `latents` if given; the DDIM inversion of the source video
        (`frames` or `source_latents`) under `inversion_prompt` (default: `source_prompt`, else ""); or
        Gaussian noise of `num_frames` x `height` x `width`. Then DDIM sampling with classifier-free guidance.
        `strength` < 1 (an edit of a source video): only the last `int(num_inference_steps * strength)` steps
        run, from the inversion's latent at that level (given `latents` are taken to be at that level).
        `guidance_rescale` (phi, 0: off): the guided prediction rescaled towards the conditional one's std, per
        `guidance_rescale_std` ("video" or "frame"). These sampling arguments make one `ei2.sampling.Sampling`.
        `control`: a structure condition (`ei2.structure.StructureControl`: ControlNets, one map per frame, scales,
        window), on during sampling and, unless `control_inversion=False`, during the DDIM inversion (DESIGN §1.12).
        Returns `EI2PipelineOutput(frames (b, f, h, w, 3) uint8, latents (b, c, f, h, w))`.
        """
        # 1. Check inputs
        prompts = self._check_prompt(prompt, "target_prompt")
        sampling = Sampling(num_inference_steps, strength, guidance_scale, guidance_rescale, guidance_rescale_std,
                            negative_prompt)
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of {self._callback_tensor_inputs}")
        if sampling.start and latents is None and frames is None and source_latents is None:
            raise EI2Error(f"strength {strength} edits a source video; generating from noise needs strength 1")
        device = self.unet.device
        batch = len(prompts)

        # 2. Encode the target prompts, and the negative (or empty) prompt for classifier-free guidance
        text = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negative_prompt or "") if sampling.guided else None

        # 3. Prepare the starting latents x_T
        if latents is None and (frames is not None or source_latents is not None):
            if inversion_prompt is None:
                inversion_prompt = source_prompt or ""
            latents = self.invert(frames, inversion_prompt, latents=source_latents, num_inference_steps=num_inference_steps,
                                  strength=strength, control=control if control_inversion else None)
        elif latents is None:
            side = self.default_size
            height, width = height or side, width or side
            self.check_size(height, width)
            shape = (1, self.unet.unet.config.in_channels, num_frames or defaults.FRAMES, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if latents.ndim != 5:
            raise ValueError(f"latents must be (b, c, f, h, w), got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)
        if latents.shape[0] == 1 and batch > 1:
            latents = latents.expand(batch, -1, -1, -1, -1).clone()
        self.check_control(control, latents)
        control = self.bind_control(control, sampling)

        # 4. Denoise with DDIM
        def on_step(i, t, x):
            if callback_on_step_end is None:
                return None
            values = {"latents": x}
            out = callback_on_step_end(self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs}) or {}
            return out.get("latents")

        d = self.denoiser_for(latents.shape[2], control)
        inputs = {**(d.inputs or {}), **({} if cross_attention_kwargs is None
                                         else {"cross_attention_kwargs": cross_attention_kwargs})}
        with self.autocast():
            latents = ddim_sample(d.model, self.ddim_scheduler(), latents, text, sampling, uncond,
                                  progress=d.bar("editing"), callback=on_step, model_inputs=inputs or None)
        latents = latents.float()

        # 5. Decode
        frames_out = None if output_type == "latent" else self.decode_latents(latents)
        if not return_dict:
            return (frames_out, latents)
        return EI2PipelineOutput(frames=frames_out, latents=latents)

    def edit(self, frames: np.ndarray | None, source_prompt: str, target_prompt: str | list[str], *,
             source_latents: torch.Tensor | None = None, inverted: torch.Tensor | None = None,
             sampling: Sampling | None = None, p2p=None,
             null_text: bool = False, injection=None, record_attention: bool = False, control=None,
             control_inversion: bool = True, **kwargs) -> EI2PipelineOutput:
        """Invert the source video (frames, or its clean `source_latents`; cached) and sample it again under
        `target_prompt`: the one edit dispatcher, which the job layer calls too.

        `sampling`: an `ei2.sampling.Sampling`, or its fields as keywords (see `__call__`); a plain edit also takes
        `__call__`'s other keywords (`callback_on_step_end`, `output_type`, ...). `p2p` (an
        `ei2.control.P2PConfig`): Prompt-to-Prompt attention control, the source branch denoised along;
        `null_text`: null-text inversion instead of DDIM inversion (DESIGN §1.8); `injection` (an
        `ei2.control.InjectionConfig`): the source's decoder features and frame-attention queries/keys injected
        for the first steps, to keep its layout and motion (DESIGN §1.9); `record_attention`: keep the attention
        maps (`output.attention`, for `ei2.control.save_attention_grid`). With any of them the edit is
        `ei2.control.controlled_edit`; otherwise plain DDIM sampling from the inversion (`__call__`).
        `control`: a structure condition, on every branch and, unless `control_inversion=False`, the inversion.
        `inverted`: the inversion's latent where sampling starts (`invert(...)` with the same settings), when the
        caller has it: a plain edit samples from it instead of looking the inversion up again (which hashes the
        video and the adapter); a controlled edit needs the trajectory and takes it from the cache.
        """
        self._check_prompt(source_prompt, "source_prompt")
        self._check_prompt(target_prompt, "target_prompt")
        sampling = as_sampling(sampling, **{k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_FIELDS})
        if source_latents is None:
            if frames is None:
                raise ValueError("give frames or source_latents")
            source_latents = self.encode_frames(frames)
        injects = injection is not None and injection.active(sampling.steps_run)
        if p2p is None and not null_text and not injects and not record_attention:
            start = {"source_latents": source_latents} if inverted is None else {"latents": inverted}
            return self(target_prompt, source_prompt=source_prompt, control=control,
                        control_inversion=control_inversion, **start, **sampling.to_dict(), **kwargs)
        if kwargs:
            raise TypeError(f"{', '.join(kwargs)}: not taken by an edit with P2P, null-text inversion, injection or "
                            "recorded attention (`ei2.control.controlled_edit`)")
        from .control.edit import controlled_edit

        result = controlled_edit(self, source_latents, source_prompt, target_prompt, sampling=sampling, p2p=p2p,
                                 null_text=null_text, injection=injection, record_attention=record_attention,
                                 control=control, control_inversion=control_inversion)
        return EI2PipelineOutput(frames=self.decode_latents(result.latents), latents=result.latents,
                                 attention=result.controller, prompts=result.prompts)

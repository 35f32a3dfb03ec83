"""An EI² edit with Prompt-to-Prompt control, structure-preserving injection and/or null-text inversion,
on an `EI2Pipeline` (DESIGN §1.8, §1.9).

    result = controlled_edit(pipe, latents, "a man is skiing", ["a panda is skiing"],
                             p2p=P2PConfig("replace", blend_words=("man", "panda")), null_text=True,
                             injection=InjectionConfig(features=0.8, attention=0.5))
    frames = pipe.decode_latents(result.latents)      # (targets, f, H, W, 3)

1. Invert the source latents: DDIM (the pipeline's cached `invert`) or null-text inversion (cached in
   the same folder, keyed by video, adapter, steps, prompt, guidance and optimisation settings).
2. With `p2p` or an active `injection`, denoise the source branch together with the targets (batch
   source + targets; one source branch serves both); otherwise denoise the targets only (null-text
   inversion alone still helps fidelity). An injection without P2P, null-text inversion or recorded maps
   runs the source once per step without guidance (the reverse of the DDIM inversion, as Plug-and-Play)
   (`FeatureInjection(shared_source=True)`). The source branch leaves the batch after the last step that needs
   it: the last injecting step, the last step a P2P controller replaces a map (without local blending or a
   recorded attention grid).
3. Return the targets' latents, the source branch's latents (None where the source branch left early) and
   the controller with its stored maps (for `save_attention_grid`).

What is taken from `pipe` is its public face: its components, `encode_prompt`, `invert`/`invert_trajectory`,
`autocast()`, `ddim_scheduler()`, `progress_bar(total=, desc=)` (which reports to the pipeline's progress
callback), its caches and, for long videos, `denoiser`/`windowing_key`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from ..defaults import (
    GUIDANCE_RESCALE, GUIDANCE_RESCALE_STD, GUIDANCE_SCALE, INFERENCE_STEPS, NULL_TEXT_EARLY_STOP_EPSILON,
    NULL_TEXT_INNER_STEPS, NULL_TEXT_LEARNING_RATE, STRENGTH,
)
from ..inversion import start_step, tensor_hash
from .controllers import AttentionStore
from .injection import FeatureInjection, InjectionConfig
from .null_text import NullTextCache, NullTextInversion, null_text_inversion, null_text_key
from .options import P2PConfig, build_controller
from .sampling import controlled_sample


@dataclass
class ControlledEdit:
    """latents: (targets, c, f, h, w); source_latents: (1, c, f, h, w) of the source branch (None without p2p or injection, or where it left early);
    controller: the controller (None when no control and no recorded maps); prompts: its branches' prompts."""

    latents: torch.Tensor
    source_latents: torch.Tensor | None
    controller: AttentionStore | None
    prompts: list[str]


def _denoiser(pipe, latents: torch.Tensor):
    """The pipeline's UNet, or its windowed UNet for a long video (DESIGN §1.10; `ei2.windows`)."""
    return pipe.denoiser(latents.shape[2]) if hasattr(pipe, "denoiser") else pipe.unet


def _windowing_key(pipe, latents: torch.Tensor) -> str:
    key = pipe.windowing_key(latents.shape[2]) if hasattr(pipe, "windowing_key") else ""
    return f"|{key}" if key else ""


def null_text_invert(pipe, latents: torch.Tensor, prompt: str, num_inference_steps: int, guidance_scale: float,
                     negative_prompt: str | None = None, num_inner_steps: int = NULL_TEXT_INNER_STEPS,
                     learning_rate: float = NULL_TEXT_LEARNING_RATE,
                     early_stop_epsilon: float = NULL_TEXT_EARLY_STOP_EPSILON,
                     use_cache: bool = True, start: int = 0, control=None) -> NullTextInversion:
    """Null-text inversion of clean latents (1, c, f, h, w) on `pipe`'s UNet, starting from the embedding of
    `negative_prompt` (default ""), of the steps from grid index `start` on (an edit strength); its DDIM
    trajectory is the pipeline's cached one; cached beside the pipeline's DDIM inversions. `control`: a structure
    condition bound to the steps that run (`pipe.bind_control`), on for the trajectory and the optimisation."""
    if getattr(pipe, "null_text_cache", None) is None:
        pipe.null_text_cache = NullTextCache(getattr(pipe.inversion_cache, "directory", None))
    latents = latents.to(pipe.unet.device, torch.float32)
    control_key = control.key() if control is not None else ""
    key = null_text_key(tensor_hash(latents), pipe.adapter_hash(), num_inference_steps, prompt, guidance_scale,
                        num_inner_steps, learning_rate, early_stop_epsilon, extra=f"{pipe.mixed_precision}|{negative_prompt or ''}{_windowing_key(pipe, latents)}|start={start}|{control_key}")
    cached = pipe.null_text_cache.get(key) if use_cache else None
    if cached is not None:
        return cached
    trajectory = pipe.invert_trajectory(latents=latents, prompt=prompt, num_inference_steps=num_inference_steps,
                                        use_cache=use_cache, control=control)
    with pipe.autocast():
        result = null_text_inversion(
            _denoiser(pipe, latents), pipe.ddim_scheduler(), latents, pipe.encode_prompt(prompt),
            pipe.encode_prompt(negative_prompt or ""),
            num_inference_steps,
            guidance_scale=guidance_scale, num_inner_steps=num_inner_steps, learning_rate=learning_rate,
            early_stop_epsilon=early_stop_epsilon,
            progress=functools.partial(pipe.progress_bar, desc="null-text inversion"),
            start=start, trajectory=trajectory, model_inputs=None if control is None else {"control": control},
        )
    result = NullTextInversion(result.latents.float(), result.uncond_embeddings.float())
    if use_cache:
        pipe.null_text_cache.put(key, result)
    return result


@torch.no_grad()
def controlled_edit(
    pipe,
    latents: torch.Tensor,
    source_prompt: str,
    target_prompts: str | Sequence[str],
    *,
    p2p: P2PConfig | None = None,
    null_text: bool = False,
    injection: InjectionConfig | None = None,
    num_inference_steps: int = INFERENCE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    negative_prompt: str | None = None,
    record_attention: bool = False,
    null_text_inner_steps: int = NULL_TEXT_INNER_STEPS,
    null_text_learning_rate: float = NULL_TEXT_LEARNING_RATE,
    strength: float = STRENGTH,
    guidance_rescale: float = GUIDANCE_RESCALE,
    guidance_rescale_std: str = GUIDANCE_RESCALE_STD,
    control=None,
    control_inversion: bool = True,
) -> ControlledEdit:
    """Edit clean source latents (1, c, f, h, w) into each target prompt; see the module docstring.

    `strength` < 1: only the last `int(num_inference_steps * strength)` steps run, from the inversion's latent
    at that level; the P2P and injection fractions count those steps. `control`: a structure condition
    (`ei2.structure.StructureControl`) on every branch, and on the inversion unless `control_inversion=False`."""
    # 1. Check inputs: a bad P2P option fails here, before any inversion
    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be one clean source video (1, c, f, h, w), got {tuple(latents.shape)}")
    start = start_step(num_inference_steps, strength)
    run = num_inference_steps - start  # the steps that are sampled
    controller = None
    if p2p is not None:
        controller = build_controller(p2p, pipe.tokenizer, source_prompt, targets, run)
    injects = injection is not None and injection.active(run)
    with_source = p2p is not None or injects
    prompts = [source_prompt, *targets] if with_source else targets
    if controller is None and record_attention:
        controller = AttentionStore(len(prompts))
    elif record_attention:
        controller.keep_maps = True  # the attention grid shows every branch at every step
    # Plug-and-Play's layout where nothing else needs the source's guidance halves
    shared_source = injects and controller is None and not null_text
    feature_injection = FeatureInjection(injection, len(prompts), run, shared_source) if injects else None
    device = pipe.unet.device
    if control is not None:
        pipe.check_control(control, latents)
        control = pipe.bind_control(control, num_inference_steps, strength)
    inversion_control = control if control_inversion else None

    # 2. Invert: null-text (per-step unconditional embeddings) or DDIM with the fixed negative/empty prompt
    if null_text:
        inverted = null_text_invert(pipe, latents, source_prompt, num_inference_steps, guidance_scale, negative_prompt,
                                    null_text_inner_steps, null_text_learning_rate, start=start,
                                    control=inversion_control)
        x_t, uncond = inverted.latents, inverted.uncond_embeddings
    else:
        uncond = pipe.encode_prompt(negative_prompt or "")
        x_t = pipe.invert(latents=latents, prompt=source_prompt, num_inference_steps=num_inference_steps,
                          strength=strength, control=inversion_control)

    # 3. Denoise all branches together (source first with p2p or injection)
    x_t = x_t.to(device, torch.float32).expand(len(prompts), -1, -1, -1, -1)
    with pipe.autocast():
        out = controlled_sample(
            _denoiser(pipe, x_t), pipe.ddim_scheduler(), x_t, pipe.encode_prompt(prompts), num_inference_steps,
            guidance_scale=guidance_scale, uncond_emb=uncond.to(device), controller=controller,
            progress=functools.partial(pipe.progress_bar, desc="editing"), injection=feature_injection,
            start=start, guidance_rescale=guidance_rescale, guidance_rescale_std=guidance_rescale_std,
            model_inputs=None if control is None else {"control": control},
        )
    out = out.float()
    if with_source and out.shape[0] == len(targets):  # the source branch left after its last injecting step
        return ControlledEdit(out, None, controller, prompts)
    if with_source:
        return ControlledEdit(out[1:], out[:1], controller, prompts)
    return ControlledEdit(out, None, controller, prompts)

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
`autocast()`, `ddim_scheduler()`, `denoiser_for(num_frames, control)` (the model, its inputs and the stage's
progress bar, which reports to the pipeline's progress callback), `model_key` (their part of cache keys),
`check_control`/`bind_control`, `adapter_hash()` and its caches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..defaults import NULL_TEXT_EARLY_STOP_EPSILON, NULL_TEXT_INNER_STEPS, NULL_TEXT_LEARNING_RATE
from ..inversion import tensor_hash
from ..sampling import Sampling, as_sampling
from .controllers import AttentionStore
from .injection import FeatureInjection, InjectionConfig
from .null_text import NullTextInversion, null_text_inversion, null_text_key
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


def null_text_invert(pipe, latents: torch.Tensor, prompt: str, sampling: Sampling,
                     num_inner_steps: int = NULL_TEXT_INNER_STEPS, learning_rate: float = NULL_TEXT_LEARNING_RATE,
                     early_stop_epsilon: float = NULL_TEXT_EARLY_STOP_EPSILON, use_cache: bool = True,
                     control=None) -> NullTextInversion:
    """Null-text inversion of clean latents (1, c, f, h, w) on `pipe`'s UNet for sampling as `sampling` says,
    starting from the embedding of its negative prompt (default ""), of the steps that run at its strength; its
    DDIM trajectory is the pipeline's cached one; cached in the pipeline's `null_text_cache`. `control`: a
    structure condition bound to the steps that run (`pipe.bind_control`), on for the trajectory and the
    optimisation."""
    latents = latents.to(pipe.unet.device, torch.float32)
    # its trajectory is the (regularised) DDIM one: the same model key as that inversion's
    model_key = pipe.model_key(latents.shape[2], control, inversion=True)
    key = null_text_key(tensor_hash(latents), pipe.adapter_hash(), sampling.num_inference_steps, prompt,
                        sampling.guidance_scale, num_inner_steps, learning_rate, early_stop_epsilon,
                        extra="|".join([model_key, sampling.negative_prompt or "", f"start={sampling.start}"]))
    cached = pipe.null_text_cache.get(key) if use_cache else None
    if cached is not None:
        return cached
    trajectory = pipe.invert_trajectory(latents=latents, prompt=prompt, num_inference_steps=sampling.num_inference_steps,
                                        use_cache=use_cache, control=control)
    d = pipe.denoiser_for(latents.shape[2], control, inversion=True)
    with pipe.autocast():
        result = null_text_inversion(
            d.model, pipe.ddim_scheduler(), latents, pipe.encode_prompt(prompt),
            pipe.encode_prompt(sampling.negative_prompt or ""), sampling,
            num_inner_steps=num_inner_steps, learning_rate=learning_rate, early_stop_epsilon=early_stop_epsilon,
            progress=d.bar("null-text inversion"), trajectory=trajectory, model_inputs=d.inputs,
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
    sampling: Sampling | None = None,
    p2p: P2PConfig | None = None,
    null_text: bool = False,
    injection: InjectionConfig | None = None,
    record_attention: bool = False,
    null_text_inner_steps: int = NULL_TEXT_INNER_STEPS,
    null_text_learning_rate: float = NULL_TEXT_LEARNING_RATE,
    control=None,
    control_inversion: bool = True,
    **sampling_options,
) -> ControlledEdit:
    """Edit clean source latents (1, c, f, h, w) into each target prompt; see the module docstring.

    `sampling`: an `ei2.sampling.Sampling`, or its fields as keywords (`num_inference_steps`, `strength`,
    `guidance_scale`, `guidance_rescale`, `guidance_rescale_std`, `negative_prompt`). A strength < 1 samples only
    the last `int(num_inference_steps * strength)` steps, from the inversion's latent at that level; the P2P and
    injection fractions count those steps. `control`: a structure condition (`ei2.structure.StructureControl`) on
    every branch, and on the inversion unless `control_inversion=False`."""
    # 1. Check inputs: a bad P2P option fails here, before any inversion
    sampling = as_sampling(sampling, **sampling_options)
    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be one clean source video (1, c, f, h, w), got {tuple(latents.shape)}")
    run = sampling.steps_run
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
        control = pipe.bind_control(control, sampling)
    inversion_control = control if control_inversion else None

    # 2. Invert: null-text (per-step unconditional embeddings) or DDIM with the fixed negative/empty prompt
    if null_text:
        inverted = null_text_invert(pipe, latents, source_prompt, sampling, null_text_inner_steps,
                                    null_text_learning_rate, control=inversion_control)
        x_t, uncond = inverted.latents, inverted.uncond_embeddings
    else:
        uncond = pipe.encode_prompt(sampling.negative_prompt or "")
        x_t = pipe.invert(latents=latents, prompt=source_prompt, num_inference_steps=sampling.num_inference_steps,
                          strength=sampling.strength, control=inversion_control)

    # 3. Denoise all branches together (source first with p2p or injection)
    x_t = x_t.to(device, torch.float32).expand(len(prompts), -1, -1, -1, -1)
    d = pipe.denoiser_for(x_t.shape[2], control)
    with pipe.autocast():
        out = controlled_sample(d.model, pipe.ddim_scheduler(), x_t, pipe.encode_prompt(prompts), sampling,
                                uncond.to(device), controller=controller, injection=feature_injection,
                                progress=d.bar("editing"), model_inputs=d.inputs)
    out = out.float()
    if with_source and out.shape[0] == len(targets):  # the source branch left after its last injecting step
        return ControlledEdit(out, None, controller, prompts)
    if with_source:
        return ControlledEdit(out[1:], out[:1], controller, prompts)
    return ControlledEdit(out, None, controller, prompts)

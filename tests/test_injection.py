"""Structure-preserving feature injection (DESIGN §1.9): on a tiny random model for every recipe, and on Shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from ei2.control import InjectionConfig, P2PConfig, P2PError, controlled_edit
from ei2.control.injection import FeatureInjection, from_source
from ei2.control.processors import attention_control, transformer_block_places
from ei2.models import RECIPES
from ei2.sampling import Sampling

STEPS = 4


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    from ei2.pipeline import EI2Pipeline

    def make(recipe="ei2"):
        pipe = EI2Pipeline.from_pretrained(tiny_sd, recipe=recipe, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        # a non-zero STAM/TA so that every recipe's temporal module takes part (it is the identity at init)
        torch.manual_seed(1)
        with torch.no_grad():
            for _, p in pipe.unet.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        return pipe

    return make


@pytest.fixture(scope="module")
def frames():
    from conftest import moving_square

    return moving_square(3, 32, 32)


def _edit(pipe, frames, target, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 7.5)
    return pipe.edit(frames, "a red square", target, **kwargs).latents


def _state(pipe):
    """Every attention processor and forward hook of the UNet, to check that an edit leaves none behind."""
    processors = {name: id(p) for name, p in pipe.unet.unet.attn_processors.items()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in pipe.unet.named_modules()}
    return processors, hooks


# ---------------------------------------------------------------------------------------------- building blocks
def test_from_source_copies_the_source_of_every_guidance_group_into_its_targets():
    p, f = 3, 2
    x = torch.randn(2 * p * f, 4, 5)  # (g p f) c n
    out = from_source(x, p, f)
    reference = x.clone()
    for g in range(2):  # naive loop over groups, prompts and frames
        for k in range(1, p):
            for i in range(f):
                reference[(g * p + k) * f + i] = x[(g * p) * f + i]
    assert torch.equal(out, reference)
    with pytest.raises(ValueError, match="batch"):
        from_source(torch.randn(5, 2), 2, 2)


def test_config_checks_fractions_and_block():
    assert not InjectionConfig().active(50)
    assert InjectionConfig(features=0.5).active(50)
    assert not InjectionConfig(features=0.01).active(50)  # 0 of 50 steps
    for bad in (dict(features=1.5), dict(attention=-0.1), dict(features=(0.6, 0.2)), dict(block=-1)):
        with pytest.raises(P2PError):
            InjectionConfig(**bad)
    assert InjectionConfig.from_dict({"features": 0.5, "attention": [0.1, 0.4]}).attention == (0.1, 0.4)
    with pytest.raises(P2PError, match="unknown injection key"):
        InjectionConfig.from_dict({"feature": 0.5})


def test_injected_resnet_features_and_attention_are_the_sources(tiny_pipe):
    """During an injected step, the targets' up_blocks[1] ResNet outputs equal the source's, and their frame
    attention is softmax(Q_s K_s^T / sqrt(d)) V_t (checked against an explicit map); after it, neither holds."""
    pipe = tiny_pipe("ei2")
    unet, f, p = pipe.unet, 3, 3
    injection = FeatureInjection(InjectionConfig(features=0.5, attention=0.5), num_prompts=p, num_steps=2)
    resnet = unet.unet.up_blocks[1].resnets[0]
    block, place = next((b, pl) for b, pl in transformer_block_places(unet) if pl.name.startswith("up_blocks.1"))
    seen = {}
    x = torch.randn(p, 4, f, 16, 16)
    text = pipe.encode_prompt(["a red square", "a tan square", "a blue circle"])
    with torch.no_grad(), attention_control(unet, None, injection):
        # registered after the injection's own hooks, so they see what the next layer gets
        hooks = [resnet.register_forward_hook(lambda m, i, o: seen.__setitem__("resnet", o.clone())),
                 block.norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_in", o.clone())),
                 block.attn1.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_out", o.clone()))]
        try:
            for step in (0, 1):
                injection.cur_step = step
                unet(torch.cat([x, x]), 500, torch.cat([pipe.encode_prompt([""] * p), text]))
                r = rearrange(seen["resnet"], "(g p f) c h w -> g p f c h w", p=p, f=f)
                equal = [torch.equal(r[:, k], r[:, 0]) for k in (1, 2)]
                assert equal == ([True, True] if step == 0 else [False, False])
                attn = block.attn1
                hidden = seen["attn_in"]  # (g p f) n c, the normed input of attn1
                keys = attn.processor.original.frame_context(hidden)
                heads = lambda t: rearrange(t, "(g p f) n (h d) -> g p f h n d", p=p, f=f, h=attn.heads)  # noqa: E731
                q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(keys)), heads(attn.to_v(keys))
                source_map = (q[:, :1] @ k[:, :1].transpose(-1, -2) * attn.scale).softmax(-1)
                expected = attn.to_out[0](rearrange(source_map @ v, "g p f h n d -> (g p f) n (h d)"))
                out = seen["attn_out"]
                assert torch.allclose(out, expected, atol=1e-5) == (step == 0)
        finally:
            for h in hooks:
                h.remove()


# ---------------------------------------------------------------------------------------------- edits
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_zero_steps_equal_the_plain_edit_and_nothing_is_left_installed(tiny_pipe, frames, recipe):
    pipe = tiny_pipe(recipe)
    before = _state(pipe)
    plain = _edit(pipe, frames, "a tan square")
    assert torch.equal(_edit(pipe, frames, "a tan square", injection=InjectionConfig(0.0, 0.0)), plain)
    injected = _edit(pipe, frames, "a tan square", injection=InjectionConfig(0.5, 0.5))
    assert not torch.allclose(injected, plain, atol=1e-4)  # it acts
    assert _state(pipe) == before
    assert torch.equal(_edit(pipe, frames, "a tan square"), plain)  # bit-identical after an injected edit


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_same_prompt_injected_edit_equals_the_source_branch(tiny_pipe, frames, recipe):
    pipe = tiny_pipe(recipe)
    latents = pipe.encode_frames(frames)
    # without guidance every branch is the conditional prediction: full injection reproduces the source
    result = controlled_edit(pipe, latents, "a red square", ["a red square"], num_inference_steps=STEPS,
                             guidance_scale=1.0, injection=InjectionConfig(1.0, 1.0))
    # equal up to float rounding: rows of one CPU batch differ by ~1e-6 for identical inputs
    assert (result.latents - result.source_latents).abs().max().item() < 1e-4
    # with a P2P controller the source keeps its guidance halves: the same holds at guidance 7.5
    p2p = P2PConfig("replace", cross_replace=1.0, self_replace=1.0)
    guided = controlled_edit(pipe, latents, "a red square", ["a red square"], num_inference_steps=STEPS,
                             guidance_scale=7.5, injection=InjectionConfig(1.0, 1.0), p2p=p2p)
    assert (guided.latents - guided.source_latents).abs().max().item() < 1e-4


def _unet_batches(pipe):
    """Record the batch size of every VideoUNet call, (b, c, f, h, w) samples (a forward pre-hook)."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]),
                                                 with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("recipe", ["ei2", "tune-a-video"])
def test_shared_source_equals_a_conditional_source_in_both_guidance_groups(tiny_pipe, frames, recipe):
    """Plug-and-Play's layout: the source runs once, conditional only, every target half takes it, and it leaves the
    batch after the last injecting step. Reference: the two-group layout (source in both groups) where the source's
    unconditional embedding is its prompt's, so that its guided prediction is its conditional one and both groups'
    source entries are the conditional source, run to the end."""
    from ei2.inversion import ddim_sample

    pipe = tiny_pipe(recipe)
    latents = pipe.encode_frames(frames)
    prompts = ["a red square", "a tan square", "a blue circle"]
    config = InjectionConfig(features=0.5, attention=0.25)
    steps, guidance = 6, 7.5
    x_t = pipe.invert(latents=latents, prompt=prompts[0], num_inference_steps=steps).expand(3, -1, -1, -1, -1)
    sizes, handle = _unet_batches(pipe)  # after the (cached) inversion
    try:
        fast = controlled_edit(pipe, latents, prompts[0], prompts[1:], num_inference_steps=steps,
                               guidance_scale=guidance, injection=config)
    finally:
        handle.remove()
    # 3 steps with the source (1 + 2 x 2 targets), then the targets' guidance halves only
    assert sizes == [5, 5, 5, 4, 4, 4]
    assert fast.source_latents is None and fast.latents.shape == (2, *latents.shape[1:])

    text = pipe.encode_prompt(prompts)
    uncond = torch.cat([text[:1], pipe.encode_prompt([""] * 2)])  # the source's "unconditional" = its prompt
    injection = FeatureInjection(config, 3, steps)
    with attention_control(pipe.unet, None, injection):  # the plain loop, every branch to the end
        reference = ddim_sample(pipe.unet, pipe.ddim_scheduler(), x_t, text, Sampling(steps, guidance_scale=guidance), uncond,
                                callback=injection.step_callback)
    torch.testing.assert_close(fast.latents, reference[1:], rtol=1e-4, atol=1e-4)


def test_shared_source_leaves_with_strength_and_stays_for_full_injection(tiny_pipe, frames):
    pipe = tiny_pipe("ei2")
    latents = pipe.encode_frames(frames)
    pipe.invert(latents=latents, prompt="a red square", num_inference_steps=8)  # cached: not counted below
    for config, strength, expected in ((InjectionConfig(0.5, 0.0), 0.5, [3, 3, 2, 2]),   # 4 of 8 steps run, 2 inject
                                       (InjectionConfig(0.0, (0.25, 0.5)), 1.0, [3, 3, 3, 3, 2, 2, 2, 2]),  # steps 2-3
                                       (InjectionConfig(1.0, 0.0), 1.0, [3] * 8)):
        sizes, handle = _unet_batches(pipe)
        try:
            out = controlled_edit(pipe, latents, "a red square", ["a tan square"], num_inference_steps=8,
                                  guidance_scale=7.5, injection=config, strength=strength)
        finally:
            handle.remove()
        assert sizes == expected, (config, strength)
        assert (out.source_latents is None) == (expected[-1] == 2)


def test_p2p_source_branch_leaves_after_the_last_replaced_map_unless_blending_or_recording(tiny_pipe, frames):
    pipe = tiny_pipe("ei2")
    latents = pipe.encode_frames(frames)
    pipe.invert(latents=latents, prompt="a red square", num_inference_steps=8)  # cached: not counted below
    common = dict(num_inference_steps=8, guidance_scale=7.5)
    runs = {}
    for name, p2p, extra in (("drops", P2PConfig("replace", cross_replace=0.5, self_replace=0.25), {}),
                             ("recorded", P2PConfig("replace", cross_replace=0.5, self_replace=0.25),
                              dict(record_attention=True)),
                             ("blended", P2PConfig("replace", cross_replace=0.5, self_replace=0.25,
                                                   blend_words=("red", "tan")), {}),
                             ("with injection", P2PConfig("replace", cross_replace=0.25, self_replace=0.25),
                              dict(injection=InjectionConfig(0.75, 0.0)))):
        sizes, handle = _unet_batches(pipe)
        try:
            runs[name] = controlled_edit(pipe, latents, "a red square", ["a tan square"], p2p=p2p, **common, **extra)
        finally:
            handle.remove()
        runs[name].sizes = sizes
    # two guidance groups of (source, target) while a map is replaced (steps 0-3), then the target's two halves
    assert runs["drops"].sizes == [4] * 4 + [2] * 4 and runs["drops"].source_latents is None
    assert runs["recorded"].sizes == [4] * 8 and runs["blended"].sizes == [4] * 8
    assert runs["with injection"].sizes == [4] * 6 + [2] * 2  # the injection needs it longer (6 of 8 steps)
    # the target does not notice: the same latents as the run that keeps the source to the end
    torch.testing.assert_close(runs["drops"].latents, runs["recorded"].latents, rtol=1e-4, atol=1e-4)
    maps = runs["recorded"].controller.average_maps()
    assert maps and all(m.shape[0] == 2 for m in maps.values())  # both branches, every step


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_injection_composes_with_p2p_and_null_text(tiny_pipe, frames, recipe, tmp_path):
    pipe = tiny_pipe(recipe)
    latents = pipe.encode_frames(frames)
    p2p = P2PConfig("replace", cross_replace=0.5, self_replace=0.25)
    common = dict(p2p=p2p, num_inference_steps=STEPS, guidance_scale=7.5)
    before = _state(pipe)
    p2p_only = controlled_edit(pipe, latents, "a red square", ["a tan square"], **common)
    # one source branch serves both: with injection for 0 steps the P2P edit is unchanged, bit for bit
    zero = controlled_edit(pipe, latents, "a red square", ["a tan square"], injection=InjectionConfig(0.0, 0.0), **common)
    assert torch.equal(zero.latents, p2p_only.latents)
    both = controlled_edit(pipe, latents, "a red square", ["a tan square"], injection=InjectionConfig(0.5, 0.5),
                           **common)
    assert both.latents.shape == latents.shape and both.source_latents is None  # it left after step 1 of 4
    assert not torch.allclose(both.latents, p2p_only.latents, atol=1e-4)
    # with null-text inversion: the source branch reconstructs the video, the injection still acts
    nt = dict(num_inference_steps=STEPS, guidance_scale=7.5, null_text=True, null_text_inner_steps=2)
    plain_nt = controlled_edit(pipe, latents, "a red square", ["a tan square"], **nt)
    injected_nt = controlled_edit(pipe, latents, "a red square", ["a tan square"], p2p=p2p,
                                  injection=InjectionConfig(0.5, 0.5), **nt)
    assert torch.isfinite(injected_nt.latents).all()
    assert not torch.allclose(injected_nt.latents, plain_nt.latents, atol=1e-4)
    assert _state(pipe) == before


def test_a_block_the_unet_does_not_have_is_an_error(tiny_pipe, frames):
    pipe = tiny_pipe("ei2")
    with pytest.raises(P2PError, match="inject-block 5"):
        _edit(pipe, frames, "a tan square", injection=InjectionConfig(0.5, 0.0, block=5))


# ---------------------------------------------------------------------------------------------- Shapes
def test_shapes_red_circle_right_into_a_blue_circle_keeps_the_path(tmp_path, monkeypatch):
    """The default `ei2 edit` (Shapes defaults, injection calibrated on) on the sample that drifted 20 px."""
    import json

    from ei2.cli import main
    from ei2.demo import samples_dir
    from ei2.shapes.oracle import read_frames
    from ei2.video import read_video

    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    sample = json.loads((samples_dir() / "index.json").read_text())["red_circle_right"]
    code = main(["edit", str(samples_dir() / sample["video"]), "--source-prompt", sample["caption"],
                 "--target-prompt", "a blue circle moving right on a gray background", "--out", "run", "--quiet"])
    assert code == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["inject_features"] > 0  # the Shapes default turned it on
    edited = read_video(tmp_path / "run" / run["outputs"]["edits"][0]["gif"]).frames
    reading = read_frames(edited)
    error = np.hypot(reading.cx - np.array(sample["cx"]), reading.cy - np.array(sample["cy"]))
    print("centre error per frame (px):", np.round(error, 2), reading.color_names())
    assert reading.found.all() and (error <= 4.0).all()
    assert sum(c == "blue" for c in reading.color_names()) >= 7


def test_shapes_default_injection_applies_to_plain_edits_not_to_p2p(tmp_path):
    """The Shapes model's `inject_*` defaults turn injection on for a plain edit; with --p2p they stay off
    unless given (measured: injection on top of P2P + local blend collapsed a frame of the colour swap)."""
    from types import SimpleNamespace

    from ei2 import config as cfg
    from ei2.loading import default_model_path

    def settings(**given):
        args = SimpleNamespace(**{f.name: None for f in cfg.fields_for(cfg.EDIT)})
        for k, v in given.items():
            setattr(args, k, v)
        return cfg.resolve(cfg.EDIT, args, None)

    import json

    shipped = json.loads((default_model_path() / cfg.MODEL_DEFAULTS_FILE).read_text())
    plain = settings()
    cfg.apply_model_defaults(plain, default_model_path(), cfg.EDIT)
    assert (plain.inject_features, plain.inject_attention) == (shipped["inject_features"], shipped["inject_attention"])
    assert plain.inject_features > 0
    p2p = settings(p2p="replace")
    cfg.apply_model_defaults(p2p, default_model_path(), cfg.EDIT)
    assert (p2p.inject_features, p2p.inject_attention) == (0.0, 0.0) and p2p.steps == 100  # others still apply
    both = settings(p2p="replace", inject_features=0.3)
    cfg.apply_model_defaults(both, default_model_path(), cfg.EDIT)
    assert (both.inject_features, both.inject_attention) == (0.3, 0.0)
    # the same for the model's edit strength (measured: 0.6 on top of P2P + local blend collapsed a frame)
    assert plain.strength == shipped["strength"] < 1.0
    assert p2p.strength == cfg.Settings().strength == 1.0
    given = settings(p2p="replace", strength=0.8)
    cfg.apply_model_defaults(given, default_model_path(), cfg.EDIT)
    assert given.strength == 0.8


def test_oracle_reports_texture_frames_as_no_object():
    """A collapsed frame (texture instead of a shape) is no object; fresh renders of every kind are still read."""
    from ei2.shapes.oracle import read_frames
    from ei2.shapes.world import random_scenes, render

    rng = np.random.default_rng(0)
    blocks = rng.uniform(0, 255, (6, 8, 8, 3))
    texture = np.kron(blocks, np.ones((1, 8, 8, 1))).astype(np.uint8)  # 64x64 patchwork of random colours
    # a texture patch on a flat background, covering most of the frame (as decoded collapsed frames do)
    patch = np.full((6, 64, 64, 3), 128, np.uint8)
    patch[:, 6:58, 6:58] = texture[:, 6:58, 6:58]
    reading = read_frames(np.concatenate([texture, patch]))
    assert not reading.found.any() and reading.collapsed.all()
    assert reading.shape_names() == ["none"] * 12
    scenes = random_scenes(500, seed=3)
    fresh = read_frames(render(scenes))
    assert fresh.found.all() and not fresh.collapsed.any()
    assert (fresh.shape == scenes.shape).all() and (fresh.color == scenes.color).all()

"""Precision, identity, atomic writes and loading (issue 12): each test failed before its fix.

Tiny models (conftest), CPU, seconds each.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ei2.inversion import InversionCache
from ei2.models import RECIPES, Recipe, ShiftRestrictedTemporalAttention, VideoUNet
from ei2.models.context import VideoContext
from ei2.models.temporal import spectral_norm_of
from ei2.pipeline import EI2Pipeline


def square_frames(n=2):
    from conftest import moving_square
    from PIL import Image

    from ei2.video import resize_and_crop

    return np.stack([np.asarray(resize_and_crop(Image.fromarray(f), (32, 32))) for f in moving_square(n)])


def load(model, **kwargs):
    pipe = EI2Pipeline.from_pretrained(model, device="cpu", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- bf16 with STAM
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_bf16_tune_invert_edit_follow_fp32_for_every_recipe(tiny_sd, recipe):
    # σ of STAM's spectral normalisation used to be computed inside the caller's autocast: on the CPU
    # under bf16, torch.dot(fp32 u, bf16 W v) raised "expected both vectors to have same dtype".
    frames = square_frames()
    outputs = {}
    for dtype in ("fp32", "bf16"):
        pipe = load(tiny_sd, recipe=recipe, dtype=dtype)
        result = pipe.tune(frames, "a red square", steps=2, learning_rate=1e-3)
        assert all(np.isfinite(result.losses))
        out = pipe.edit(frames, "a red square", "a blue square", num_inference_steps=2, guidance_scale=3.0)
        outputs[dtype] = (result.losses, out.latents)
    (loss32, lat32), (loss16, lat16) = outputs["fp32"], outputs["bf16"]
    # the same run within bf16 rounding of the fp32 one. Measured (every recipe): losses within 4.4e-4
    # relative; edited latents 0.099-0.116 relative L2 (the random tiny UNet amplifies rounding over
    # inversion + guided sampling; the inverted latents alone: 0.045-0.048). Bounds ~2x those.
    np.testing.assert_allclose(loss16, loss32, rtol=1e-3)
    assert ((lat16 - lat32).norm() / lat32.norm()).item() < 0.25


def test_spectral_norm_bound_holds_under_mixed_precision():
    torch.manual_seed(0)
    context = VideoContext()
    context.set(4, 3, 3)
    stam = ShiftRestrictedTemporalAttention(16, 2, context)
    opt = torch.optim.AdamW(stam.parameters(), lr=5e-2)
    x = torch.randn(4, 9, 16)  # (b f) n c
    target = torch.randn_like(x)
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(stam(x).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for linear in (stam.attn.to_v, stam.attn.to_out[0]):
            raw = linear.parametrizations.weight.original.detach()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                applied = linear.weight.detach()
            # the normalised weight read under autocast (σ recomputed there, the weight having moved) is
            # W / σ with σ of an exact SVD, to fp32 accuracy (its power iteration in bf16: off by ~2e-3)
            exact = raw / torch.linalg.matrix_norm(raw.double(), ord=2).float()
            assert applied.dtype == torch.float32
            torch.testing.assert_close(applied, exact, rtol=1e-5, atol=1e-7)
            assert spectral_norm_of(linear) <= 1 + 1e-3


# ---------------------------------------------------------------------------------------------- identity
def test_custom_recipes_that_differ_do_not_share_inversions(tiny_sd):
    coarse2, coarse4 = Recipe(coarse_factor=2), Recipe(coarse_factor=4)  # both named "custom"
    assert coarse2.name == coarse4.name and coarse2.digest() != coarse4.digest()
    cache = InversionCache()
    frames = square_frames(4)
    a = load(tiny_sd, recipe=coarse2)
    a.inversion_cache = cache
    a.invert(frames, "a red square", num_inference_steps=2)
    b = load(tiny_sd, recipe=coarse4)
    b.inversion_cache = cache
    own = b.invert(frames, "a red square", num_inference_steps=2, use_cache=False)
    shared = b.invert(frames, "a red square", num_inference_steps=2)
    assert torch.equal(shared, own)  # not the other recipe's cached inversion
    assert a.adapter_hash() != b.adapter_hash()


def test_resume_refuses_a_checkpoint_of_another_custom_recipe(tiny_sd, tmp_path):
    from diffusers import DDPMScheduler

    from ei2.errors import TuningError
    from ei2.tuning import TuningConfig, tune

    unet2d = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    latents, text = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 77, 32)
    first = VideoUNet.from_2d(unet2d, Recipe(temporal_position="after-self"))
    tune(first, scheduler, latents, text, TuningConfig(steps=2, checkpoint_every=1), checkpoint_dir=tmp_path,
         progress=False)
    other = VideoUNet.from_2d(unet2d, Recipe(temporal_position="after-cross"))  # same tensor names
    with pytest.raises(TuningError, match="another recipe"):
        tune(other, scheduler, latents, text, TuningConfig(steps=3, checkpoint_every=1), checkpoint_dir=tmp_path,
             resume=True, progress=False)


def test_trainable_set_is_identified_by_its_names_not_their_lengths():
    from ei2.tuning import names_hash

    # attn1 and attn2 have names of the same length: the old identity (a hash of the lengths) confused them
    assert names_hash(["b.attn1.to_q.weight"]) != names_hash(["b.attn2.to_q.weight"])
    assert names_hash(["a", "b"]) != names_hash(["b", "a"])
    import hashlib

    # the closed form: sha256 of the names one per line (first 16 hex digits), then the count
    names = ["down.attn1.to_q.weight", "up.attn2.to_k.weight"]
    assert names_hash(names) == hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] + ":2"


# ---------------------------------------------------------------------------------------------- adapter writes
def _adapter_unet(recipe, seed):
    from test_video_unet import perturb_trainable, tiny_unet

    vu = VideoUNet.from_2d(tiny_unet(), recipe)
    perturb_trainable(vu, seed=seed)
    return vu


def test_adapter_folder_is_the_old_or_the_new_one_after_a_crash(tmp_path, monkeypatch):
    old, new = _adapter_unet("ei2", seed=1), _adapter_unet("tune-a-video", seed=2)
    folder = old.save_adapter(tmp_path / "adapter")
    real_replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        new.save_adapter(folder)
    monkeypatch.setattr(os, "replace", real_replace)
    # whole: the recipe in the JSON loads the weights beside it, and they are one adapter's tensors
    recipe = VideoUNet.read_adapter_recipe(folder)
    source = {"ei2": old, "tune-a-video": new}[recipe.name]
    loaded = _adapter_unet(recipe.name, seed=9)
    loaded.load_adapter(folder)
    for (name, p), (_, q) in zip(loaded.trainable_parameters(), source.trainable_parameters()):
        assert torch.equal(p, q), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left


def test_adapter_replaces_an_adapter_and_refuses_other_folders(tmp_path):
    a, b = _adapter_unet("ei2", seed=1), _adapter_unet("ei2", seed=2)
    a.save_adapter(tmp_path / "x")
    b.save_adapter(tmp_path / "x")
    saved = load_file(str(tmp_path / "x" / "adapter.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in b.trainable_parameters())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an ei2 adapter folder"):
        a.save_adapter(tmp_path / "run")
    # a run folder holding adapter/ loads as its adapter
    a.save_adapter(tmp_path / "run" / "adapter")
    c = _adapter_unet("ei2", seed=3)
    c.load_adapter(tmp_path / "run")
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(c.trainable_parameters(), a.trainable_parameters()))


def test_adapters_of_the_old_layout_still_load(tmp_path):
    # before: `ei2 tune --out X` wrote X/adapter.safetensors + X/adapter.json beside X/run.json
    a = _adapter_unet("ei2", seed=1)
    a.save_adapter(tmp_path / "new")
    (tmp_path / "old").mkdir()
    for name in ("adapter.safetensors", "adapter.json"):
        shutil.copy(tmp_path / "new" / name, tmp_path / "old" / name)
    (tmp_path / "old" / "run.json").write_text("{}")
    c = _adapter_unet("ei2", seed=3)
    c.load_adapter(tmp_path / "old")
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(c.trainable_parameters(), a.trainable_parameters()))


# ---------------------------------------------------------------------------------------------- tokenizer
def _without_model_max_length(tiny_sd, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    path = model / "tokenizer" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("model_max_length")
    path.write_text(json.dumps(config))
    return model


def test_tokenizer_without_model_max_length_uses_the_text_encoder_length(tiny_sd, tmp_path):
    model = _without_model_max_length(tiny_sd, tmp_path)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(model / "tokenizer").model_max_length > 1e20  # what transformers reports
    pipe, reference = load(model), load(tiny_sd)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    torch.testing.assert_close(pipe.encode_prompt("a red square"), reference.encode_prompt("a red square"),
                               rtol=0, atol=0)


def test_edit_command_with_such_a_tokenizer_runs(tiny_sd, source_video, tmp_path, monkeypatch):
    from ei2.cli import main

    model = _without_model_max_length(tiny_sd, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    args = ["edit", str(source_video), "--source-prompt", "a red square", "--target-prompt", "a tan square",
            "--p2p", "replace", "--frames", "2", "--steps", "1", "--inference-steps", "2", "--quiet"]
    assert main([*args, "--model", str(model), "--out", "run"]) == 0
    assert main([*args, "--model", str(tiny_sd), "--out", "reference"]) == 0  # the tokenizer that knows its length
    from ei2.video import read_video

    got, want = (read_video(tmp_path / r / "edits" / "01-a-tan-square.gif").frames for r in ("run", "reference"))
    assert got.shape == want.shape and (got == want).all()  # the same prompt length gives the same edit


def test_unknown_prompt_length_is_one_clear_error():
    from types import SimpleNamespace

    from ei2.errors import ModelError
    from ei2.loading import fit_prompt_length

    tokenizer = SimpleNamespace(model_max_length=int(1e30))
    with pytest.raises(ModelError, match="model_max_length"):
        fit_prompt_length(tokenizer, SimpleNamespace(config=SimpleNamespace()))


# ---------------------------------------------------------------------------------------------- frame attention
@pytest.mark.parametrize("kind", ["sparse-causal", "ffam", "full"])
def test_frame_attention_refuses_a_non_sd_attention_layer(kind):
    from diffusers.models.attention_processor import Attention

    from ei2.models.frame_attention import frame_attention_processor

    context = VideoContext()
    context.set(2, 4, 4)
    # a VAE / mid-block attention: group norm on 4-D inputs, residual connection
    attn = Attention(16, heads=1, dim_head=16, norm_num_groups=8, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True)
    attn.set_processor(frame_attention_processor(kind, context, 0, 2))
    with pytest.raises(ValueError, match="supports the self-attention .* of Stable Diffusion transformer blocks"):
        attn(torch.randn(2, 16, 4, 4))


# ---------------------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_round_trips_a_tuned_pipeline(tiny_sd, tmp_path):
    frames = square_frames()
    pipe = load(tiny_sd, recipe="tune-a-video")
    pipe.tune(frames, "a red square", steps=2, learning_rate=1e-2)
    saved = pipe.save_pretrained(tmp_path / "saved")
    assert not list(saved.rglob("*.bin")) and (saved / "adapter" / "adapter.json").is_file()
    # unet/ is the pretrained base model itself, not the tuned copy
    base, original = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (saved, tiny_sd))
    assert base.keys() == original.keys() and all(torch.equal(base[k], original[k]) for k in base)
    again = load(saved)
    assert again.unet.recipe == pipe.unet.recipe
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0)
    a = pipe.edit(frames, "a red square", "a blue square", **kwargs)
    b = again.edit(frames, "a red square", "a blue square", **kwargs)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    # a plain diffusers pipeline reads the same folder as its base model
    from diffusers import StableDiffusionPipeline

    assert isinstance(StableDiffusionPipeline.from_pretrained(saved, use_safetensors=True), StableDiffusionPipeline)

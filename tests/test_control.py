"""Prompt-to-Prompt attention control and null-text inversion on a tiny VideoUNet (CPU, seconds)."""
from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from einops import rearrange

from ei2.control import (
    AttentionStore, NullTextCache, P2PConfig, P2PError, attention_control, attention_grid, build_controller,
    controlled_sample, ddim_inversion_trajectory, null_text_inversion, parse_cross_replace, parse_reweight,
    refinement_mapper, save_attention_grid, word_token_indices,
)
from ei2.control.processors import ControlledFrameAttention, transformer_block_places
from ei2.errors import EI2Error
from ei2.inversion import ddim_invert, ddim_sample
from ei2.sampling import Sampling
from ei2.models import RECIPES, Recipe, VideoUNet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Character-level CLIP tokenizer, CLIP text encoder (hidden 32), 2-level UNet with cross-attention at both."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    chars = string.ascii_lowercase + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)

    def encode(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids)[0]

    return dict(tokenizer=tokenizer, encode=encode, unet2d=unet, scheduler=scheduler)


def video_unet(tiny, recipe="ei2"):
    vu = VideoUNet.from_2d(tiny["unet2d"], recipe).eval()
    vu.requires_grad_(False)
    return vu


def edit(tiny, vu, config, source, target, shape=(3, 7, 5), steps=4, seed=0):
    """Denoise source and target together from the same x_T under `config`; returns (latents, controller)."""
    f, h, w = shape
    controller = build_controller(config, tiny["tokenizer"], source, [target], steps)
    x_t = torch.randn(1, 4, f, h, w, generator=torch.Generator().manual_seed(seed)).expand(2, -1, -1, -1, -1)
    out = controlled_sample(vu, tiny["scheduler"], x_t, tiny["encode"]([source, target]),
                            Sampling(steps, guidance_scale=7.5), tiny["encode"]([""]), controller=controller)
    return out, controller


def columns(tiny, prompt, word):
    return word_token_indices(tiny["tokenizer"], prompt, word)


# ---------------------------------------------------------------------------------------------- processors
ALL_FRAME_ATTENTIONS = [*RECIPES, Recipe("per-frame", "self", "none"), Recipe("full", "full", "stam")]


@pytest.mark.parametrize("recipe", ALL_FRAME_ATTENTIONS, ids=lambda r: r if isinstance(r, str) else r.name)
def test_controlled_processors_match_diffusers_processors(tiny, recipe):
    vu = video_unet(tiny, recipe)
    x = torch.randn(2, 4, 3, 7, 5)
    text = tiny["encode"](["a red car", "a big car"])
    with torch.no_grad():
        plain = vu(x, 10, text).sample
        with attention_control(vu, AttentionStore(num_prompts=2)) as store:
            controlled = vu(x, 10, text).sample
        restored = vu(x, 10, text).sample
    torch.testing.assert_close(controlled, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(restored, plain)  # original processors are back
    levels = {place.level for place in store.step_maps}
    assert levels == {0, 1}  # cross-attention maps of both levels, any grid (7x5 and 4x3)
    for place, maps in store.step_maps.items():
        n = {0: 35, 1: 12}[place.level]
        assert maps.shape == (2, 3, n, 77)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, n))


@pytest.mark.parametrize("recipe", ["ei2", "tune-a-video"])
def test_self_replacement_applies_the_source_frame_attention_map_to_target_values(tiny, recipe):
    """softmax(Q_s K_s^T / sqrt(d)) V_t, with keys of the recipe's frame context, checked against an explicit map."""
    vu = video_unet(tiny, recipe)
    block, place = transformer_block_places(vu)[0]
    attn, f = block.attn1, 3
    vu.context.set(f, 7, 5)

    class ReplaceAll(AttentionStore):
        def replaces_self(self, place):
            return True

    processor = ControlledFrameAttention(attn.processor, ReplaceAll(2), place, vu.context)
    hidden = torch.randn(2 * f, 35, attn.to_q.in_features)
    with torch.no_grad():
        out = processor(attn, hidden)
        keys = attn.processor.frame_context(hidden)
        q = rearrange(attn.to_q(hidden), "(b f) n (h d) -> b f h n d", f=f, h=attn.heads)
        k = rearrange(attn.to_k(keys), "(b f) m (h d) -> b f h m d", f=f, h=attn.heads)
        v = rearrange(attn.to_v(keys), "(b f) m (h d) -> b f h m d", f=f, h=attn.heads)
        source_map = (q[0] @ k[0].transpose(-1, -2) * attn.scale).softmax(-1)  # f h n m
        target = attn.to_out[0](rearrange(source_map @ v[1], "f h n d -> f n (h d)"))
    torch.testing.assert_close(out[f:], target, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:f], target, atol=1e-3)  # the source row keeps its own values


@pytest.mark.parametrize("recipe", ["ei2", "tune-a-video"])
def test_controlled_frame_attention_runs_the_frame_attention_kernel(tiny, recipe, monkeypatch):
    """Where no editor acts, the controlled frame attention is the recipe's processor bit for bit, also where
    that processor takes the CPU's zero-padded-heads kernel (forced here for the tiny model's short keys)."""
    from ei2.models import frame_attention

    monkeypatch.setattr(frame_attention, "CPU_HEAD_PAD_MIN_KEYS", 1)
    vu = video_unet(tiny, recipe)
    block, place = transformer_block_places(vu)[0]
    attn, f = block.attn1, 3
    vu.context.set(f, 7, 5)

    class ReplaceNothing(AttentionStore):
        def replaces_self(self, place):
            return False

    processor = ControlledFrameAttention(attn.processor, ReplaceNothing(2), place, vu.context)
    hidden = torch.randn(2 * f, 35, attn.to_q.in_features)
    with torch.no_grad():
        plain = attn.processor(attn, hidden)
        again = attn.processor(attn, hidden)  # the kernel is deterministic, so equality below means something
        monkeypatch.setattr(frame_attention, "CPU_HEAD_PAD_MIN_KEYS", 10**9)
        unpadded = attn.processor(attn, hidden)
        monkeypatch.setattr(frame_attention, "CPU_HEAD_PAD_MIN_KEYS", 1)
        controlled = processor(attn, hidden)
    assert torch.equal(plain, again)
    assert torch.equal(controlled, plain)
    torch.testing.assert_close(unpadded, plain, atol=1e-5, rtol=1e-5)  # the two kernels agree to rounding


# ---------------------------------------------------------------------------------------------- edits
@pytest.mark.parametrize("recipe", ["ei2", "tune-a-video"])
def test_full_replacement_with_the_same_prompt_keeps_target_equal_to_source(tiny, recipe):
    config = P2PConfig("replace", cross_replace=1.0, self_replace=1.0, self_replace_min_level=0)
    out, controller = edit(tiny, video_unet(tiny, recipe), config, "a red car", "a red car")
    assert controller.cur_step == 4
    # equal up to float rounding: on the CPU the same UNet already gives rows of one batch that differ
    # by ~1e-6 for identical inputs (kernels block the batch unevenly), so bitwise equality is out of reach
    error = (out[1] - out[0]).abs().max().item()
    print(f"{recipe}: max |target - source| = {error:.3g} (latents of scale {out[0].abs().max().item():.3g})")
    assert error < 1e-4


def test_word_swap_keeps_source_cross_attention_maps_for_unchanged_tokens(tiny):
    source, target = "a red car", "a big car"
    config = P2PConfig("replace", cross_replace={"default": 1.0, "big": 0.0}, self_replace=0.5)
    _, controller = edit(tiny, video_unet(tiny), config, source, target)
    swapped = columns(tiny, target, "big")
    kept = [j for j in range(77) if j not in swapped]
    assert len(swapped) == 3 and controller.sum_maps
    for maps in controller.sum_maps.values():  # (2, f, n, 77), summed over the steps
        assert torch.equal(maps[1][..., kept], maps[0][..., kept])
        assert not torch.allclose(maps[1][..., swapped], maps[0][..., swapped])


def test_reweighting_scales_exactly_the_chosen_column(tiny):
    prompt = "a red car"
    config = P2PConfig("reweight", cross_replace=1.0, self_replace=0.0, reweight={"red": 4.0})
    _, controller = edit(tiny, video_unet(tiny), config, prompt, prompt)
    red = columns(tiny, prompt, "red")
    others = [j for j in range(77) if j not in red]
    for maps in controller.sum_maps.values():
        torch.testing.assert_close(maps[1][..., red], 4 * maps[0][..., red], rtol=1e-6, atol=0)
        assert torch.equal(maps[1][..., others], maps[0][..., others])


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 8, 8)])
def test_local_blend_keeps_latents_outside_the_mask_equal_to_the_source(tiny, shape):
    config = P2PConfig("replace", cross_replace=0.5, self_replace=0.3, blend_words=("red", "big"),
                       blend_threshold=0.5, blend_start=0.0)
    out, controller = edit(tiny, video_unet(tiny), config, "a red car", "a big car", shape=shape)
    mask = controller.local_blend.last_mask  # (2, 1, f, h, w)
    assert mask.shape == (2, 1, *shape)
    inside = mask[1].expand_as(out[1]).bool()
    print(f"{shape}: mask covers {inside.float().mean():.2f} of the target latents")
    assert 0 < inside.float().mean() < 1
    assert torch.equal(out[1][~inside], out[0][~inside])
    assert not torch.allclose(out[1][inside], out[0][inside])


def test_refinement_aligns_tokens_and_keeps_added_words(tiny):
    tok = tiny["tokenizer"]
    mapper, alphas = refinement_mapper(tok, "a car", "a red car")
    red = columns(tiny, "a red car", "red")
    assert red == [2, 3, 4] and alphas[red].eq(0).all() and alphas[:2].eq(1).all()
    car_src, car_tgt = columns(tiny, "a car", "car"), columns(tiny, "a red car", "car")
    assert mapper[car_tgt].tolist() == car_src and alphas[car_tgt].eq(1).all()
    config = P2PConfig("refine", cross_replace=1.0, self_replace=0.0)
    _, controller = edit(tiny, video_unet(tiny), config, "a car", "a red car")
    for maps in controller.sum_maps.values():
        assert torch.equal(maps[1][..., car_tgt], maps[0][..., car_src])


def test_attention_grid_has_a_row_per_prompt_and_a_cell_per_frame(tiny, tmp_path):
    import numpy as np
    from PIL import Image

    _, controller = edit(tiny, video_unet(tiny), P2PConfig("replace"), "a red car", "a big car")
    prompts = ["a red car", "a big car"]
    grid = attention_grid(controller, tiny["tokenizer"], prompts, "car", cell=14)
    assert grid.shape == (2 * 14, 3 * 10)
    assert attention_grid(controller, tiny["tokenizer"], prompts, "big", cell=14).shape == (14, 3 * 10)
    # reference, cell by cell: the word's token maps summed one token at a time, each frame scaled to its own
    # maximum (255) and repeated 2x2 (nearest): a blank or misplaced grid cannot pass
    length = tiny["tokenizer"].model_max_length
    for row, prompt in enumerate(prompts):
        car = columns(tiny, prompt, "car")
        assert car
        summed = sum(controller.word_maps(torch.eye(length)[[i]].repeat(2, 1))[row] for i in car)  # f h w
        for frame in range(summed.shape[0]):
            want = summed[frame] / summed[frame].max()
            want = np.kron((want * 255).round().clamp(0, 255).to(torch.uint8).numpy(), np.ones((2, 2), np.uint8))
            cell = grid[row * 14:(row + 1) * 14, frame * 10:(frame + 1) * 10]
            assert np.abs(cell.astype(int) - want.astype(int)).max() <= 1, (row, frame)
            assert cell.max() == 255 and cell.min() < 200  # a map, not a flat cell
    path = save_attention_grid(controller, tiny["tokenizer"], prompts, "car", tmp_path / "car.png", cell=14)
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    assert np.array_equal(np.asarray(Image.open(path)), grid)  # the PNG holds the grid itself


# ---------------------------------------------------------------------------------------------- null text
def test_null_text_inversion_reconstructs_better_than_ddim_inversion(tiny, tmp_path):
    vu, scheduler, steps, scale = video_unet(tiny), tiny["scheduler"], 5, 7.5
    x0 = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    text, empty = tiny["encode"](["a red car"]), tiny["encode"]([""])

    x_t = ddim_invert(vu, scheduler, x0, text, steps)
    assert torch.equal(ddim_inversion_trajectory(vu, scheduler, x0, text, steps)[-1], x_t)
    sampling = Sampling(steps, guidance_scale=scale)
    plain = ddim_sample(vu, scheduler, x_t, text, sampling, empty)
    # the controlled sampler and the trajectory repeat ei2.inversion's arithmetic exactly
    assert torch.equal(controlled_sample(vu, scheduler, x_t, text, sampling, empty), plain)

    # lr 0.1 instead of SD's 1e-2: the tiny random text encoder's embeddings need larger moves
    result = null_text_inversion(vu, scheduler, x0, text, empty, sampling, num_inner_steps=10,
                                 learning_rate=0.1, progress=None)
    assert result.uncond_embeddings.shape == (steps, 1, 77, 32)
    assert all(not p.requires_grad for p in vu.parameters())
    nulltext = controlled_sample(vu, scheduler, result.latents, text, sampling, result.uncond_embeddings)
    plain_error = (plain - x0).pow(2).mean().item()
    nulltext_error = (nulltext - x0).pow(2).mean().item()
    print(f"reconstruction MSE: DDIM inversion {plain_error:.4g}, null-text inversion {nulltext_error:.4g}")
    assert plain_error > 1.0 and nulltext_error < 0.25 * plain_error

    cache = NullTextCache(tmp_path)
    cache.put("k", result)
    loaded = NullTextCache(tmp_path).get("k")
    assert torch.equal(loaded.uncond_embeddings, result.uncond_embeddings) and torch.equal(loaded.latents, result.latents)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_p2p_input_is_one_clear_error(tiny):
    tok = tiny["tokenizer"]
    with pytest.raises(P2PError, match="same number of tokens.*--p2p refine"):
        build_controller(P2PConfig("replace"), tok, "a man is skiing", "a panda is skiing", 10)
    with pytest.raises(P2PError, match="'dog' is in neither prompt"):
        build_controller(P2PConfig("replace", blend_words=("dog",)), tok, "a red car", "a big car", 10)
    with pytest.raises(P2PError, match="'blue' is not in the prompt 'a big car'"):
        build_controller(P2PConfig("reweight", reweight={"blue": 2}), tok, "a red car", "a big car", 10)
    with pytest.raises(P2PError, match="'tree' is not in the target prompt"):
        build_controller(P2PConfig("replace", cross_replace={"tree": 0.5}), tok, "a red car", "a big car", 10)
    for bad in (dict(cross_replace=1.5), dict(self_replace=-0.1), dict(cross_replace={"car": 2}),
                dict(cross_replace=(0.8, 0.2)), dict(blend_threshold=1.2)):
        with pytest.raises(P2PError, match=r"\[0, 1\]"):
            P2PConfig("replace", **bad)
    with pytest.raises(P2PError, match="needs --reweight"):
        P2PConfig("reweight")
    with pytest.raises(P2PError, match="not one of"):
        P2PConfig("swap")
    with pytest.raises(P2PError, match="unknown p2p key"):
        P2PConfig.from_dict({"mode": "replace", "cross_replce": 0.5})
    with pytest.raises(P2PError, match="WORD=FACTOR"):
        parse_reweight(["watercolor"])
    assert issubclass(P2PError, EI2Error)
    assert parse_cross_replace(["0.8"]) == 0.8
    assert parse_cross_replace(["0.8", "panda=0.4"]) == {"default": 0.8, "panda": 0.4}
    assert parse_reweight(["watercolor=4"]) == {"watercolor": 4.0}
    assert P2PConfig.from_dict({"mode": "refine", "blend_words": ["man", "panda"]}).blend_words == ("man", "panda")


# ---------------------------------------------------------------------------------------------- on the pipeline
def test_controlled_edit_on_the_pipeline_caches_null_text_and_saves_attention(tiny_sd, tmp_path, monkeypatch):
    from conftest import moving_square

    import ei2.control.edit as edit_module
    from ei2.control import controlled_edit
    from ei2.pipeline import EI2Pipeline

    pipe = EI2Pipeline.from_pretrained(tiny_sd, device="cpu", inversion_cache_dir=tmp_path / "cache")
    pipe.set_progress_bar_config(disable=True)
    latents = pipe.encode_frames(moving_square(3, 32, 32))  # 1 4 3 16 16
    config = P2PConfig("replace", blend_words=("red", "tan"), blend_threshold=0.9)
    kwargs = dict(p2p=config, null_text=True, num_inference_steps=3, guidance_scale=7.5, null_text_inner_steps=2)
    events = []
    pipe.set_progress_callback(lambda desc, step, total: events.append((desc, step, total)))
    result = controlled_edit(pipe, latents, "a red square", ["a tan square"], **kwargs)
    pipe.set_progress_callback(None)
    # every bar reports through the pipeline's public callback: the DDIM trajectory, null-text inversion (3 steps
    # x 2 inner iterations, fewer where one stops early: the bar is then advanced by the rest) and the edit
    assert list(dict.fromkeys(desc for desc, _, _ in events)) == ["inversion", "null-text inversion", "editing"]
    assert [e for e in events if e[0] != "null-text inversion"] == [("inversion", i, 3) for i in range(4)] + \
        [("editing", i, 3) for i in range(4)]
    assert events[4] == ("null-text inversion", 0, 6) and events[-5] == ("null-text inversion", 6, 6)
    assert result.latents.shape == result.source_latents.shape == latents.shape
    assert result.prompts == ["a red square", "a tan square"]
    assert len(list((tmp_path / "cache").glob("*.nulltext.safetensors"))) == 1

    monkeypatch.setattr(edit_module, "null_text_inversion", lambda *a, **k: pytest.fail("cache not used"))
    pipe.null_text_cache = NullTextCache(tmp_path / "cache")  # a new process: only the folder is left
    again = controlled_edit(pipe, latents, "a red square", ["a tan square"], **kwargs)
    torch.testing.assert_close(again.latents, result.latents, atol=1e-4, rtol=1e-4)

    path = save_attention_grid(result.controller, pipe.tokenizer, result.prompts, "square", tmp_path / "square.png")
    assert path.is_file()
    with pytest.raises(P2PError, match="same number of tokens"):
        controlled_edit(pipe, latents, "a red square", ["a blue square"], **kwargs)


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture
def _isolated_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


CLI_FAST = ["--frames", "3", "--steps", "0", "--inference-steps", "3", "--quiet"]


def p2p_args(tiny_sd, source_video, out, target="a tan square", *extra):
    return ["edit", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square",
            "--target-prompt", target, "--out", str(out), *CLI_FAST, *extra]


def test_cli_p2p_edit_with_local_blend_null_text_and_attention_grid(tiny_sd, source_video, tmp_path, _isolated_cli):
    from ei2.cli import main

    out = tmp_path / "run"
    assert main(p2p_args(tiny_sd, source_video, out, "a tan square", "--p2p", "replace", "--cross-replace", "0.8",
                         "tan=0.4", "--self-replace", "0.5", "--blend-words", "red", "tan", "--null-text",
                         "--save-attention", "square")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["p2p"]["mode"] == "replace" and run["p2p"]["cross_replace"] == {"default": 0.8, "tan": 0.4}
    assert run["p2p"]["blend_words"] == ["red", "tan"] and run["inversion"]["null_text"] is True
    edit_entry = run["outputs"]["edits"][0]
    assert edit_entry["attention"] == "edits/01-a-tan-square.attention-square.png"
    assert (out / edit_entry["attention"]).is_file() and (out / edit_entry["mp4"]).is_file()
    assert list((tmp_path / "cache").rglob("*.nulltext.safetensors"))

    (tmp_path / "p2p.yaml").write_text(
        "p2p: reweight\nreweight: {square: 2}\ncross_replace: 0.6\nblend_words: square\nblend_threshold: 0.5\n")
    again = tmp_path / "yaml"
    assert main(p2p_args(tiny_sd, source_video, again, "a red square", "--config", str(tmp_path / "p2p.yaml"))) == 0
    run = json.loads((again / "run.json").read_text())
    assert run["p2p"]["reweight"] == {"square": 2.0} and run["p2p"]["cross_replace"] == 0.6


@pytest.mark.parametrize("extra, target, message", [
    (["--p2p", "replace"], "a blue square", "same number of tokens"),
    (["--p2p", "replace", "--blend-words", "dog"], "a tan square", "'dog' is in neither prompt"),
    (["--p2p", "reweight", "--reweight", "blue=2"], "a tan square", "'blue' is not in the prompt 'a tan square'"),
    (["--p2p", "replace", "--cross-replace", "1.5"], "a tan square", "in [0, 1]"),
    (["--p2p", "replace", "--self-replace", "-0.2"], "a tan square", "in [0, 1]"),
    (["--blend-words", "red"], "a tan square", "--blend-words need --p2p"),
    (["--p2p", "refine", "--reweight", "tan=2"], "a tan square", "--reweight is used with --p2p reweight"),
    (["--save-attention", "dog"], "a tan square", "--save-attention word 'dog'"),
])
def test_cli_bad_p2p_input_is_one_message_exit_2_nothing_written(extra, target, message, tiny_sd, source_video,
                                                                 tmp_path, capsys, _isolated_cli):
    from ei2.cli import main

    capsys.readouterr()
    assert main(p2p_args(tiny_sd, source_video, tmp_path / "outputs" / "run", target, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ei2: error: ") and message in err[0], err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- Shapes model
def test_shapes_colour_swap_with_p2p_and_local_blend_keeps_the_background(tmp_path, _isolated_cli):
    """`ei2 edit --p2p replace --blend-words square` on a bundled Shapes sample: blue -> red, background kept.

    Asserted: the oracle reads red in >= 7 of 8 frames, and pixels away from both objects differ from the
    source's by <= 10/255 on average in every frame (measured: 8/8 red, 1.3-3.1/255). Not asserted: the
    object's centre, which moves up to ~12 px here (the Shapes model's word attention is not localised;
    see the model card's Notes).
    """
    import numpy as np

    from ei2.cli import main
    from ei2.demo import samples_dir
    from ei2.loading import default_model_path
    from ei2.shapes.oracle import read_frames
    from ei2.video import read_video

    if not (default_model_path() / "model_index.json").is_file():
        pytest.skip("the bundled Shapes model is not in this checkout")
    sample = json.loads((samples_dir() / "index.json").read_text())["blue_square_down"]
    out = tmp_path / "run"
    assert main(["edit", str(samples_dir() / sample["video"]), "--source-prompt", sample["caption"],
                 "--target-prompt", sample["caption"].replace("blue", "red"), "--steps", "0",
                 "--inference-steps", "25", "--p2p", "replace", "--blend-words", "square",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    edited = read_video(out / run["outputs"]["edits"][0]["gif"]).frames
    source = read_video(samples_dir() / sample["video"]).frames[: len(edited)]
    before, after = read_frames(source), read_frames(edited)
    assert after.color_names().count("red") >= 7, after.color_names()
    assert after.found.all()
    yy, xx = np.mgrid[: source.shape[1], : source.shape[2]]
    for k in range(len(edited)):
        near = [np.hypot(xx - r.cx[k], yy - r.cy[k]) <= 1.5 * r.size[k] + 2 for r in (before, after)]
        background = ~(near[0] | near[1])
        error = np.abs(edited[k].astype(int) - source[k].astype(int))[background].mean()
        assert error <= 10, (k, error)

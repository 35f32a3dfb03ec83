"""Shared fixtures: a tiny Stable Diffusion 1.x-layout pipeline folder and a tiny source video.

The pipeline (CLIP text encoder of hidden size 32, a character-level CLIP tokenizer, a 2-level
AutoencoderKL, a 2-level UNet2DConditionModel with cross-attention, SD's DDIM schedule) is built
with random weights and saved with `StableDiffusionPipeline.save_pretrained`, so the CLI loads it
by path exactly as it loads Stable Diffusion. Everything runs on the CPU in seconds.
"""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

TINY_IMAGE = 32  # pixels; the VAE halves it once -> 16x16 latents


def write_tokenizer(folder) -> None:
    """A CLIP BPE tokenizer whose tokens are single characters (each word: chars, the last with </w>)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }))


def build_tiny_sd(folder, prediction_type: str = "epsilon", seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer(folder / "tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer_src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=TINY_IMAGE,
    )
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def moving_square(num_frames: int = 8, height: int = 40, width: int = 48) -> np.ndarray:
    """(f, h, w, 3) uint8: a red square sliding right over a gray background."""
    frames = np.full((num_frames, height, width, 3), 128, dtype=np.uint8)
    for i in range(num_frames):
        x = 4 + 3 * i
        frames[i, 12:28, x : x + 16] = (220, 40, 40)
    return frames


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Path of a tiny epsilon-prediction SD pipeline folder."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """Path of a tiny v-prediction SD pipeline folder."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction", seed=1)


def build_tiny_controlnet(model, folder, seed: int = 3):
    """A ControlNet made from the tiny model's UNet (condition embedding halving once, as its VAE), its zero
    convolutions made non-zero so that it changes the edit; saved as a diffusers folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_control(tmp_path_factory, tiny_sd):
    """The tiny model with a bundled canny ControlNet (its ei2_defaults.json names it), as the Shapes model has."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-sd-control") / "model"
    shutil.copytree(tiny_sd, folder)
    build_tiny_controlnet(folder, folder / "controlnet-canny")
    (folder / "ei2_defaults.json").write_text(json.dumps({"controlnets": {"canny": "controlnet-canny"}}))
    return folder


@pytest.fixture(scope="session")
def source_video(tmp_path_factory):
    """An 8-frame mp4 of a moving square (48x40: resized and centre-cropped to 32x32 by the readers)."""
    from ei2.video import write_mp4

    path = tmp_path_factory.mktemp("video") / "square.mp4"
    write_mp4(moving_square(), path, fps=8)
    return path


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(1)  # a shared 2-core machine: 2 spinning OpenMP threads can be 10x slower
    yield


@pytest.fixture
def isolated_run(tmp_path, monkeypatch):
    """A command run as a user runs it, kept to the test's folder: that folder is the working directory and
    holds the inversion cache; the Hugging Face hub is offline."""
    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

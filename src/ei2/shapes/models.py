"""Architectures of the embedded Shapes model: a small CLIP, an AutoencoderKL, an SD-1.x-layout UNet.

All are stock transformers/diffusers classes; only their sizes are chosen here (DESIGN §3):
- CLIP: text tower 3 layers x 64 wide (its hidden size is the UNet's cross-attention width),
  vision tower 4 layers x 128 wide on 8x8 patches of the 64x64 frame.
- VAE: 4 latent channels, 64 -> 16 (three encoder blocks, channels 32, 64, 64), ~0.95 M parameters.
- UNet: CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D / UpBlock2D, CrossAttnUpBlock2D,
  CrossAttnUpBlock2D (the SD 1.x layout), channels 32, 64, 64, one layer per block, ~1.5 M parameters.
- Schedulers: SD 1.x's DDPM noise schedule (scaled_linear, beta 0.00085-0.012, 1000 steps, epsilon);
  model v2 (issue 19) rescales it to zero terminal SNR (Lin et al. 2024), predicts v and samples from
  t = T ("trailing" timesteps).
"""
from __future__ import annotations

from .world import RESOLUTION

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
LATENT_SIZE = RESOLUTION // 4
IMAGE_MEAN = [0.5, 0.5, 0.5]  # CLIP's image normalisation: (x / 255 - 0.5) / 0.5
IMAGE_STD = [0.5, 0.5, 0.5]


def clip_config(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, max_length: int):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=64,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    vision = dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=RESOLUTION, patch_size=8, projection_dim=64,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4, norm_num_groups=32,
    )


SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


def schedule(prediction_type: str = "epsilon", zero_snr: bool = False) -> dict:
    """SD 1.x's schedule, or (zero_snr) its zero-terminal-SNR rescaling with trailing timesteps; an epsilon
    model cannot use zero SNR (x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero at a = 0)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    if zero_snr and prediction_type == "epsilon":
        raise ValueError("a zero-terminal-SNR schedule needs prediction_type='v_prediction' (epsilon cannot give x0 at t = T)")
    extra = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}  # trailing ignores steps_offset
    return {**SD_SCHEDULE, "prediction_type": prediction_type, **extra}


def make_train_scheduler(prediction_type: str = "epsilon", zero_snr: bool = False):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule(prediction_type, zero_snr))


def make_sample_scheduler(prediction_type: str = "epsilon", zero_snr: bool = False):
    """The pipeline's default sampler: DDIM with the training schedule (set_alpha_to_one=False as SD ships it;
    with zero SNR the last step is t = T itself, where alpha_bar = 0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**schedule(prediction_type, zero_snr), set_alpha_to_one=False)

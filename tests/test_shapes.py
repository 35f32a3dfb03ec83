"""The Shapes world, its oracle, the tokenizer, the shipped model (assets/shapes-sd, assets/shapes-clip),
the sample videos and the training entry point. CPU, a few seconds each."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ei2.shapes.oracle import attribute_accuracy, read_frames
from ei2.shapes.tokenizer import check_tokenizer, load_tokenizer, write_tokenizer
from ei2.shapes.world import (
    BACKGROUND_NAMES, COLOR_NAMES, MOTIONS, RESOLUTION, SHAPES, all_captions, caption, caption_words, degrade,
    random_scenes, random_video, render, video_scenes,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SD = ASSETS / "shapes-sd"
CLIP = ASSETS / "shapes-clip"
SAMPLES = ASSETS / "samples"


# ------------------------------------------------------------------------------------------ world
def test_world_size_and_captions():
    assert len(COLOR_NAMES) >= 6 and len(SHAPES) == 4 and len(BACKGROUND_NAMES) >= 3
    assert caption("red", "circle", "gray") == "a red circle on a gray background"
    assert caption("orange", "square", "white", "right") == "an orange square moving right on a white background"
    assert len(set(all_captions())) == len(COLOR_NAMES) * len(SHAPES) * len(BACKGROUND_NAMES)


def test_render_is_seeded_and_bounded():
    a, b = render(random_scenes(64, seed=5)), render(random_scenes(64, seed=5))
    assert a.shape == (64, RESOLUTION, RESOLUTION, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render(random_scenes(64, seed=6)))
    scenes = random_scenes(500, seed=7)
    assert (scenes.cx - scenes.size >= 0).all() and (scenes.cx + scenes.size <= RESOLUTION).all()
    assert len(np.unique(np.round(scenes.size))) > 5  # sizes and positions vary


def test_oracle_reads_renders():
    scenes = random_scenes(800, seed=11)
    frames = render(scenes)
    clean = read_frames(frames)
    acc = attribute_accuracy(clean, scenes.color, scenes.shape, scenes.background)
    assert acc["all"] == 1.0, acc
    assert np.abs(clean.cx - scenes.cx).max() <= 1.0 and np.abs(clean.cy - scenes.cy).max() <= 1.0
    assert np.abs(clean.size - scenes.size).max() <= 1.0
    noisy = read_frames(degrade(frames, seed=12, blur=0.6, noise=4.0))
    acc = attribute_accuracy(noisy, scenes.color, scenes.shape, scenes.background)
    assert min(acc.values()) >= 0.99, acc
    assert np.median(np.abs(noisy.cx - scenes.cx)) <= 0.5


def test_oracle_on_empty_frame():
    reading = read_frames(np.full((64, 64, 3), 128, np.uint8))
    assert not reading.found[0] and reading.background_names() == ["gray"] and reading.shape_names() == ["none"]


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_videos_follow_their_motion(motion):
    frames, truth = random_video(seed=3, num_frames=12, motion=motion)
    assert frames.shape == (12, 64, 64, 3) and MOTIONS[motion] in truth.caption
    s = truth.scenes
    assert (s.cx - s.size >= 0).all() and (s.cx + s.size <= 64).all() and (s.cy - s.size >= 0).all() and (s.cy + s.size <= 64).all()
    r = read_frames(frames)
    assert (r.shape == s.shape).all() and (r.color == s.color).all()
    assert np.abs(r.cx - s.cx).max() <= 1.0 and np.abs(r.cy - s.cy).max() <= 1.0
    moved = np.hypot(s.cx[-1] - s.cx[0], s.cy[-1] - s.cy[0]) + abs(s.size[-1] - s.size[0])
    if motion in ("circular", "bouncing"):
        moved = np.hypot(np.diff(s.cx), np.diff(s.cy)).sum()
    assert moved > 5
    if motion == "right":
        assert (np.diff(s.cx) > 0).all()
    if motion == "growing":
        assert (np.diff(s.size) > 0).all()


def test_video_scenes_rejects_unknown_motion():
    with pytest.raises(ValueError, match="unknown motion"):
        video_scenes("sideways")


# ------------------------------------------------------------------------------------------ tokenizer
def test_written_tokenizer_has_one_token_per_word(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    check_tokenizer(tok)
    ids = tok(all_captions("circular")[0]).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids[1:-1]
    assert len(ids) == len(all_captions("circular")[0].split()) + 2


@pytest.mark.parametrize("folder", [SD / "tokenizer", CLIP])
def test_shipped_tokenizers_know_every_caption_word(folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    check_tokenizer(tok)
    for word in caption_words():
        (token,) = tok(word, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(token) == word + "</w>"
    assert (folder / "vocab.json").exists() and (folder / "merges.txt").exists()


# ------------------------------------------------------------------------------------------ shipped model
@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SD), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_layout(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    index = json.loads((SD / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    files = [p for p in SD.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) + sum(p.stat().st_size for p in CLIP.rglob("*") if p.is_file()) < 30e6
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    u = pipe.unet.config
    assert u.sample_size == 16 and u.in_channels == u.out_channels == 4
    assert u.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert list(u.down_block_types) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(u.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 4
    s = pipe.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps, s.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")


def test_text_encoder_is_the_clip_text_tower(pipe):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(CLIP))
    for name, tensor in pipe.text_encoder.state_dict().items():
        other = clip.text_model.state_dict()[name.removeprefix("text_model.")]
        assert torch.equal(tensor, other), name


def test_shapes_clip_zero_shot():
    from transformers import CLIPModel

    from ei2.shapes.evaluate import clip_zero_shot

    torch.manual_seed(0)
    clip = CLIPModel.from_pretrained(str(CLIP)).eval()
    acc = clip_zero_shot(clip, load_tokenizer(CLIP), n=250, seed=21)
    assert min(acc.values()) >= 0.95, acc


def test_shipped_vae_reconstructs(pipe):
    from ei2.shapes.evaluate import vae_psnr

    assert vae_psnr(pipe.vae, n=50, seed=22, batch=50) >= 30.0


def test_shipped_text_to_image_passes_the_oracle(pipe):
    from ei2.shapes.evaluate import text_to_image

    rows = [("red", "circle", "gray"), ("blue", "square", "white"), ("green", "triangle", "black"),
            ("yellow", "diamond", "gray"), ("purple", "square", "black"), ("orange", "triangle", "white"),
            ("red", "diamond", "black"), ("blue", "circle", "gray")]
    captions = [caption(*r) for r in rows]
    images = text_to_image(pipe, captions, seed=1000, steps=20, guidance=7.5, batch=8)
    reading = read_frames(images)
    got = list(zip(reading.color_names(), reading.shape_names(), reading.background_names()))
    for k, name in enumerate(("colour", "shape", "background")):
        right = sum(g[k] == r[k] for g, r in zip(got, rows))
        assert right >= 7, f"{name}: {right}/8 right; asked {rows}, read {got}"


# ------------------------------------------------------------------------------------------ samples
def test_sample_videos_match_their_captions():
    from ei2.video import read_video

    index = json.loads((SAMPLES / "index.json").read_text())
    assert len(index) >= 4 and "red_circle_right" in index
    for name, entry in index.items():
        assert (SAMPLES / f"{name}.txt").read_text().strip() == entry["caption"]
        frames = read_video(SAMPLES / entry["video"]).frames
        assert frames.shape == (entry["frames"], 64, 64, 3)
        r = read_frames(frames)
        assert set(r.color_names()) == {entry["color"]} and set(r.shape_names()) == {entry["shape"]}
        assert set(r.background_names()) == {entry["background"]}
        assert np.abs(r.cx - np.array(entry["cx"])).max() <= 1.5 and np.abs(r.cy - np.array(entry["cy"])).max() <= 1.5


# ------------------------------------------------------------------------------------------ training
def test_training_runs_resumes_and_exports(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ei2.shapes import train

    common = ["--device", "cpu", "--batch-size", "2", "--pool", "8", "--work", str(tmp_path / "work"),
              "--assets", str(tmp_path / "assets"), "--threads", "1"]
    assert train.main(["all", "--steps", "2", *common]) == 0
    assert train.main(["vae", "--steps", "3", "--resume", *common]) == 0
    logs = [json.loads(line) for line in (tmp_path / "work" / "vae" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs][-1] == 2  # resumed at step 2, logged the last step
    assert json.loads((tmp_path / "work" / "vae" / "final.json").read_text())["step"] == 3
    assert train.main(["export", *common]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "assets" / "shapes-sd"), safety_checker=None)
    assert pipe.unet.config.sample_size == 16
    latent_std = json.loads((tmp_path / "work" / "vae" / "final.json").read_text())["latent_std"]
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / latent_std)


def test_v_prediction_zero_snr_training_and_its_exported_scheduler(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler

    from ei2.shapes import models, train

    common = ["--device", "cpu", "--batch-size", "2", "--pool", "8", "--work", str(tmp_path / "work"),
              "--assets", str(tmp_path / "assets"), "--threads", "1"]
    with pytest.raises(SystemExit):  # an epsilon model cannot use a zero-SNR schedule
        train.main(["unet", "--steps", "1", "--zero-snr", *common])
    assert train.main(["clip", "--steps", "1", *common]) == 0 and train.main(["vae", "--steps", "1", *common]) == 0
    v2 = ["--prediction-type", "v_prediction", "--zero-snr"]
    assert train.main(["unet", "--steps", "2", *v2, *common]) == 0
    with pytest.raises(SystemExit, match="same options"):  # resuming under another schedule is refused
        train.main(["unet", "--steps", "3", "--resume", *common])
    # the loss is the v target: sqrt(a) eps - sqrt(1 - a) x0, written out here for one batch
    stage = train.UnetStage(train.replace(train.DEFAULTS["cpu"]["unet"], batch_size=3, pool=8,
                                          prediction_type="v_prediction", zero_snr=True),
                            torch.device("cpu"), seed=0, workers=1)
    stage.model = stage.build()
    seen = {}
    stage.model.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], t=args[1], out=out.sample),
                                      with_kwargs=True)
    gen = train.step_generator(0, 5, "cpu")
    loss = stage.loss(5, gen)
    g = train.step_generator(0, 5, "cpu")  # replay the draws of `loss`
    idx = torch.randint(len(stage.lat_mean), (3,), generator=g)
    eps0 = torch.randn(stage.lat_mean[idx].shape, generator=g)
    z0 = (stage.lat_mean[idx] + stage.lat_std[idx] * eps0) * stage.scale
    torch.randint(1, len(train.MOTION_OPTIONS), (3,), generator=g)  # motion option
    torch.rand(3, generator=g)  # with a motion phrase or not
    torch.rand(3, generator=g)  # caption dropout
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    assert torch.equal(t, seen["t"])
    sched = DDPMScheduler(**models.schedule("v_prediction", True))
    assert float(sched.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(seen["x"], sched.add_noise(z0, noise, t))
    expected = torch.nn.functional.mse_loss(seen["out"], sched.get_velocity(z0, noise, t))
    torch.testing.assert_close(loss, expected)
    assert train.main(["export", *common]) == 0
    exported = DDIMScheduler.from_pretrained(tmp_path / "assets" / "shapes-sd", subfolder="scheduler").config
    assert (exported.prediction_type, exported.rescale_betas_zero_snr, exported.timestep_spacing) == (
        "v_prediction", True, "trailing")

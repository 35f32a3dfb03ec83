"""Structure conditions (DESIGN §1.12) against independent references: the 2D UNet + ControlNet frame by frame,
OpenCV called directly, closed-form edge values, the naive per-window loop, the uncontrolled run bit for bit."""
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ei2 import Recipe, VideoUNet
from ei2.errors import ConfigError, ModelError
from ei2.structure import maps as M
from ei2.structure.controlnet import StructureControl, check_fits

torch.set_num_threads(1)


def tiny_unet(seed=0, cross=16):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=cross, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_controlnet(unet, seed=5):
    """ControlNet.from_unet, with its zero convolutions made non-zero (else every residual is 0 and a test of
    where residuals go could not fail)."""
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name \
                    or "conv_out" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def parts():
    unet = tiny_unet()
    return unet, tiny_controlnet(unet)


def inputs(f=4, b=2, h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, f, h, w, generator=g)
    text = torch.randn(b, 7, 16, generator=g)
    maps = torch.rand(f, 3, 2 * h, 2 * w, generator=g)  # the condition embedding halves once
    return x, text, maps


def test_controlled_video_unet_equals_2d_unet_plus_controlnet_frame_by_frame(parts):
    unet, net = parts
    vu = VideoUNet.from_2d(unet, Recipe("self+stam", frame_attention="self", temporal="stam", group_norm="frame"))
    x, text, maps = inputs()
    control = StructureControl.make([net], [maps], 0.7)
    with torch.no_grad():
        got = vu(x, 10, text, control=control).sample
        plain = vu(x, 10, text).sample
        want = torch.empty_like(got)
        for b in range(x.shape[0]):
            for i in range(x.shape[2]):
                d, m = net(x[b:b + 1, :, i], 10, text[b:b + 1], controlnet_cond=maps[i:i + 1], conditioning_scale=0.7,
                           return_dict=False)
                want[b, :, i] = unet(x[b:b + 1, :, i], 10, text[b:b + 1], down_block_additional_residuals=d,
                                     mid_block_additional_residual=m).sample[0]
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-2  # the condition changes the output (the test can fail)


def test_residuals_given_directly_equal_the_control(parts):
    unet, net = parts
    vu = VideoUNet.from_2d(unet, "ei2")
    x, text, maps = inputs()
    control = StructureControl.make([net], [maps], 1.0)
    with torch.no_grad():
        folded = x.transpose(1, 2).reshape(-1, 4, *x.shape[3:])
        d, m = net(folded, 10, text.repeat_interleave(x.shape[2], 0), controlnet_cond=maps.repeat(2, 1, 1, 1),
                   return_dict=False)
        a = vu(x, 10, text, down_block_additional_residuals=d, mid_block_additional_residual=m).sample
        b = vu(x, 10, text, control=control).sample
    assert torch.equal(a, b)


def test_scale_zero_and_outside_the_window_is_the_uncontrolled_unet_bit_for_bit(parts):
    unet, net = parts
    vu = VideoUNet.from_2d(unet, "ei2")
    x, text, maps = inputs()
    with torch.no_grad():
        plain = vu(x, 10, text).sample
        zero = vu(x, 10, text, control=StructureControl.make([net], [maps], 0.0)).sample
        windowed = StructureControl.make([net], [maps], 1.0, control_guidance_start=0.5, control_guidance_end=1.0).for_steps([901, 601, 301, 1])
        early = vu(x, 901, text, control=windowed).sample
        late = vu(x, 301, text, control=windowed).sample
        late_always = vu(x, 301, text, control=StructureControl.make([net], [maps], 1.0)).sample
        early_plain = vu(x, 901, text).sample
    assert torch.equal(plain, zero)
    assert torch.equal(early, early_plain)  # step 0 of 4 is before the window
    assert torch.equal(late, late_always)  # step 2 of 4 is inside it


def test_two_nets_add_their_residuals(parts):
    unet, net = parts
    net2 = tiny_controlnet(unet, seed=9)
    vu = VideoUNet.from_2d(unet, Recipe("self", frame_attention="self", temporal="none", group_norm="frame"))
    x, text, maps = inputs()
    maps2 = maps.flip(-1)
    both = StructureControl.make([net, net2], [maps, maps2], [0.5, 1.5])
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    multi = StructureControl.make(MultiControlNetModel([net, net2]), [maps, maps2], [0.5, 1.5])
    with torch.no_grad():
        folded = x.transpose(1, 2).reshape(-1, 4, *x.shape[3:])
        t2 = text.repeat_interleave(x.shape[2], 0)
        d1, m1 = net(folded, 10, t2, controlnet_cond=maps.repeat(2, 1, 1, 1), conditioning_scale=0.5, return_dict=False)
        d2, m2 = net2(folded, 10, t2, controlnet_cond=maps2.repeat(2, 1, 1, 1), conditioning_scale=1.5, return_dict=False)
        want = vu(x, 10, text, down_block_additional_residuals=[a + b for a, b in zip(d1, d2)],
                  mid_block_additional_residual=m1 + m2).sample
        got = vu(x, 10, text, control=both).sample
        got_multi = vu(x, 10, text, control=multi).sample
    assert (got - want).abs().max() <= 1e-6 and torch.equal(got, got_multi)


def test_guess_mode_under_guidance_equals_diffusers_recipe_frame_by_frame(parts):
    """diffusers' guess mode: the ControlNet runs on the conditional half only (the unconditional half gets no
    residuals) and scales its residuals from 0.1 to 1; reference: the 2D UNet + ControlNet frame by frame."""
    from ei2.inversion import model_output

    unet, net = parts
    vu = VideoUNet.from_2d(unet, Recipe("self", frame_attention="self", temporal="none", group_norm="frame"))
    x, text, maps = inputs(b=1)
    uncond = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(4))
    control = StructureControl.make([net], [maps], 0.8, guess_mode=True)
    with torch.no_grad():
        got = model_output(vu, x, 10, text, uncond, 6.0, {"control": control})
        plain = model_output(vu, x, 10, text, uncond, 6.0, {"control": StructureControl.make([net], [maps], 0.8)})
        want = torch.empty_like(got)
        for i in range(x.shape[2]):
            frame = x[:, :, i]
            d, m = net(frame, 10, text, controlnet_cond=maps[i:i + 1], conditioning_scale=0.8, guess_mode=True,
                       return_dict=False)
            cond = unet(frame, 10, text, down_block_additional_residuals=d, mid_block_additional_residual=m).sample
            free = unet(frame, 10, uncond).sample  # no residuals at all
            want[:, :, i] = free + 6.0 * (cond - free)
    assert (got - want).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2  # guess mode is not the ordinary control (the test can fail)
    assert control.key() != StructureControl.make([net], [maps], 0.8).key()


def test_windowed_unet_with_a_condition_equals_the_naive_window_loop(parts):
    from ei2.windows import Windowing, WindowedUNet

    unet, net = parts
    vu = VideoUNet.from_2d(unet, Recipe("sc", frame_attention="sparse-causal", temporal="stam"))
    x, text, maps = inputs(f=6, b=1)
    control = StructureControl.make([net], [maps], 1.0)
    windowed = WindowedUNet(vu, Windowing(4, 2, anchors=0), 6)
    with torch.no_grad():
        got = windowed(x, 10, text, control=control).sample
        # naive: windows at 0 and 2; triangular weights min(j + 1, w - j), normalised per frame
        ramp = torch.tensor([1.0, 2.0, 2.0, 1.0])
        acc, norm = torch.zeros_like(got), torch.zeros(6)
        for s in (0, 2):
            out = vu(x[:, :, s:s + 4], 10, text, control=control.select_frames(slice(s, s + 4))).sample
            acc[:, :, s:s + 4] += out * ramp[None, None, :, None, None]
            norm[s:s + 4] += ramp
        want = acc / norm[None, None, :, None, None]
    assert (got - want).abs().max() <= 1e-5


# ---- maps ------------------------------------------------------------------------------------------
def test_canny_is_opencv_canny_of_each_frame():
    import cv2

    from conftest import moving_square

    frames = moving_square(3)
    got = M.canny(frames, 30, 90)
    for f, g in zip(frames, got):
        want = cv2.Canny(f, 30, 90)
        assert np.array_equal(g[..., 0], want) and np.array_equal(g[..., 1], want) and np.array_equal(g[..., 2], want)
    assert got.max() == 255  # there are edges


def test_softedge_closed_form_on_a_step_and_a_flat_frame():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[0, :, 16:] = 255  # a full-contrast vertical step: the unit of the map
    frames[1] = 77  # flat: no edge anywhere
    got = M.softedge(frames)
    assert got[0, 16, 15:17, 0].max() == 255  # the step's centre reads 1
    assert got[0, :, :8].max() == 0 and got[0, :, 26:].max() == 0  # far from the edge: 0
    assert got[1].max() == 0
    half = frames.copy()
    half[0, :, 16:] = 128  # half the contrast: half the value (fixed scale, no per-frame normalisation)
    assert abs(int(M.softedge(half)[0, 16, 15:17, 0].max()) - 128) <= 1


def test_layout_keeps_place_and_size_not_outline_nor_contrast():
    import cv2

    from ei2.shapes import world

    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[0, :, 32:] = 255  # one straight edge: the map reads 1/LAYOUT_UNIT of full scale along it
    frames[1] = 90  # flat: nothing anywhere
    got = M.layout(frames)
    assert abs(int(got[0, 32, 28:36, 0].max()) - round(255 / M.LAYOUT_UNIT)) <= 1
    assert got[1].max() == 0
    # the same as Canny's binary edges low-passed by an independent Gaussian (a kernel built here, separable)
    sigma = M.LAYOUT_FRACTION * 64
    r = int(4 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    edges = cv2.Canny(np.ascontiguousarray(frames[0]), M.CANNY_LOW, M.CANNY_HIGH).astype(np.float64) / 255
    pad = np.pad(edges, r, mode="reflect")
    blurred = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, pad)
    blurred = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 0, blurred)
    unit = M.LAYOUT_UNIT * k.max()  # a 1-px line low-passed across: the kernel's peak
    expected = np.clip(np.rint(blurred / unit * 255), 0, 255)
    assert np.abs(expected - got[0, ..., 0]).max() <= 2

    def scene(shape, cx, background):
        return world.render(world.Scenes(color=np.array([0]), shape=np.array([world.SHAPES.index(shape)]),
                                         background=np.array([background]), cx=np.array([cx]), cy=np.array([32.0]),
                                         size=np.array([11.0])))

    circle, square = M.layout(scene("circle", 32.0, 0)), M.layout(scene("square", 32.0, 0))
    moved = M.layout(scene("circle", 42.0, 0))
    other_background = M.layout(scene("circle", 32.0, 2))
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    print(f"mean |difference|: circle-square {diff(circle, square):.2f}, moved 10 px {diff(circle, moved):.2f}, "
          f"other background {diff(circle, other_background):.2f}")
    assert diff(circle, square) < 0.5 * diff(circle, moved)  # where and how big, not the outline
    assert diff(circle, other_background) < 0.1 * diff(circle, moved)  # binary edges: contrast does not count


def test_depth_calls_the_estimator_and_normalises_over_the_video():
    calls = []

    def estimator(image):
        a = np.asarray(image, dtype=np.float32)
        calls.append(a.shape)
        return {"predicted_depth": torch.from_numpy(a[..., 0].copy())}  # "depth" = red channel

    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[0, ..., 0] = 10
    frames[1, ..., 0] = 110
    frames[1, 0, 0, 0] = 210
    got = M.depth(frames, estimator)
    assert len(calls) == 2
    assert got[0, 1, 1, 0] == 0 and got[1, 0, 0, 0] == 255 and got[1, 1, 1, 0] == round(100 / 200 * 255)


def test_depth_without_a_model_and_unknown_kinds_are_clear_errors(tmp_path):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ConfigError, match="depth model"):
        M.compute("depth", frames)
    with pytest.raises(ModelError, match="depth model"):
        M.compute("depth", frames, depth_model=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="unknown condition kind"):
        M.compute("sketch", frames)


def test_user_maps_from_a_folder_are_resized_to_the_frames(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    got = M.user_maps(tmp_path, 3, (8, 8))
    assert got.shape == (3, 8, 8, 3) and got[2].mean() == 80
    with pytest.raises(ConfigError, match="maps"):
        M.user_maps(tmp_path, 5, (8, 8))
    with pytest.raises(ConfigError, match="do not exist"):
        M.user_maps(tmp_path / "missing", 3, (8, 8))


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_controls_are_refused(parts):
    unet, net = parts
    _, _, maps = inputs()
    with pytest.raises(ConfigError, match="one set of maps per ControlNet"):
        StructureControl.make([net, net], [maps], 1.0)
    with pytest.raises(ConfigError, match="one conditioning scale"):
        StructureControl.make([net], [maps], [1.0, 2.0])
    for bad in (-0.1, float("nan"), float("inf"), 11):
        with pytest.raises(ConfigError, match="scale"):
            StructureControl.make([net], [maps], bad)
    with pytest.raises(ConfigError, match="below"):
        StructureControl.make([net], [maps], 1.0, control_guidance_start=0.6, control_guidance_end=0.4)
    control = StructureControl.make([net], [maps], 1.0)
    with pytest.raises(ConfigError, match="4 control maps for 5 frames"):
        control.check_frames(5, 16, 12)
    with pytest.raises(ConfigError, match="make them the frames' size"):
        control.check_frames(4, 32, 12)
    other = tiny_unet(cross=24)
    with pytest.raises(ModelError, match="cross_attention_dim"):
        check_fits(ControlNetModel.from_unet(other), unet.config)
    check_fits(net, unet.config)  # its own base fits


# ---- the pipeline and the command line ------------------------------------------------------------------
def _pipe_and_control(model, scale=1.0, frames=None):
    from conftest import moving_square

    from ei2.pipeline import EI2Pipeline
    from ei2.structure import build_control

    pipe = EI2Pipeline.from_pretrained(str(model), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    frames = moving_square(4, 32, 32) if frames is None else frames
    control, _ = build_control(frames, ["canny"], [str(model / "controlnet-canny")], [scale], 0.0, 1.0,
                               pipe.unet.unet.config)
    return pipe, frames, control


def test_scale_zero_edit_is_the_uncontrolled_edit_bit_for_bit(tiny_sd_control):
    pipe, frames, zero = _pipe_and_control(tiny_sd_control, 0.0)
    _, _, one = _pipe_and_control(tiny_sd_control, 1.0)
    kw = dict(num_inference_steps=4, guidance_scale=7.5)
    plain = pipe.edit(frames, "a red square", "a blue square", **kw).frames
    got = pipe.edit(frames, "a red square", "a blue square", control=zero, **kw).frames
    controlled = pipe.edit(frames, "a red square", "a blue square", control=one, **kw).frames
    assert np.array_equal(plain, got)
    assert not np.array_equal(plain, controlled)  # the net acts: this test can fail


def test_a_controlled_inversion_is_not_served_from_an_uncontrolled_cache_entry(tiny_sd_control):
    pipe, frames, control = _pipe_and_control(tiny_sd_control)
    latents = pipe.encode_frames(frames)
    plain = pipe.invert(latents=latents, prompt="a red square", num_inference_steps=4)
    assert pipe.is_inverted(latents, "a red square", 4)
    assert not pipe.is_inverted(latents, "a red square", 4, control)
    controlled = pipe.invert(latents=latents, prompt="a red square", num_inference_steps=4, control=control)
    assert not torch.equal(plain, controlled)
    assert pipe.is_inverted(latents, "a red square", 4, control)
    # another window is another model input: its own entry too
    late = StructureControl.make(list(control.nets), control.maps, 1.0, control_guidance_start=0.5)
    assert not pipe.is_inverted(latents, "a red square", 4, late)


def test_tuning_under_the_condition_learns_another_adapter_and_resume_checks_it(tiny_sd_control, tmp_path):
    from ei2.errors import TuningError

    pipe, frames, control = _pipe_and_control(tiny_sd_control)
    latents = pipe.encode_frames(frames)
    base = {n: p.detach().clone() for n, p in pipe.unet.trainable_parameters()}
    pipe.tune(latents=latents, source_prompt="a red square", steps=2, learning_rate=1e-3, control=control,
              checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    with_control = {n: p.detach().clone() for n, p in pipe.unet.trainable_parameters()}
    with torch.no_grad():
        for n, p in pipe.unet.trainable_parameters():
            p.copy_(base[n])
    pipe.tune(latents=latents, source_prompt="a red square", steps=2, learning_rate=1e-3)
    without = dict(pipe.unet.trainable_parameters())
    assert any(not torch.equal(with_control[n], without[n]) for n in base)
    with pytest.raises(TuningError, match="structure condition"):  # a checkpoint of another condition
        pipe.tune(latents=latents, source_prompt="a red square", steps=3, learning_rate=1e-3,
                  checkpoint_dir=tmp_path / "ck", resume=True)


def _edit(tiny_sd_control, source_video, out, *extra):
    from ei2.cli import main

    return main(["edit", str(source_video), "--model", str(tiny_sd_control), "--source-prompt", "a red square",
                 "--target-prompt", "a red circle", "--frames", "4", "--steps", "1", "--inference-steps", "2",
                 "--device", "cpu", "--quiet", "--out", str(out), *extra])


def test_edit_with_a_bundled_condition_writes_its_maps_and_shows_them_in_the_grid(tiny_sd_control, source_video,
                                                                                  tmp_path, monkeypatch):
    import json

    import cv2

    from ei2.video import read_video

    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    assert _edit(tiny_sd_control, source_video, tmp_path / "run", "--control", "canny", "--control-scale", "0.8",
                 "--control-end", "0.5") == 0
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["control"]["scales"] == [0.8] and record["control"]["end"] == 0.5
    assert record["control"]["inversion"] is True and record["control"]["maps"] == ["control/01-canny.mp4"]
    src = read_video(source_video, 4, 1, 0, (32, 32)).frames
    maps = read_video(tmp_path / "run" / "control" / "01-canny.mp4", None, 1, 0, None).frames
    want = np.stack([cv2.Canny(f, 50, 100) for f in src])
    assert maps.shape == (4, 32, 32, 3)
    assert np.abs(maps[..., 0].astype(int) - want).mean() < 20  # the saved video is the Canny maps (mp4-coded)
    grid = read_video(tmp_path / "run" / "grid.mp4", None, 1, 0, None).frames
    plain = tmp_path / "plain"
    assert _edit(tiny_sd_control, source_video, plain) == 0
    wide = read_video(plain / "grid.mp4", None, 1, 0, None).frames
    assert grid.shape[2] > wide.shape[2]  # one more tile: the maps


@pytest.mark.parametrize("extra, words", [
    (["--control", "sketch"], "neither a condition kind"),
    (["--control", "canny", "--controlnet", "A", "--controlnet", "B"], "one --controlnet per --control"),
    (["--control", "canny", "--control-scale", "-1"], "--control-scale"),
    (["--control", "canny", "--control-scale", "nan"], "--control-scale"),
    (["--control", "canny", "--control-scale", "1", "--control-scale", "2"], "one per --control"),
    (["--control", "canny", "--control-start", "0.8", "--control-end", "0.2"], "below"),
    (["--control", "canny", "--control-end", "1.5"], "in [0, 1]"),
    (["--control", "depth", "--controlnet", "X"], "--depth-model"),
    (["--control", "softedge"], "bundles no ControlNet for --control 'softedge'"),
    (["--controlnet", "X"], "need --control"),
    (["--control", "canny", "--controlnet", "/no/such/net"], "cannot load the ControlNet"),
])
def test_bad_condition_options_are_one_error_and_nothing_written(extra, words, tiny_sd_control, source_video,
                                                                 tmp_path, capsys):
    assert _edit(tiny_sd_control, source_video, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not any(tmp_path.glob("run*"))


def test_a_controlnet_of_another_base_model_and_too_few_maps_are_refused(tiny_sd_control, source_video, tmp_path,
                                                                         capsys):
    from PIL import Image

    other = tmp_path / "other-net"
    ControlNetModel.from_unet(tiny_unet(cross=24), conditioning_embedding_out_channels=(8, 16)).save_pretrained(other)
    assert _edit(tiny_sd_control, source_video, tmp_path / "a", "--control", "canny", "--controlnet", str(other)) == 2
    err = capsys.readouterr().err
    assert "made for another base model" in err and "Traceback" not in err, err
    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(2):  # 2 maps for 4 frames
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(maps / f"{i}.png")
    net = tiny_sd_control / "controlnet-canny"
    assert _edit(tiny_sd_control, source_video, tmp_path / "b", "--control", str(maps), "--controlnet", str(net)) == 2
    err = capsys.readouterr().err
    assert "control maps" in err and "Traceback" not in err, err
    assert not any(tmp_path.glob("a*")) and not any(tmp_path.glob("b*"))


def test_model_defaults_for_controlled_edits_and_a_default_condition(tiny_sd_control, tmp_path):
    import json
    import shutil

    from ei2 import config as cfg
    from ei2.cli import build_parser

    model = tmp_path / "model"
    shutil.copytree(tiny_sd_control, model)

    def settings(defaults, *flags):
        (model / "ei2_defaults.json").write_text(json.dumps({"controlnets": {"canny": "controlnet-canny"}, **defaults}))
        s = cfg.resolve(cfg.EDIT, build_parser().parse_args(["edit", "v.mp4", *flags]), None)
        cfg.apply_model_defaults(s, model, cfg.EDIT)
        return s

    calibrated = {"strength": 0.6, "inject_features": 0.5, "controlled": {"strength": 1.0, "inject_features": 0.0}}
    plain, controlled = settings(calibrated), settings(calibrated, "--control", "canny")
    assert (plain.strength, plain.inject_features, plain.control) == (0.6, 0.5, [])
    assert (controlled.strength, controlled.inject_features) == (1.0, 0.0)
    assert settings(calibrated, "--control", "canny", "--strength", "0.7").strength == 0.7  # a flag wins
    assert settings(calibrated, "--control", "canny", "--p2p", "replace").strength == 1.0  # P2P's own rule
    # a model may make a condition its default: every edit takes it, `--control none` turns it off
    default = {**calibrated, "control": "canny"}
    assert settings(default).control == ["canny"] and settings(default).strength == 1.0
    off = settings(default, "--control", "none")
    assert not cfg.controlled(off) and off.strength == 0.6
    assert cfg.bundled_controlnets(model) == {"canny": str(model / "controlnet-canny")}

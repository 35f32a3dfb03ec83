"""The `ei2` command end to end on a tiny pipeline, and one clear error (exit 2, no run folder) per bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from ei2.cli import main

FAST = ["--frames", "4", "--steps", "2", "--inference-steps", "3", "--quiet"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # conftest: own cwd and cache, no hub


def edit_args(tiny_sd, source_video, out, *extra):
    return ["edit", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square",
            "--target-prompt", "a blue square", "--out", str(out), *FAST, *extra]


def test_edit_writes_a_whole_run_folder_then_reuses_its_adapter(tiny_sd, source_video, tmp_path):
    out = tmp_path / "run"
    assert main(edit_args(tiny_sd, source_video, out, "--target-prompt", "a green circle")) == 0
    for name in ["edits/01-a-blue-square.mp4", "edits/01-a-blue-square.gif", "edits/02-a-green-circle.mp4",
                 "edits/02-a-green-circle.gif", "grid.mp4", "grid.gif", "source.mp4", "adapter/adapter.safetensors",
                 "adapter/adapter.json", "run.json"]:
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists() and not (tmp_path / "run.partial").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["frames"] == 4 and run["settings"]["recipe"] == "ei2" and run["settings"]["width"] == 32
    assert run["seeds"]["seed"] == 0 and "torch" in run["versions"] and "diffusers" in run["versions"]
    assert {"load_s", "tune_s", "tune_step_s", "invert_s", "edit_s", "total_s"} <= set(run["timings"])
    assert len(run["tuning"]["losses"]) == 2 and run["inversion"]["cached"] is False
    from ei2.video import read_video

    source = read_video(out / "source.gif").frames
    blue, green = (read_video(out / f"edits/{name}.gif").frames for name in ("01-a-blue-square", "02-a-green-circle"))
    assert blue.shape == green.shape == source.shape == (4, 32, 32, 3)
    assert (blue != source).any() and (blue != green).any()  # each prompt its own edit, not a copy of the source
    grid = read_video(out / "grid.gif").frames
    assert grid.shape[0] == 4 and grid.shape[2] >= 3 * 32  # source and both edits side by side

    again = tmp_path / "again"
    assert main(["edit", str(source_video), "--model", str(tiny_sd), "--adapter", str(out / "adapter"),
                 "--source-prompt", "a red square", "--target-prompt", "a pink square", "--out", str(again),
                 *FAST]) == 0
    run2 = json.loads((again / "run.json").read_text())
    assert "tuning" not in run2 and run2["adapter"]["reused"] is True
    assert run2["adapter"]["hash"] == run["adapter"]["hash"]
    assert run2["inversion"]["cached"] is True  # same video, adapter and steps: inverted once
    assert (again / "edits/01-a-pink-square.mp4").is_file() and not (again / "adapter").exists()


def test_tune_then_edit_with_the_adapter(tiny_sd, source_video, tmp_path):
    adapter = tmp_path / "adapters" / "square"
    assert main(["tune", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square",
                 "--out", str(adapter), "--recipe", "tune-a-video", *FAST[:4], "--quiet"]) == 0
    assert (adapter / "adapter/adapter.safetensors").is_file() and (adapter / "run.json").is_file()
    # the recipe comes from the adapter
    assert main(["edit", str(source_video), "--model", str(tiny_sd), "--adapter", str(adapter), "--source-prompt",
                 "a red square", "--target-prompt", "a blue square", "--out", "e", *FAST]) == 0
    assert json.loads((tmp_path / "e" / "run.json").read_text())["settings"]["recipe"] == "tune-a-video"


def test_interrupted_tuning_resumes_to_the_same_adapter(tiny_sd, source_video, tmp_path, monkeypatch):
    import ei2.pipeline

    base = ["tune", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square", "--frames", "2",
            "--steps", "4", "--checkpoint-every", "2", "--lr", "1e-3", "--quiet"]
    assert main([*base, "--out", "whole"]) == 0

    real_tune = ei2.pipeline.tune

    def interrupted(*args, **kwargs):
        def stop(step, loss):
            if step == 3:
                raise KeyboardInterrupt
        return real_tune(*args, **{**kwargs, "callback": stop})

    monkeypatch.setattr(ei2.pipeline, "tune", interrupted)
    assert main([*base, "--out", "cut"]) == 130
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial/checkpoints/step-000002").is_dir()
    monkeypatch.setattr(ei2.pipeline, "tune", real_tune)
    assert main([*base, "--out", "cut"]) == 2  # refuses to silently drop the checkpoints
    assert main([*base, "--out", "cut", "--resume"]) == 0
    run = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert run["tuning"]["resumed_from"] == 2
    a, b = (load_file(tmp_path / run / "adapter/adapter.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_yaml_config_and_flag_override(tiny_sd, source_video, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"video: {source_video}\nmodel: {tiny_sd}\nsource_prompt: a red square\n"
        "target-prompt: [a blue square]\nframes: 2\nsteps: 0\ninference_steps: 2\nguidance_scale: 3\nquiet: true\n"
        "out: from-yaml\n"
    )
    assert main(["edit", "--config", "run.yaml", "--frames", "3"]) == 0
    run = json.loads((tmp_path / "from-yaml" / "run.json").read_text())
    assert run["settings"]["frames"] == 3 and run["settings"]["guidance_scale"] == 3.0
    assert run["settings"]["steps"] == 0 and "tuning" not in run


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing video", "video not found"),
        ("corrupt video", "corrupt"),
        ("too few frames", "video has 8 frames; --frames 9 needs at least 9"),
        ("size not multiple of 8", "--width 30 is not a positive multiple of 8"),
        ("empty prompt", "--source-prompt is empty"),
        ("empty target prompt", "a --target-prompt is empty"),
        ("model without parts", "has no vae/, text_encoder/, tokenizer/, scheduler/"),
        ("hub id offline", "pass the local folder"),
        ("adapter of another recipe", "pass --recipe ei2"),
        # the whole line: what is wrong (same architecture, other weights: the same structure digest twice, \1)
        # and what to do
        ("adapter of another model", re.compile(
            r"ei2: error: adapter \S+/adapter/adapter was tuned on another base model \(its weights differ: "
            r"adapter base ([0-9a-f]{16}), this model \1\); use the --model it was made with, or tune again")),
        ("unknown yaml key", "unknown key 'frame' (did you mean 'frames'?)"),
        ("wrong yaml type", "'frames' must be an integer, got 'eight'"),
        ("nan loss", "lower --lr"),
        ("unknown recipe", "unknown --recipe 'ei3'"),
        ("strength out of range", "--strength must be in (0, 1]"),
        ("strength runs no step", "--strength 0.2 of 3 inference steps runs no step"),
        ("guidance rescale out of range", "--guidance-rescale must be in [0, 1]"),
    ],
)
def test_bad_input_one_message_exit_2_no_folder(case, message, tiny_sd, tiny_sd_v, source_video, tmp_path, capsys):
    out = tmp_path / "outputs" / "run"
    args = edit_args(tiny_sd, source_video, out)
    if case == "missing video":
        args[1] = str(tmp_path / "nope.mp4")
    elif case == "corrupt video":
        (tmp_path / "bad.mov").write_bytes(b"\x00\x01garbage" * 100)
        args[1] = str(tmp_path / "bad.mov")
    elif case == "too few frames":
        args += ["--frames", "9"]
    elif case == "size not multiple of 8":
        args += ["--width", "30"]
    elif case == "empty prompt":
        args[args.index("--source-prompt") + 1] = " "
    elif case == "empty target prompt":
        args += ["--target-prompt", ""]
    elif case == "model without parts":
        (tmp_path / "half" / "unet").mkdir(parents=True)
        args[args.index("--model") + 1] = str(tmp_path / "half")
    elif case == "hub id offline":
        args[args.index("--model") + 1] = "nobody/no-such-model"
    elif case.startswith("adapter of another"):
        adapter_model = tiny_sd if case.endswith("recipe") else tiny_sd_v
        assert main(["tune", str(source_video), "--model", str(adapter_model), "--source-prompt", "a red square",
                     "--frames", "2", "--steps", "0", "--out", str(tmp_path / "adapter"), "--quiet"]) == 0
        args += ["--adapter", str(tmp_path / "adapter")]
        if case.endswith("recipe"):
            args += ["--recipe", "tune-a-video"]
    elif case in ("unknown yaml key", "wrong yaml type"):
        (tmp_path / "bad.yaml").write_text("frame: 4\n" if case == "unknown yaml key" else "frames: eight\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
    elif case == "unknown recipe":
        args += ["--recipe", "ei3"]
    elif case == "nan loss":
        args += ["--lr", "1e30", "--steps", "4"]
    elif case == "strength out of range":
        args += ["--strength", "1.5"]
    elif case == "strength runs no step":
        args += ["--strength", "0.2"]
    elif case == "guidance rescale out of range":
        args += ["--guidance-rescale", "2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ei2: error: "), err
    if isinstance(message, re.Pattern):
        assert message.fullmatch(err[0]), err
    else:
        assert message in err[0], err
    assert not (tmp_path / "outputs").exists()


def test_strength_and_guidance_rescale_from_yaml_and_flags_reuse_one_inversion(tiny_sd, source_video, tmp_path):
    import numpy as np

    from ei2.video import read_video

    assert main(edit_args(tiny_sd, source_video, tmp_path / "full", "--inference-steps", "4")) == 0
    (tmp_path / "half.yaml").write_text("strength: 0.5\nguidance_rescale_std: frame\n")
    assert main(["edit", str(source_video), "--model", str(tiny_sd), "--adapter", str(tmp_path / "full"),
                 "--source-prompt", "a red square", "--target-prompt", "a blue square", "--out", "half",
                 "--config", "half.yaml", "--guidance-rescale", "0.7", *FAST, "--inference-steps", "4"]) == 0
    full = json.loads((tmp_path / "full" / "run.json").read_text())
    half = json.loads((tmp_path / "half" / "run.json").read_text())
    assert full["inversion"]["strength"] == 1.0 and full["inversion"]["sampled_steps"] == 4
    assert half["inversion"]["strength"] == 0.5 and half["inversion"]["sampled_steps"] == 2
    assert half["inversion"]["cached"] is True  # the trajectory of the first run serves strength 0.5 too
    assert (half["settings"]["guidance_rescale"], half["settings"]["guidance_rescale_std"]) == (0.7, "frame")
    a = read_video(tmp_path / "full" / "edits/01-a-blue-square.gif").frames
    b = read_video(tmp_path / "half" / "edits/01-a-blue-square.gif").frames
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_existing_run_folder_is_kept_without_overwrite(tiny_sd, source_video, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(edit_args(tiny_sd, source_video, out)) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(edit_args(tiny_sd, source_video, out, "--steps", "0", "--overwrite")) == 0
    assert not (out / "mine.txt").exists() and (out / "run.json").is_file()


# The `ei2 edit` flags the README documents, each with a value and the setting it must give (written here, not read
# from the parser, whose flags are made from the same table as the settings).
DOCUMENTED_EDIT_FLAGS = [
    (["--source-prompt", "a cat"], "source_prompt", "a cat"),
    (["--target-prompt", "a dog", "--target-prompt", "a fox"], "target_prompt", ["a dog", "a fox"]),
    (["--model", "some/model"], "model", "some/model"),
    (["--recipe", "tune-a-video"], "recipe", "tune-a-video"),
    (["--adapter", "adapters/ski"], "adapter", "adapters/ski"),
    (["--frames", "12"], "frames", 12),
    (["--frames", "all"], "frames", "all"),
    (["--window", "6"], "window", 6),
    (["--anchor-frames", "2"], "anchor_frames", 2),
    (["--stride", "2"], "stride", 2),
    (["--start", "3"], "start", 3),
    (["--width", "64"], "width", 64),
    (["--height", "48"], "height", 48),
    (["--steps", "7"], "steps", 7),
    (["--lr", "1e-4"], "lr", 1e-4),
    (["--checkpoint-every", "5"], "checkpoint_every", 5),
    (["--resume"], "resume", True),
    (["--no-gradient-checkpointing"], "gradient_checkpointing", False),
    (["--inference-steps", "9"], "inference_steps", 9),
    (["--guidance-scale", "7.5"], "guidance_scale", 7.5),
    (["--negative-prompt", "blurry"], "negative_prompt", "blurry"),
    (["--strength", "0.6"], "strength", 0.6),
    (["--guidance-rescale", "0.7"], "guidance_rescale", 0.7),
    (["--guidance-rescale-std", "frame"], "guidance_rescale_std", "frame"),
    (["--noise-regularization"], "noise_regularization", True),
    (["--inject-features", "0.3"], "inject_features", 0.3),
    (["--inject-attention", "0.5"], "inject_attention", 0.5),
    (["--inject-block", "2"], "inject_block", 2),
    (["--p2p", "replace"], "p2p", "replace"),
    (["--cross-replace", "0.8", "man=0.5"], "cross_replace", ["0.8", "man=0.5"]),
    (["--self-replace", "0.5"], "self_replace", 0.5),
    (["--blend-words", "man", "panda"], "blend_words", ["man", "panda"]),
    (["--reweight", "watercolor=4"], "reweight", ["watercolor=4"]),
    (["--null-text"], "null_text", True),
    (["--control", "canny", "--control", "maps/"], "control", ["canny", "maps/"]),
    (["--controlnet", "a/net", "--controlnet", "b/net"], "controlnet", ["a/net", "b/net"]),
    (["--control-scale", "0.5", "--control-scale", "1.5"], "control_scale", ["0.5", "1.5"]),
    (["--control-start", "0.2"], "control_start", 0.2),
    (["--control-end", "0.7"], "control_end", 0.7),
    (["--no-control-inversion"], "control_inversion", False),
    (["--no-control-tuning"], "control_tuning", False),
    (["--guess-mode"], "guess_mode", True),
    (["--canny-low", "30"], "canny_low", 30),
    (["--canny-high", "150"], "canny_high", 150),
    (["--depth-model", "dpt"], "depth_model", "dpt"),
    (["--save-attention", "panda"], "save_attention", "panda"),
    (["--seed", "3"], "seed", 3),
    (["--device", "cpu"], "device", "cpu"),
    (["--dtype", "fp16"], "dtype", "fp16"),
    (["--out", "runs/a"], "out", "runs/a"),
    (["--overwrite"], "overwrite", True),
    (["--quiet"], "quiet", True),
]
UNDOCUMENTED_EDIT_FLAGS = {"--help", "--config", "--fps", "--blend-threshold", "--gradient-checkpointing",
                           "--control-inversion", "--control-tuning"}  # on by default; their --no- forms are documented


def test_every_documented_edit_flag_is_in_the_help_and_gives_its_setting():
    from pathlib import Path

    from ei2 import config as cfg
    from ei2.cli import build_parser

    done = subprocess.run([sys.executable, "-m", "ei2", "edit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: ei2 edit"), done.stderr[-2000:]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    helped = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))
    documented = {argv[0] for argv, _, _ in DOCUMENTED_EDIT_FLAGS}
    for argv, name, value in DOCUMENTED_EDIT_FLAGS:
        flag = argv[0]
        assert flag in readme, f"{flag} is not in the README"
        assert flag in helped, f"{flag} is not in `ei2 edit --help`"
        s = cfg.resolve(cfg.EDIT, build_parser().parse_args(["edit", "video.mp4", *argv]), None)
        assert getattr(s, name) == value and name in s.explicit, (argv, getattr(s, name))
        default = cfg.Settings()
        assert getattr(default, name) != value, f"{argv}: pick a value other than the default"
    # and no flag of the help is left out of both lists: a new flag gets a README line and a row above
    assert helped - documented - UNDOCUMENTED_EDIT_FLAGS == set()


def test_model_defaults_replace_generic_defaults_only(tiny_sd, source_video, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    (model / "ei2_defaults.json").write_text(json.dumps({"steps": 1, "inference_steps": 2, "frames": 2}))
    base = ["edit", str(source_video), "--model", str(model), "--source-prompt", "a red square", "--target-prompt",
            "a blue square", "--quiet"]
    assert main([*base, "--out", "a"]) == 0
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (run["settings"]["steps"], run["settings"]["inference_steps"], run["settings"]["frames"]) == (1, 2, 2)
    assert run["model_defaults"] == {"steps": 1, "inference_steps": 2, "frames": 2}
    assert main([*base, "--out", "b", "--steps", "0"]) == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["settings"]["steps"] == 0


def test_the_job_reports_every_bar_under_its_stage_through_the_pipeline_callback(tiny_sd, source_video, tmp_path,
                                                                                  monkeypatch):
    """Issue 17: `runs` routes the pipeline's bars through `EI2Pipeline.set_progress_callback` (it used to replace
    the pipeline's private `_bar`); the sampling bar of each edit reports as "edit I/N", and the job removes its
    callback when it ends."""
    from ei2 import config as cfg
    from ei2 import runs
    from ei2.cli import build_parser
    from ei2.pipeline import EI2Pipeline

    argv = edit_args(tiny_sd, source_video, tmp_path / "run", "--steps", "0", "--target-prompt", "a green circle")
    s = cfg.resolve(cfg.EDIT, build_parser().parse_args(argv), None)
    runs.validate(s, cfg.EDIT)
    callbacks = []
    original = EI2Pipeline.set_progress_callback
    monkeypatch.setattr(EI2Pipeline, "set_progress_callback",
                        lambda pipe, fn: (callbacks.append(fn), original(pipe, fn))[1])
    events = []
    runs.edit(s, argv, progress=lambda stage, step, total: events.append((stage, step, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in events))
    assert stages == ["load", "inversion", "edit 1/2", "edit 2/2", "write"], stages
    for stage in ("inversion", "edit 1/2", "edit 2/2"):  # the bar's own steps, between the job's 0/3 and 3/3
        steps = [step for name, step, total in events if name == stage and total == 3]
        assert steps == [0, 0, 1, 2, 3, 3], (stage, steps)
    assert len(callbacks) == 2 and callbacks[0] is not None and callbacks[1] is None

"""Never lose a user's work (issue 27): one run per folder, resume that keeps what it refuses, checked adapters,
checkpoints and cache entries, numbers refused at the settings' home, file-system failures as one line, umask.

Each test goes through the real `ei2` command (in process, or as a second process where two runs meet).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from ei2.cli import main
from ei2.video import read_video

TUNING = ["--frames", "4", "--steps", "4", "--checkpoint-every", "2", "--lr", "1e-3", "--quiet"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # conftest: own cwd and cache, no hub


def tune_args(tiny_sd, source_video, out, *extra):
    return ["tune", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square", "--out", str(out),
            *TUNING, *extra]


def edit_args(tiny_sd, source_video, out, *extra):
    return ["edit", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square",
            "--target-prompt", "a blue square", "--out", str(out), *TUNING, "--inference-steps", "3", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes: a folder left "byte for byte" compares equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_tuning_at(monkeypatch, step: int):
    """Make the next tuning stop with Ctrl-C after `step` (its checkpoint of step-1 written)."""
    import ei2.pipeline

    real_tune = ei2.pipeline.tune

    def interrupted(*args, **kwargs):
        def stop(at, loss):
            if at == step:
                raise KeyboardInterrupt
        return real_tune(*args, **{**kwargs, "callback": stop})

    monkeypatch.setattr(ei2.pipeline, "tune", interrupted)
    return real_tune


def frames_of(path: Path) -> np.ndarray:
    return read_video(path).frames


# ---------------------------------------------------------------------------------------------- resume
def test_every_refused_resume_leaves_the_partial_folder_byte_for_byte(tiny_sd, source_video, tmp_path, monkeypatch,
                                                                      capsys):
    import ei2.pipeline

    real_tune = interrupt_tuning_at(monkeypatch, 3)
    assert main(tune_args(tiny_sd, source_video, "cut")) == 130
    monkeypatch.setattr(ei2.pipeline, "tune", real_tune)
    partial = tmp_path / "cut.partial"
    before = snapshot(partial)
    assert any(name.startswith("checkpoints/step-000002/") for name in before)
    capsys.readouterr()

    refused = [
        (["--resume", "--source-prompt", "a red squares"], "another video and prompt"),  # one word changed
        (["--resume", "--lr", "3e-4"], "learning rate"),
        (["--resume", "--seed", "7"], "seed"),
        ([], "holds an interrupted run"),  # the plain rerun
    ]
    for extra, words in refused:
        assert main(tune_args(tiny_sd, source_video, "cut", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert snapshot(partial) == before, extra  # the advice printed can still be followed

    # a damaged checkpoint: refused, with the folder as it was
    weights = next(partial.glob("checkpoints/step-*/trainable.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = os.urandom(8)  # same size, same header: only the digest can tell
    weights.write_bytes(bytes(data))
    damaged = snapshot(partial)
    assert main(tune_args(tiny_sd, source_video, "cut", "--resume")) == 2
    assert "is damaged" in capsys.readouterr().err
    assert snapshot(partial) == damaged
    # and --overwrite starts over
    assert main(tune_args(tiny_sd, source_video, "cut", "--overwrite")) == 0
    assert (tmp_path / "cut/adapter/adapter.safetensors").is_file() and not partial.exists()


def test_resume_with_the_same_settings_gives_the_uninterrupted_adapter(tiny_sd, source_video, tmp_path, monkeypatch):
    import ei2.pipeline

    assert main(tune_args(tiny_sd, source_video, "whole")) == 0
    real_tune = interrupt_tuning_at(monkeypatch, 3)
    assert main(tune_args(tiny_sd, source_video, "cut")) == 130
    monkeypatch.setattr(ei2.pipeline, "tune", real_tune)
    assert main(tune_args(tiny_sd, source_video, "cut", "--resume")) == 0
    a, b = (load_file(tmp_path / run / "adapter/adapter.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((tmp_path / "cut/run.json").read_text())["tuning"]["resumed_from"] == 2


def test_an_edit_killed_after_tuning_resumes_without_tuning_again(tiny_sd, source_video, tmp_path, monkeypatch,
                                                                  capsys):
    import ei2.pipeline

    assert main(edit_args(tiny_sd, source_video, "whole")) == 0
    real_invert = ei2.pipeline.EI2Pipeline.invert

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ei2.pipeline.EI2Pipeline, "invert", killed)
    assert main(edit_args(tiny_sd, source_video, "cut")) == 130
    assert "tuned adapter kept in" in capsys.readouterr().err
    partial = tmp_path / "cut.partial"
    assert (partial / "adapter/adapter.safetensors").is_file()
    monkeypatch.setattr(ei2.pipeline.EI2Pipeline, "invert", real_invert)

    before = snapshot(partial)
    assert main(edit_args(tiny_sd, source_video, "cut")) == 2  # the plain rerun: says --resume, deletes nothing
    assert "--resume" in capsys.readouterr().err and snapshot(partial) == before
    assert main(edit_args(tiny_sd, source_video, "cut", "--resume", "--steps", "6")) == 2  # another tuning
    assert "tuning steps" in capsys.readouterr().err and snapshot(partial) == before

    def no_tuning(*args, **kwargs):
        raise AssertionError("the finished adapter must be reused, not tuned again")

    monkeypatch.setattr(ei2.pipeline, "tune", no_tuning)
    assert main(edit_args(tiny_sd, source_video, "cut", "--resume")) == 0
    whole, cut = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("whole", "cut"))
    assert cut["tuning"]["reloaded"] is True and cut["tuning"]["losses"] == whole["tuning"]["losses"]
    assert cut["adapter"]["hash"] == whole["adapter"]["hash"]
    assert np.array_equal(frames_of(tmp_path / "cut/edits/01-a-blue-square.gif"),
                          frames_of(tmp_path / "whole/edits/01-a-blue-square.gif"))
    assert not (tmp_path / "cut/.tuned.json").exists() and not (tmp_path / "cut/.pid").exists()


def test_resume_where_nothing_can_be_resumed_keeps_the_folder(tiny_sd, source_video, tmp_path, capsys):
    # what a run killed (SIGKILL: no cleanup) before its first checkpoint leaves behind
    partial = tmp_path / "early.partial"
    (partial / "control").mkdir(parents=True)
    (partial / "control/00-canny.mp4").write_bytes(b"maps")
    (partial / ".pid").write_text("999999\n")
    before = snapshot(partial)
    assert main(tune_args(tiny_sd, source_video, "early", "--resume")) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--overwrite" in err and snapshot(partial) == before
    assert main(tune_args(tiny_sd, source_video, "early")) == 2
    assert "holds an interrupted run" in capsys.readouterr().err and snapshot(partial) == before


def test_a_ctrl_c_before_anything_resumable_cleans_up_and_a_bare_lock_folder_is_free(tiny_sd, source_video, tmp_path,
                                                                                    monkeypatch):
    import ei2.pipeline

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    real = ei2.pipeline.tune
    monkeypatch.setattr(ei2.pipeline, "tune", killed)
    assert main(tune_args(tiny_sd, source_video, "a/b/early")) == 130
    assert not (tmp_path / "a").exists()  # nothing to resume: the folders this run made are gone
    monkeypatch.setattr(ei2.pipeline, "tune", real)
    (tmp_path / "bare.partial").mkdir()
    (tmp_path / "bare.partial/.pid").write_text("999999\n")  # killed while the model loaded
    assert main(tune_args(tiny_sd, source_video, "bare")) == 0


# ---------------------------------------------------------------------------------------------- one run per folder
def test_a_second_run_on_a_live_runs_folder_is_refused_and_the_first_completes(tiny_sd, source_video, tmp_path,
                                                                                capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "ei2", *edit_args(tiny_sd, source_video, tmp_path / "x",
                                                                      "--steps", "8")],
                             env=env, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "x.partial"
    deadline = time.time() + 120
    while not (partial / ".pid").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(edit_args(tiny_sd, source_video, tmp_path / "x", *extra)) == 2
        err = capsys.readouterr().err
        assert f"another ei2 run (PID {first.pid}) is writing" in err and "wait for it" in err, err
    assert first.wait(timeout=600) == 0, first.stderr.read()
    run = json.loads((tmp_path / "x/run.json").read_text())
    assert (tmp_path / "x" / run["outputs"]["adapter"] / "adapter.safetensors").is_file()
    assert not partial.exists()


def test_a_killed_runs_folder_is_free_at_once(tiny_sd, source_video, tmp_path, capsys):
    """The lock is the kernel's: SIGKILL releases it, and the folder is "interrupted", not "in use"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "ei2", *tune_args(tiny_sd, source_video, tmp_path / "k",
                                                                    "--steps", "500")], env=env)
    deadline = time.time() + 120
    while not list((tmp_path / "k.partial").glob("checkpoints/step-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert main(tune_args(tiny_sd, source_video, tmp_path / "k", "--steps", "500", "--resume")) == 2
    assert "another ei2 run" in capsys.readouterr().err  # alive: in use
    run.kill()
    run.wait()
    assert main(tune_args(tiny_sd, source_video, tmp_path / "k", "--steps", "500")) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted run; pass --resume" in err and "another ei2 run" not in err


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncate", "same-size"])
def test_a_damaged_adapter_is_one_clear_error(tiny_sd, source_video, tmp_path, capsys, damage):
    assert main(tune_args(tiny_sd, source_video, "ad")) == 0
    weights = tmp_path / "ad/adapter/adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-16] + os.urandom(16))
    capsys.readouterr()
    assert main([*edit_args(tiny_sd, source_video, "e"), "--adapter", str(tmp_path / "ad")]) == 2
    err = capsys.readouterr().err
    assert "adapter" in err and ("damaged" in err or "cannot be read" in err) and "Traceback" not in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_a_damaged_cache_entry_of_the_right_size_is_recomputed(tiny_sd, source_video, tmp_path, capsys):
    assert main(edit_args(tiny_sd, source_video, "one", "--steps", "0")) == 0
    entries = list((tmp_path / "cache/inversions").glob("*.safetensors"))
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[-64:] = np.random.default_rng(0).random(16, dtype=np.float32).tobytes()  # header kept
    entries[0].write_bytes(bytes(data))
    capsys.readouterr()
    assert main(edit_args(tiny_sd, source_video, "two", "--steps", "0")) == 0
    assert "is damaged" in capsys.readouterr().err
    two = json.loads((tmp_path / "two/run.json").read_text())
    assert two["inversion"]["cached"] is False
    assert np.array_equal(frames_of(tmp_path / "one/edits/01-a-blue-square.gif"),
                          frames_of(tmp_path / "two/edits/01-a-blue-square.gif"))


# ---------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_is_refused(tiny_sd, source_video, tmp_path, capsys, value):
    assert main(edit_args(tiny_sd, source_video, "g", f"--guidance-scale={value}")) == 2
    assert "--guidance-scale must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.partial").exists()


def test_non_finite_numbers_in_yaml_are_refused_the_same_way(tiny_sd, source_video, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(f"video: {source_video}\nmodel: {tiny_sd}\nsource_prompt: a red square\n"
                                       "target_prompt: [a blue square]\nstrength: .nan\n")
    assert main(["edit", "--config", "run.yaml"]) == 2
    assert "--strength must be a finite number" in capsys.readouterr().err


def test_absurd_guidance_and_steps_are_refused(tiny_sd, source_video, capsys):
    assert main(edit_args(tiny_sd, source_video, "g", "--guidance-scale", "1e9")) == 2
    assert "--guidance-scale must be between 0 and 100" in capsys.readouterr().err
    assert main(edit_args(tiny_sd, source_video, "g", "--inference-steps", "5000")) == 2
    assert "--inference-steps must be between 1 and 1000" in capsys.readouterr().err


def test_run_json_is_strict_json():
    from ei2.files import write_json

    with pytest.raises(ValueError):
        write_json("x.json", {"guidance": float("nan")})
    assert not Path("x.json").exists()


# ---------------------------------------------------------------------------------------------- file system
def test_an_unwritable_out_is_one_line_before_the_model_loads(tiny_sd, source_video, tmp_path, monkeypatch, capsys):
    import ei2.pipeline

    locked = tmp_path / "readonly"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # the OS call refuses, as it does for a folder the user cannot write
        if str(self).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load before the run folder can be made")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(ei2.pipeline.EI2Pipeline, "from_pretrained", no_load)
    assert main(edit_args(tiny_sd, source_video, locked / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("ei2: error: cannot write") and "Permission denied" in err and "--out" in err
    assert err.count("\n") == 1


def test_an_unwritable_cache_is_said_once_and_the_run_goes_on(tiny_sd, source_video, tmp_path, monkeypatch, capsys):
    import ei2.inversion

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ei2.inversion, "save_tensors", refuse)
    assert main(edit_args(tiny_sd, source_video, "c", "--target-prompt", "a green square")) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write the inversion cache") == 1 and "going on without it" in err
    assert (tmp_path / "c/adapter/adapter.safetensors").is_file()
    assert (tmp_path / "c/edits/02-a-green-square.gif").is_file()


def test_a_full_disk_after_tuning_keeps_the_adapter_for_resume(tiny_sd, source_video, tmp_path, monkeypatch, capsys):
    import ei2.video

    real = ei2.video.write_mp4

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(ei2.video, "write_mp4", full)
    assert main(edit_args(tiny_sd, source_video, "d")) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space" in err and "Traceback" not in err
    assert (tmp_path / "d.partial/adapter/adapter.safetensors").is_file()
    monkeypatch.setattr(ei2.video, "write_mp4", real)
    assert main(edit_args(tiny_sd, source_video, "d", "--resume")) == 0
    assert json.loads((tmp_path / "d/run.json").read_text())["tuning"]["reloaded"] is True


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_follow_the_umask(tiny_sd, source_video, tmp_path, mask):
    old = os.umask(mask)
    try:
        assert main(edit_args(tiny_sd, source_video, "m", "--steps", "0")) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert len(files) >= 6
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


# ---------------------------------------------------------------------------------------------- smaller ones
def test_a_prompt_too_long_for_the_text_encoder_is_said_and_recorded(tiny_sd, source_video, tmp_path, capsys):
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    limit = min(tokenizer.model_max_length,
                CLIPTextConfig.from_pretrained(tiny_sd, subfolder="text_encoder").max_position_embeddings)
    long = " ".join(["red"] * (limit + 5))
    over = len(tokenizer(long).input_ids) - limit  # the tokens past the limit, start and end tokens counted
    assert over > 0
    assert main([*edit_args(tiny_sd, source_video, "p", "--steps", "0"), "--target-prompt", long]) == 0
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "p/run.json").read_text())["prompts_truncated"] == {long: over}
    assert f"is {over} token(s) longer than the text encoder takes ({limit}" in err
    assert "a blue square" not in json.dumps(json.loads((tmp_path / "p/run.json").read_text())["prompts_truncated"])


def test_an_unknown_model_id_without_network_fails_at_once(monkeypatch):
    import socket

    from ei2.errors import ModelError
    from ei2.pipeline import EI2Pipeline

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    t = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        EI2Pipeline.from_pretrained("someone/not-a-model-here", device="cpu")
    assert time.perf_counter() - t < 10


def test_one_frame_is_said_in_the_singular(tiny_sd, source_video, capsys):
    assert main(["tune", str(source_video), "--model", str(tiny_sd), "--source-prompt", "a red square",
                 "--frames", "1", "--steps", "1", "--out", "one"]) == 0
    err = capsys.readouterr().err
    assert "on 1 frame of" in err and "1 frames" not in err

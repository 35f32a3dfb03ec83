"""A short fault suite (issue 27): a real `ei2 edit` killed with SIGKILL at random points, then continued as the
messages say (the plain rerun, `--resume` or `--overwrite`), always ends with a complete run equal to an
uninterrupted one, and nothing is ever written outside `--out`, its `.partial` and the cache."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from ei2.video import read_video

SEEDS = [0, 1, 2]


def _env(root: Path) -> dict:
    home = root / "home"
    for d in (home, root / "tmp"):
        d.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EI2_CACHE_DIR": str(root / "cache"),
            "HOME": str(home), "TMPDIR": str(root / "tmp"), "XDG_CACHE_HOME": str(home / ".cache")}


def _command(tiny_sd, source_video, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "ei2", "edit", str(source_video), "--model", str(tiny_sd),
            "--source-prompt", "a red square", "--target-prompt", "a blue square",
            "--frames", "4", "--steps", "6", "--checkpoint-every", "2", "--lr", "1e-3", "--inference-steps", "10",
            "--quiet", "--out", str(out), *extra]


def _wait_for_start(run: subprocess.Popen, out: Path) -> float:
    """Wait until the run holds its folder (it writes its PID there, then loads the model); the time then."""
    pid = out.with_name(out.name + ".partial") / ".pid"
    deadline = time.time() + 300
    while not pid.is_file() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert run.poll() is None
    return time.perf_counter()


def _outside(root: Path, out: Path) -> dict[str, int]:
    """Every file under `root` that is not the run's (`out`, `out.partial`) nor the cache: path -> size."""
    keep = (out, out.with_name(out.name + ".partial"), root / "cache")
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not any(p == k or k in p.parents for k in keep)}


def _result(run: Path) -> dict:
    record = json.loads((run / "run.json").read_text())
    return {
        "losses": record["tuning"]["losses"],
        "adapter": load_file(run / "adapter/adapter.safetensors"),
        "edits": [read_video(run / e["gif"]).frames for e in record["outputs"]["edits"]],
        "source": read_video(run / "source.gif").frames,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    assert a["adapter"].keys() == b["adapter"].keys()
    assert all(np.array_equal(a["adapter"][k].numpy(), b["adapter"][k].numpy()) for k in a["adapter"])
    assert len(a["edits"]) == len(b["edits"]) and all(np.array_equal(x, y) for x, y in zip(a["edits"], b["edits"]))
    assert np.array_equal(a["source"], b["source"])


def test_a_run_killed_anywhere_continues_to_the_uninterrupted_result(tiny_sd, source_video, tmp_path):
    reference_root = tmp_path / "reference"
    reference_root.mkdir()
    run = subprocess.Popen(_command(tiny_sd, source_video, reference_root / "run"), cwd=reference_root,
                           env=_env(reference_root))
    started = _wait_for_start(run, reference_root / "run")
    assert run.wait(timeout=600) == 0
    work = time.perf_counter() - started  # from the locked folder (the model loads next) to the finished run
    reference = _result(reference_root / "run")

    continued_with = []
    for seed in SEEDS:
        root = tmp_path / f"seed{seed}"
        root.mkdir()
        env, out = _env(root), root / "run"
        before = _outside(root, out)
        delay = random.Random(seed).uniform(0, work)  # anywhere: loading, tuning, inversion, edits, writing
        run = subprocess.Popen(_command(tiny_sd, source_video, out), cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_start(run, out)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        extra, steps = [], []
        for _ in range(3):  # do what the last message said
            if out.is_dir():
                break
            done = subprocess.run(_command(tiny_sd, source_video, out, *extra), cwd=root, env=env,
                                  capture_output=True, text=True, timeout=600)
            steps.append(extra[0] if extra else "rerun")
            if done.returncode == 0:
                break
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
            if "--resume" in done.stderr and "--resume" not in extra:
                extra = ["--resume"]
            elif "--overwrite" in done.stderr:
                extra = ["--overwrite"]
            else:
                pytest.fail(f"seed {seed}: no way on: {done.stderr}")
        assert out.is_dir(), (seed, delay, steps)
        assert not out.with_name("run.partial").exists()
        _assert_same(_result(out), reference)
        assert _outside(root, out) == before, seed  # nothing outside --out and the cache
        assert not any((root / "tmp").iterdir())
        continued_with.append((round(delay, 1), steps))
    print(f"work {work:.1f} s; killed at (s after the folder was locked) and continued with:", continued_with)

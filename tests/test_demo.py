"""The one-command demo: a correct edit of a bundled Shapes video, checked by the Shapes oracle."""
import json

import numpy as np
import pytest

from ei2.cli import main
from ei2.demo import samples_dir
from ei2.pipeline import default_model_path

pytestmark = pytest.mark.skipif(not (default_model_path() / "model_index.json").is_file(),
                                reason="the bundled Shapes model is not in this checkout")


def test_demo_edits_the_sample_into_a_blue_square_on_the_same_path(tmp_path, capsys):
    from ei2.shapes.oracle import read_frames
    from ei2.video import read_video

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "grid.gif" in printed
    run = json.loads((out / "run.json").read_text())
    edit = run["outputs"]["edits"][0]
    for name in (edit["mp4"], edit["gif"], "grid.gif", "grid.mp4", "adapter/adapter.safetensors"):
        assert (out / name).is_file(), name

    source = json.loads((samples_dir() / "index.json").read_text())["red_circle_right"]
    frames = read_video(out / edit["gif"]).frames
    assert frames.shape[0] == source["frames"]
    reading = read_frames(frames)
    colors, shapes = reading.color_names(), reading.shape_names()
    right = sum(c == "blue" and s == "square" for c, s in zip(colors, shapes))
    assert right >= 7, list(zip(colors, shapes))
    error = np.hypot(reading.cx - np.array(source["cx"]), reading.cy - np.array(source["cy"]))
    assert (error <= 4).all(), error.round(1)

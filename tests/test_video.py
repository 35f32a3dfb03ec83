"""Reading and writing videos: sampling, resize + centre-crop, formats, atomic writes, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ei2.errors import VideoError
from ei2.video import atomic_path, make_grid, read_video, resize_and_crop, write_gif, write_mp4, write_video


def numbered_frames(n=10, h=24, w=40):
    """Frame i is uniformly gray level 20 * i (exact through PNG, close through mp4/gif)."""
    return np.stack([np.full((h, w, 3), 20 * i, np.uint8) for i in range(n)])


def test_folder_sampling_start_stride_and_crop(tmp_path):
    write_video(numbered_frames(), tmp_path / "frames")
    video = read_video(tmp_path / "frames", num_frames=3, stride=2, start=1, size=(16, 16))
    assert video.frames.shape == (3, 16, 16, 3) and video.frames.dtype == np.uint8
    assert [int(f[0, 0, 0]) for f in video.frames] == [20, 60, 100]


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_then_read(tmp_path, suffix):
    frames = numbered_frames(6, 32, 48)
    path = write_mp4(frames, tmp_path / f"v{suffix}") if suffix == ".mp4" else write_gif(frames, tmp_path / f"v{suffix}")
    video = read_video(path, num_frames=6, size=(32, 48))
    assert video.frames.shape == (6, 32, 48, 3)
    assert np.abs(video.frames.astype(int) - frames.astype(int)).mean() < 6
    assert abs(video.fps - 8) < 0.5
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_resize_and_crop_covers_then_centres():
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red left quarter is cropped away
    out = resize_and_crop(image, (16, 16))
    assert out.size == (16, 16)
    assert np.asarray(out)[:, :, 0].max() < 64


def test_too_few_frames_message(tmp_path):
    write_mp4(numbered_frames(3), tmp_path / "short.mp4")
    with pytest.raises(VideoError, match=r"video has 3 frames; --frames 8 needs at least 8"):
        read_video(tmp_path / "short.mp4", num_frames=8)
    with pytest.raises(VideoError, match=r"video has 3 frames; --frames 2 --stride 3 needs at least 4"):
        read_video(tmp_path / "short.mp4", num_frames=2, stride=3)


def test_missing_corrupt_and_unsupported(tmp_path):
    with pytest.raises(VideoError, match="video not found"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    with pytest.raises(VideoError, match="corrupt"):
        read_video(tmp_path / "bad.mp4")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    with pytest.raises(VideoError, match="corrupt"):
        read_video(tmp_path / "bad.gif")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(VideoError, match="unsupported video type"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="holds no frames"):
        read_video(tmp_path / "empty")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_grid_places_videos_side_by_side_with_captions():
    a, b = numbered_frames(2, 16, 16), numbered_frames(2, 16, 16)[::-1].copy()
    grid = make_grid([a, b], ["source", "edit"], gap=2)
    assert grid.shape[0] == 2 and grid.shape[2] == 34 and grid.shape[1] > 16
    assert np.array_equal(grid[:, -16:, :16], a) and np.array_equal(grid[:, -16:, 18:], b)
    assert make_grid([a]).shape == a.shape

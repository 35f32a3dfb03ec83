"""Reading and writing videos: sampling, resize + centre-crop, formats, atomic writes, clear errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ei2.errors import VideoError
from ei2.files import atomic_path
from ei2.video import make_grid, read_video, resize_and_crop, write_gif, write_mp4, write_video


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
    grid = make_grid([a, b], ["source", "edit"], gap=2, min_tile=0)  # no scaling: the frames as they are
    assert grid.shape[0] == 2 and grid.shape[2] == 34 and grid.shape[1] > 16
    assert np.array_equal(grid[:, -16:, :16], a) and np.array_equal(grid[:, -16:, 18:], b)
    assert make_grid([a], min_tile=0).shape == a.shape


def caption_height(grid: np.ndarray, tile_h: int) -> int:
    return grid.shape[1] - tile_h


def ink_rows(grid: np.ndarray, tile_h: int) -> int:
    """Rows of the caption block from its first to its last row of text (dark pixels)."""
    strip = grid[0, : caption_height(grid, tile_h)]
    rows = np.nonzero((strip < 128).any(axis=(1, 2)))[0]
    return int(rows.max() - rows.min() + 1) if rows.size else 0


LONG = "source: a red circle moving right on a gray background while the camera slowly pans over it " * 3


def test_grid_scales_small_frames_up_nearest_and_keeps_captions_below_the_frame_height():
    """Issue 17 ("the app as a person uses it"): 64x64 frames were shown at 64x64 under a caption block taller
    than the video (up to 8 lines of an 11 px bitmap font)."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8) for _ in range(2))
    grid = make_grid([a, b], [LONG, "a blue square"])
    tile = 256  # 64 x 4: the smallest whole factor that reaches GRID_MIN_TILE
    assert grid.shape[2] == 2 * tile + max(2, tile // 64)
    assert np.array_equal(grid[:, -tile:, :tile], a.repeat(4, axis=1).repeat(4, axis=2))  # nearest neighbour
    assert np.array_equal(grid[:, -tile:, -tile:], b.repeat(4, axis=1).repeat(4, axis=2))
    assert 0 < caption_height(grid, tile) <= tile // 3, caption_height(grid, tile)
    assert ink_rows(grid, tile) >= 2 * 10  # two lines or more of a readable font, not a 6 px sliver


def test_grid_keeps_512_frames_as_they_are_and_sizes_the_font_to_the_tile():
    small = np.zeros((1, 64, 64, 3), np.uint8)
    large = np.zeros((1, 512, 512, 3), np.uint8)
    large[0, 100:200, 100:300] = 200
    grid = make_grid([large, large], ["source: a man is skiing", "a panda is skiing"])
    assert grid.shape[2] == 2 * 512 + 8 and np.array_equal(grid[:, -512:, :512], large)  # no scaling, no resampling
    assert 0 < caption_height(grid, 512) <= 512 // 3
    one_line = {64: ink_rows(make_grid([small], ["Skiing"]), 256), 512: ink_rows(make_grid([large], ["Skiing"]), 512)}
    assert 1.6 < one_line[512] / one_line[64] < 2.4, one_line  # a 512 tile's caption is twice a 256 tile's
    assert caption_height(make_grid([large], [LONG]), 512) <= 512 // 3


# ---------------------------------------------------------------------------------------------- cut-off videos
def noise_frames(n=30, h=32, w=32):
    """Noise: every frame is a large packet, so a cut lands inside a frame's data."""
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def streamable_copy(src, dst):
    """The same mp4 with its index first (`-movflags faststart`, as web videos are): a cut-off copy still opens."""
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def frame_packets(path):
    """(byte offset, size) of every frame's data, in file order."""
    import av

    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]


REMEDY = r"copy or download it again, or re-encode it \(ffmpeg -i "


@pytest.mark.parametrize("case", ["cut inside a frame", "cut between frames", "index at the end cut off", "gif cut"])
def test_a_video_that_breaks_off_mid_stream_gives_one_clear_error(tmp_path, case):
    """Issue 17, defect 6: a copy cut off mid-stream was read as a shorter video without a word."""
    frames = noise_frames()
    whole = write_mp4(frames, tmp_path / "whole.mp4")
    if case == "gif cut":
        whole = write_gif(frames, tmp_path / "whole.gif")
        data = whole.read_bytes()
        cut, message = data[: len(data) // 2], r"cut off or corrupt \(decoding failed after \d+ frames"
    elif case == "index at the end cut off":  # write_mp4's own layout: without its index nothing decodes
        data = whole.read_bytes()
        cut, message = data[: len(data) * 6 // 10], r"cannot read video .*: corrupt or unsupported file"
    else:
        streamable = streamable_copy(whole, tmp_path / "streamable.mp4")
        data, (pos, size) = streamable.read_bytes(), frame_packets(streamable)[27]
        if case == "cut inside a frame":
            cut = data[: pos + size // 2]
            message = r"cut off or corrupt \(the data of frame 28 of the 30 its index lists is cut off"
        else:
            cut, message = data[:pos], r"cut off or corrupt \(it holds 27 frames of the 30 its index lists"
        # the intact copy reads whole
        assert read_video(streamable).num_frames == 30
    broken = tmp_path / f"broken{whole.suffix}"
    broken.write_bytes(cut)
    with pytest.raises(VideoError, match=message) as error:
        read_video(broken)
    text = str(error.value)
    print(f"{case}: {text}")
    assert "\n" not in text and str(broken) in text and f"ffmpeg -i broken{whole.suffix} " in text
    assert re.search(REMEDY, text)
    with pytest.raises(VideoError, match=message):  # asking for more frames than there are: the same error
        read_video(broken, num_frames=30, size=(16, 16))
    if case != "index at the end cut off":  # the frames before the break are read when they are all that is asked
        first = read_video(broken, num_frames=3)
        assert np.array_equal(first.frames, read_video(whole, num_frames=3).frames)

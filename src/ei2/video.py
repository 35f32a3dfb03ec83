"""Read and write videos as `(f, h, w, 3)` uint8 frames.

Inputs: mp4/mov/webm/mkv/avi (PyAV), gif (Pillow) and folders of image frames. Frames are sampled
(`start`, `stride`, `num_frames`) and each kept frame is resized to cover `(height, width)` and
centre-cropped as it is decoded, so a long video never holds more than its sampled, resized frames.
Outputs: mp4 (PyAV; libx264 when available, else mpeg4) and gif (Pillow), written atomically
(temporary file in the same folder, then `os.replace`), and side-by-side grids (source | edits).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageSequence, UnidentifiedImageError

from .errors import VideoError
from .files import atomic_path

CONTAINER_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
GIF_SUFFIXES = (".gif",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = CONTAINER_SUFFIXES + GIF_SUFFIXES
DEFAULT_FPS = 8.0


@dataclass
class Video:
    """Sampled frames of a video and where they came from."""

    frames: np.ndarray  # f h w 3, uint8
    fps: float  # frame rate of the sampled frames (source rate / stride)
    path: Path
    total_frames: int | None = None  # frames decoded from the source (None: decoding stopped early)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


# ---------------------------------------------------------------------------------------------- reading
def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    stride: int = 1,
    start: int = 0,
    size: tuple[int, int] | None = None,
) -> Video:
    """Read frames `start, start + stride, ...` (`num_frames` of them, or all) of a video file or folder.

    `size` is `(height, width)`: each frame is resized to cover it and centre-cropped.
    Raises `VideoError` for a missing, unreadable or too-short video, and for one that breaks off (cut off or
    corrupt) before the frames asked for: never fewer frames without a word.
    """
    path = Path(path)
    if num_frames is not None and num_frames < 1:
        raise VideoError(f"--frames must be at least 1, got {num_frames}")
    if stride < 1:
        raise VideoError(f"--stride must be at least 1, got {stride}")
    if start < 0:
        raise VideoError(f"--start must be 0 or more, got {start}")
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    needed = None if num_frames is None else start + stride * (num_frames - 1) + 1

    picked: list[np.ndarray] = []

    def take(index: int, image: Image.Image) -> None:
        """Keep frame `index` when it is sampled, resized now; the decoded full-size image is dropped."""
        if index >= start and (index - start) % stride == 0 and (needed is None or index < needed):
            image = resize_and_crop(image, size) if size is not None else image.convert("RGB")
            picked.append(np.asarray(image, dtype=np.uint8))

    if path.is_dir():
        total, fps = _read_folder(path, needed, take)
    elif path.suffix.lower() in GIF_SUFFIXES:
        total, fps = _read_gif(path, needed, take)
    elif path.suffix.lower() in CONTAINER_SUFFIXES:
        total, fps = _read_container(path, needed, take)
    else:
        raise VideoError(
            f"{path}: unsupported video type {path.suffix!r}; use one of "
            f"{', '.join(VIDEO_SUFFIXES)} or a folder of {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} frames"
        )
    if total == 0:
        raise VideoError(f"{path}: no frames could be decoded (empty or corrupt video)")
    if needed is not None and total < needed:
        asked = f"--frames {num_frames}"
        if stride != 1:
            asked += f" --stride {stride}"
        if start:
            asked += f" --start {start}"
        raise VideoError(f"video has {total} frames; {asked} needs at least {needed} ({path})")
    if needed is None and start >= total:
        raise VideoError(f"video has {total} frames; --start {start} is past its end ({path})")
    sizes = {im.shape[1::-1] for im in picked}
    if len(sizes) > 1:
        raise VideoError(f"{path}: frames have different sizes {sorted(sizes)}; pass --width/--height to resize them")
    array = np.stack(picked)
    return Video(array, fps / stride, path, total if needed is None or total > needed else None)


def _remedy(path: Path) -> str:
    """What to do with a file that does not decode: copy it again, or re-encode what decodes."""
    return (f"copy or download it again, or re-encode it "
            f"(ffmpeg -i {path.name} {path.stem}-fixed{path.suffix.lower() or '.mp4'}) and read that")


def _broken_video(path: Path, detail: str) -> VideoError:
    """The one error for a video that breaks off mid-stream (cut off or corrupt after some frames)."""
    return VideoError(f"{path}: the video is cut off or corrupt ({detail}); {_remedy(path)}")


def _read_container(path: Path, needed: int | None, take) -> tuple[int, float]:
    """Decode frames, handing each to `take(index, image)`; returns (frames decoded, fps).

    A video that breaks off before the frames asked for (all of them when `needed` is None) raises one
    `VideoError`: a decoding error after some frames, a frame whose data is cut off (the demuxer flags the
    packet corrupt), or, in mp4/mov (whose index lists every frame), fewer frames in the file than the index.
    Frames past the ones needed are not read, so a video broken after them still reads.
    """
    import av

    count = packets = 0
    broken: str | None = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else DEFAULT_FPS
            # mp4/mov index every frame (stream.frames is exact); other containers' counts are estimates or 0
            indexed = stream.frames if "mov" in container.format.name.split(",") else 0

            def frames():
                nonlocal packets, broken
                for packet in container.demux(stream):
                    if packet.size and packet.is_corrupt:
                        of = f" of the {indexed} its index lists" if indexed else ""
                        broken = f"the data of frame {packets + 1}{of} is cut off"
                        return
                    if packet.size or packet.dts is not None:  # not the empty packet that flushes the decoder
                        packets += 1
                    yield from packet.decode()
                if indexed and packets < indexed:
                    broken = f"it holds {packets} frames of the {indexed} its index lists"

            for frame in frames():
                take(count, frame.to_image())
                count += 1
                if needed is not None and count >= needed:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:  # InvalidDataError, EOF, bad headers
        if not count:
            raise VideoError(f"cannot read video {path}: corrupt or unsupported file ({e}); {_remedy(path)}") from e
        raise _broken_video(path, f"decoding failed after {count} frames: {e}") from e
    if broken is not None:
        raise _broken_video(path, f"{broken}; {count} frame{'s' if count != 1 else ''} decoded")
    return count, fps


def _read_gif(path: Path, needed: int | None, take) -> tuple[int, float]:
    count, duration = 0, 0
    try:
        with Image.open(path) as im:
            duration = im.info.get("duration") or 0
            for frame in ImageSequence.Iterator(im):
                take(count, frame.convert("RGB"))
                count += 1
                if needed is not None and count >= needed:
                    break
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if not count:
            raise VideoError(f"cannot read gif {path}: corrupt or unsupported file ({e}); {_remedy(path)}") from e
        raise _broken_video(path, f"decoding failed after {count} frames: {e}") from e
    fps = 1000.0 / duration if duration else DEFAULT_FPS
    return count, fps


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _read_folder(path: Path, needed: int | None, take) -> tuple[int, float]:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not files:
        raise VideoError(f"folder {path} holds no frames ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images)")
    files = files[:needed]
    for index, f in enumerate(files):
        try:
            with Image.open(f) as im:
                take(index, im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise VideoError(f"cannot read frame {f}: corrupt or unsupported image ({e})") from e
    return len(files), DEFAULT_FPS  # a folder has no frame rate


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize `image` to cover `(height, width)`, keeping its aspect ratio, then centre-crop."""
    height, width = size
    image = image.convert("RGB")
    w0, h0 = image.size
    scale = max(width / w0, height / h0)
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    if (w1, h1) != (w0, h0):
        image = image.resize((w1, h1), Image.Resampling.BICUBIC)
    left, top = (w1 - width) // 2, (h1 - height) // 2
    return image.crop((left, top, left + width, top + height))


def frames_hash(frames: np.ndarray) -> str:
    """A short digest of frames (shape and pixels)."""
    digest = hashlib.sha256(str(tuple(frames.shape)).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- writing
def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (f, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
    return frames


_MP4_CODEC: str | None = None


def mp4_codec() -> str:
    """libx264 when this PyAV build has it, else mpeg4."""
    global _MP4_CODEC
    if _MP4_CODEC is None:
        import av

        try:
            av.codec.Codec("libx264", "w")
            _MP4_CODEC = "libx264"
        except Exception:
            _MP4_CODEC = "mpeg4"
    return _MP4_CODEC


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    import av

    frames = _check_frames(frames)
    # yuv420p needs even sides: pad odd ones by repeating the last row/column
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    codec = mp4_codec()
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "17", "preset": "medium"}
            else:
                stream.bit_rate = 8_000_000
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def write_gif(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
            optimize=False, disposal=1,
        )
    return Path(path)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float = DEFAULT_FPS) -> Path:
    """Write frames as .mp4 or .gif (by suffix), or as a folder of PNG frames (no suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return write_mp4(frames, path, fps)
    if suffix == ".gif":
        return write_gif(frames, path, fps)
    if suffix == "":
        frames = _check_frames(frames)
        path.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            with atomic_path(path / f"{i:05d}.png") as tmp:
                Image.fromarray(f).save(tmp, format="PNG")
        return path
    raise ValueError(f"cannot write {path}: use .mp4, .gif or a folder")


GRID_MIN_TILE = 256  # frames smaller than this are scaled up (nearest neighbour) by a whole factor in grids


def _grid_font(size: int):
    """Pillow's own scalable font (no system font needed) at `size` px; the bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # an old Pillow or one without FreeType
        return ImageFont.load_default()


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """`text` broken into lines that fit `width` px in `font`, at most `max_lines` (the last one cut with …)."""
    def fits(line: str) -> bool:
        return font.getlength(line) <= width

    lines, line = [], ""
    for word in text.split():
        if not line or fits(f"{line} {word}"):
            line = f"{line} {word}".strip()
        else:
            lines.append(line)
            line = word
    lines = [l if fits(l) else _ellipsize(l, fits) for l in [*lines, line]]  # a word wider than the tile
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], _ellipsize(lines[max_lines - 1].rstrip("…"), fits)]
    return lines


def _ellipsize(line: str, fits) -> str:
    """`line`, shortened until it fits with … after it."""
    while line and not fits(line.rstrip() + "…"):
        line = line[:-1]
    return line.rstrip() + "…"


def make_grid(videos: list[np.ndarray], captions: list[str] | None = None, gap: int | None = None,
              min_tile: int = GRID_MIN_TILE) -> np.ndarray:
    """Place videos side by side (`source | edit 1 | edit 2 ...`), with optional captions above each.

    All videos must have the same `(f, h, w)`. Frames smaller than `min_tile` px are scaled up by a whole
    factor (nearest neighbour: 64x64 frames become 256x256 tiles; 512x512 frames stay as they are), so that a
    small model's edits can be seen. Captions are in a font sized to the tile (1/18 of its width), wrapped to
    it, and take at most a third of the tile's height (longer ones end with …). `gap`: pixels between tiles
    (default: 1/64 of the tile, at least 2). Returns `(f, H, W, 3)` uint8.
    """
    videos = [_check_frames(v) for v in videos]
    shapes = {v.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"grid videos must share one shape, got {sorted(shapes)}")
    f, h, w, _ = videos[0].shape
    n = len(videos)
    scale = max(1, -(-int(min_tile) // max(h, w))) if min_tile else 1
    th, tw = h * scale, w * scale
    gap = max(2, tw // 64) if gap is None else gap
    caption_h, lines_per, font, line_h, pad = 0, [], None, 0, 0
    if captions:
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} videos")
        size = max(8, min(32, tw // 18))
        font = _grid_font(size)
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
        line_h, pad = ascent + descent + max(1, size // 6), max(2, size // 4)
        max_lines = max(1, (th // 3 - 2 * pad) // line_h)
        lines_per = [_wrap(c, font, tw - 2 * pad, max_lines) for c in captions]
        caption_h = line_h * max(len(lines) for lines in lines_per) + 2 * pad
    width = n * tw + (n - 1) * gap
    grid = np.full((f, caption_h + th, width, 3), 255, dtype=np.uint8)
    for i, v in enumerate(videos):
        x = i * (tw + gap)
        tile = v if scale == 1 else v.repeat(scale, axis=1).repeat(scale, axis=2)
        grid[:, caption_h:, x : x + tw] = tile
    if captions:
        strip = Image.fromarray(grid[0, :caption_h])
        draw = ImageDraw.Draw(strip)
        for i, lines in enumerate(lines_per):
            for j, line in enumerate(lines):
                draw.text((i * (tw + gap) + pad, pad + j * line_h), line, fill=(0, 0, 0), font=font)
        grid[:, :caption_h] = np.asarray(strip)[None]
    return grid

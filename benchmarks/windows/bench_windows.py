"""Long videos (DESIGN §1.10, issue 13): memory/time of `ei2 edit` against the number of frames, and seams.

    OMP_NUM_THREADS=1 python benchmarks/windows/bench_windows.py memory --frames 8 16 32 64 128
    OMP_NUM_THREADS=1 python benchmarks/windows/bench_windows.py seams --frames 48

`memory`: for each frame count, a Shapes video (a red circle moving right and back, 64x64) is edited by
`ei2 edit --window 8` in a fresh process; its peak RSS (ru_maxrss) and the stage timings of run.json
are recorded (`results/memory.json`).

`seams`: a Shapes video of `--frames` frames whose circle crosses the frame and back on a zig-zag path
is tuned once (clips of 8), then edited to another colour three ways: windows of 8 merged at every step
(with and without anchor frames), and the naive split (consecutive chunks of 8 frames edited as
independent videos with the same adapter). The oracle reads every edited frame back:
- centre error: |oracle centre - true centre| per frame (pixels), as for short videos;
- jump: the edited object's frame-to-frame motion minus the true motion, |Δc_edit - Δc_true| (pixels),
  at the naive split's chunk boundaries (frames 7|8, 15|16, ...) against inside the chunks, and at the
  merged windows' edges (every 4 frames) against elsewhere;
- pixel jump: mean |frame_{i+1} - frame_i| of the edit minus that of the source (a warp-error proxy
  with the true motion: the source moves the same way), at boundaries against inside;
- Tem-Con and warp error per pair (`ei2.metrics.clip.temporal_consistencies` with the bundled Shapes CLIP,
  `ei2.metrics.flow.warp_errors` with the edit's own flow, and with the source's flow), averaged over the
  boundary pairs against the inside pairs, with two definitions of "boundary" (`seam_boundaries`):
  window edges, pairs (i, i + 1) where the set of merged windows holding frame i differs from the set
  holding frame i + 1 (every stride = 4 frames at window 8), and chunk edges, pairs where frame i + 1
  starts a chunk of the naive split (every 8 frames). Each variant's own boundary (`own_boundary`) is
  the window edges for merged windows and the chunk edges for the naive split. The source video is
  scored the same way (`source_reference`).
Results go to `results/seams-<frames>.json` (and a grid, `seams-<frames>.gif`). Threads: OMP_NUM_THREADS
(default 1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def scene_video(num_frames: int, zigzag_turns: int = 1, color: str = "red", shape: str = "circle",
                background: str = "gray"):
    """(frames (f, 64, 64, 3) uint8, true centres (f, 2)): the shape goes right and left across the frame."""
    from ei2.shapes.world import BACKGROUND_NAMES, COLOR_NAMES, RESOLUTION, SHAPES, Scenes, render

    size = 9.0
    lo, hi = size + 3, RESOLUTION - size - 3
    t = np.linspace(0.0, 1.0, num_frames)
    phase = (t * (2 * zigzag_turns)) % 2
    cx = lo + (hi - lo) * np.where(phase < 1, phase, 2 - phase)
    cy = RESOLUTION / 2 + 10 * np.sin(2 * np.pi * t)
    scenes = Scenes(color=COLOR_NAMES.index(color), shape=SHAPES.index(shape),
                    background=BACKGROUND_NAMES.index(background), cx=cx, cy=cy, size=size)
    return render(scenes), np.stack([cx, cy], axis=1)


# ---------------------------------------------------------------------------------------------- memory
PLAIN = ["--strength", "1", "--inject-features", "0", "--inject-attention", "0"]  # `--plain`: the edit before issue 19


def memory_one(num_frames: int, out: Path, steps: int, inference_steps: int, plain: bool = False) -> dict:
    """Run in a fresh process: `ei2 edit` of a num_frames video, window 8; peak RSS of this process."""
    import resource

    from ei2.cli import main
    from ei2.video import write_mp4

    frames, _ = scene_video(num_frames)
    video = out / f"video-{num_frames}.mp4"
    write_mp4(frames, video, fps=8)
    run = out / f"run-{num_frames}"
    t = time.perf_counter()
    code = main(["edit", str(video), "--source-prompt", "a red circle on a gray background",
                 "--target-prompt", "a blue circle on a gray background", "--frames", "all", "--window", "8",
                 "--steps", str(steps), "--inference-steps", str(inference_steps), "--device", "cpu", "--quiet",
                 "--out", str(run), "--overwrite"] + (PLAIN if plain else []))
    wall = time.perf_counter() - t
    if code:
        raise SystemExit(code)
    record = json.loads((run / "run.json").read_text())
    timings = record["timings"]
    invert_edit = timings["invert_s"] + sum(timings["edit_s"])
    return {"frames": num_frames, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": round(wall, 2), "tune_s": timings.get("tune_s"), "invert_edit_s": round(invert_edit, 2),
            "invert_edit_s_per_frame": round(invert_edit / num_frames, 4),
            "invert_s_per_frame": round(timings["invert_s"] / num_frames, 4),
            "edit_s_per_frame": round(sum(timings["edit_s"]) / num_frames, 4),
            "write_s": timings.get("write_s"), "load_s": timings.get("load_s"),
            "windows": record["windowing"]["windows"], "windowed": record["windowing"]["windowed"]}


def memory(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in args.frames:
            command = [sys.executable, __file__, "_memory_one", str(f), tmp, str(args.steps), str(args.inference_steps),
                       "plain" if args.plain else "defaults"]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if result.returncode:
                raise SystemExit(result.stderr[-2000:])
            row = json.loads(result.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "memory-plain.json" if args.plain else "memory.json"
    (RESULTS / name).write_text(json.dumps({"steps": args.steps, "inference_steps": args.inference_steps,
                                            "plain": args.plain, "rows": rows}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- seams
def _jumps(centres: np.ndarray, truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """|Δc_edit - Δc_true| between frames i and i + 1 (nan where the oracle found no object)."""
    d = np.linalg.norm(np.diff(centres, axis=0) - np.diff(truth, axis=0), axis=1)
    d[~(found[1:] & found[:-1])] = np.nan
    return d


def _split(values: np.ndarray, boundary: np.ndarray, digits: int = 3) -> dict:
    return {"boundary": round(float(np.nanmean(values[boundary])), digits),
            "inside": round(float(np.nanmean(values[~boundary])), digits)}


def seam_boundaries(num_frames: int, window: int, stride: int | None = None) -> dict[str, np.ndarray]:
    """Boolean masks over the pairs (i, i + 1), i = 0..f-2, of the two kinds of boundary:

    - "window": the set of merged windows (`ei2.windows.window_starts`) holding frame i differs from the
      set holding frame i + 1, i.e. a window starts at i + 1 or ends at i;
    - "chunk": frame i + 1 starts a chunk of the naive split (chunks of `window` frames from frame 0), so
      frames i and i + 1 were edited as different videos.
    """
    from ei2.windows import window_starts

    starts = window_starts(num_frames, window, stride)
    holding = [frozenset(k for k, s in enumerate(starts) if s <= i < s + window) for i in range(num_frames)]
    pairs = np.arange(num_frames - 1)
    return {"window": np.array([holding[i] != holding[i + 1] for i in pairs], dtype=bool),
            "chunk": (pairs + 1) % window == 0}


def pair_metrics(video: np.ndarray, source: np.ndarray, scorer) -> dict[str, np.ndarray]:
    """Per consecutive pair (f - 1,): Tem-Con (CLIP cosine), warp error with the video's own flow and with
    the source's flow (`ei2.metrics`)."""
    from ei2.metrics.clip import temporal_consistencies
    from ei2.metrics.flow import warp_errors

    return {"tem_con": temporal_consistencies(scorer.embed_images(video)).numpy().astype(np.float64),
            "warp_err": warp_errors(video), "warp_err_src": warp_errors(video, source)}


def pair_splits(pairs: dict[str, np.ndarray], boundaries: dict[str, np.ndarray], own: str | None = None) -> dict:
    """Whole-video means, boundary / inside means for both kinds of boundary, and the per-pair values."""
    out, own_split = {}, {"kind": own}
    for metric, values in pairs.items():
        digits = 4 if metric == "tem_con" else 3
        out[metric] = round(float(np.nanmean(values)), digits)
        for kind, mask in boundaries.items():
            out[f"{metric}_at_{kind}_edges"] = _split(values, mask, digits)
        if own is not None:
            own_split[metric] = _split(values, boundaries[own], digits)
    if own is not None:
        out["own_boundary"] = own_split
    for metric, values in pairs.items():
        out[f"{metric}_per_pair"] = [None if np.isnan(v) else round(float(v), 4) for v in values]
    return out


def seams(args) -> None:
    import torch

    from ei2.pipeline import EI2Pipeline
    from ei2.shapes.oracle import read_frames
    from ei2.shapes.world import COLOR_NAMES

    from ei2.metrics.clip import ClipScorer

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    f, w = args.frames, args.window
    frames, truth = scene_video(f, zigzag_turns=args.turns)
    source, target = "a red circle on a gray background", "a blue circle on a gray background"
    pipe = EI2Pipeline.from_pretrained(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.set_windowing(w)
    t = time.perf_counter()
    pipe.tune(frames, source, steps=args.steps, learning_rate=args.lr, seed=0)
    tune_s = time.perf_counter() - t
    kwargs = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    edits, seconds = {}, {}
    for name, anchors in (("merged windows", 3), ("merged windows, no anchors", 0)):
        pipe.set_windowing(w, anchors=anchors)
        t = time.perf_counter()
        edits[name] = pipe.edit(frames, source, target, **kwargs).frames[0]
        seconds[name] = round(time.perf_counter() - t, 1)
    pipe.set_windowing(None)
    t = time.perf_counter()
    edits["naive split"] = np.concatenate([pipe.edit(frames[s : s + w], source, target, **kwargs).frames[0]
                                           for s in range(0, f, w)])
    seconds["naive split"] = round(time.perf_counter() - t, 1)

    boundaries = seam_boundaries(f, w)  # over the pairs i: frames i | i + 1
    chunk_edges, window_edges = boundaries["chunk"], boundaries["window"]
    scorer = ClipScorer(args.clip_model)
    source_reference = pair_splits(pair_metrics(frames, frames, scorer), boundaries)
    source_pixel_jump = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    blue = COLOR_NAMES.index("blue")
    results = {}
    for name, video in edits.items():
        reading = read_frames(video)
        centres = np.stack([reading.cx, reading.cy], axis=1)
        error = np.linalg.norm(centres - truth, axis=1)
        error[~reading.found] = np.nan
        jumps = _jumps(centres, truth, reading.found)
        pixel = np.abs(np.abs(np.diff(video.astype(np.float32), axis=0)).mean(axis=(1, 2, 3)) - source_pixel_jump)
        results[name] = {
            "seconds": seconds[name],
            "found": round(float(reading.found.mean()), 3),
            "target_colour": round(float((reading.color[reading.found] == blue).mean()), 3) if reading.found.any() else 0,
            "centre_error_px": round(float(np.nanmean(error)), 3),
            "centre_error_per_frame": [None if np.isnan(e) else round(float(e), 2) for e in error],
            "jump_px_at_chunk_edges": _split(jumps, chunk_edges),
            "jump_px_at_window_edges": _split(jumps, window_edges),
            "pixel_jump_at_chunk_edges": _split(pixel, chunk_edges),
            "pixel_jump_at_window_edges": _split(pixel, window_edges),
            **pair_splits(pair_metrics(video, frames, scorer), boundaries,
                          own="chunk" if name == "naive split" else "window"),
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if not k.endswith(("_per_frame", "_per_pair"))}),
              flush=True)
    print("source", json.dumps({k: v for k, v in source_reference.items() if not k.endswith("_per_pair")}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from ei2.video import make_grid, write_gif

    write_gif(make_grid([frames, *edits.values()], ["source", *edits]), args.out / f"seams-{f}.gif", fps=8)
    (args.out / f"seams-{f}.json").write_text(json.dumps(
        {"frames": f, "window": w, "turns": args.turns, "steps": args.steps, "inference_steps": args.inference_steps,
         "guidance": args.guidance, "tune_s": round(tune_s, 1), "clip_model": scorer.source,
         "threads": torch.get_num_threads(),
         "boundary_pairs": {kind: [int(i) for i in np.flatnonzero(mask)] for kind, mask in boundaries.items()},
         "results": results, "source_reference": source_reference}, indent=2) + "\n")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memory_one":
        f, out, steps, inference_steps = int(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(memory_one(f, out, steps, inference_steps, plain=argv[5] == "plain")))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    m.add_argument("--steps", type=int, default=4)
    m.add_argument("--inference-steps", type=int, default=10)
    m.add_argument("--plain", action="store_true", help="strength 1, no injection (the Shapes defaults before issue 19; "
                                                        "default: the model's defaults, as `ei2 edit` runs)")
    s = sub.add_parser("seams")
    s.add_argument("--frames", type=int, default=48)
    s.add_argument("--window", type=int, default=8)
    s.add_argument("--turns", type=int, default=1, help="times the shape crosses the frame and back")
    s.add_argument("--steps", type=int, default=50)  # the Shapes benchmark's settings (benchmarks/shapes/spec.yaml)
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--inference-steps", type=int, default=15)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--clip-model", default=None, help="CLIP for Tem-Con (default: the bundled Shapes CLIP)")
    s.add_argument("--out", type=Path, default=RESULTS, help="folder for seams-<frames>.json/.gif")
    args = parser.parse_args(argv)
    {"memory": memory, "seams": seams}[args.command](args)


if __name__ == "__main__":
    main()

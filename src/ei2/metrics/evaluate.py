"""`ei2 eval RUN_DIR`: the metrics of a finished `ei2 edit` run, added to its run.json and printed.

    ei2 eval outputs/20260101-120000-a-blue-circle            # Shapes: CLIP + oracle + warp error
    ei2 eval runs/ski --clip-model /models/clip-vit-large-patch14   # Stable Diffusion edits

Per edit: Tex-Ali, Tem-Con, frame accuracy (`ei2.metrics.clip`), the warp error (`ei2.metrics.flow`)
and, when the prompts are Shapes captions, the oracle metrics (`ei2.metrics.oracle`). The frames are
read from the run's gifs (lossless for these flat images; the mp4s are chroma-subsampled). run.json
gets a `metrics` entry (per edit and the mean over edits), written atomically; a run evaluated again
has its `metrics` replaced.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..files import write_json

KINDS = ("clip", "oracle", "flow")
# column order and format of printed tables
COLUMNS = {
    "tex_ali": ("Tex-Ali", "{:.2f}"), "tem_con": ("Tem-Con", "{:.4f}"), "frame_acc": ("FrameAcc", "{:.3f}"),
    "warp_err": ("Warp", "{:.2f}"), "warp_err_src": ("WarpSrc", "{:.2f}"), "edit_acc": ("EditAcc", "{:.3f}"),
    "keep_acc": ("KeepAcc", "{:.3f}"), "acc_all": ("AccAll", "{:.3f}"), "centre_err": ("CentreErr", "{:.2f}"),
    "path_kept": ("Path≤4px", "{:.3f}"), "collapsed": ("Collapsed", "{:.3f}"), "flicker": ("Flicker", "{:.3f}"),
}


def evaluate_edits(
    edits: list[tuple[str, np.ndarray]],
    source_frames: np.ndarray,
    source_prompt: str,
    metrics=KINDS,
    scorer=None,
    source_centres: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Metrics of each (target prompt, frames (f, h, w, 3) uint8) edit of one source video.

    `metrics` picks among clip, oracle, flow; `oracle` is skipped unless the source and target prompts
    are Shapes captions. `scorer` is a `ClipScorer` (loaded with the default model when None).
    """
    from .oracle import is_shapes_caption

    if "clip" in metrics and scorer is None:
        from .clip import ClipScorer

        scorer = ClipScorer()
    if "clip" in metrics:
        from .clip import frame_accuracy, temporal_consistency, textual_alignment

        source_text = scorer.embed_texts([source_prompt])[0]
        target_texts = scorer.embed_texts([p for p, _ in edits])
    results = []
    for i, (prompt, frames) in enumerate(edits):
        row: dict[str, float] = {}
        if "clip" in metrics:
            images = scorer.embed_images(frames)
            row["tex_ali"] = textual_alignment(images, target_texts[i])
            if len(frames) >= 2:
                row["tem_con"] = temporal_consistency(images)
            row["frame_acc"] = frame_accuracy(images, target_texts[i], source_text)
        if "flow" in metrics:
            from .flow import flow_metrics

            row.update(flow_metrics(frames, source_frames))
        if "oracle" in metrics and is_shapes_caption(source_prompt) and is_shapes_caption(prompt):
            from .oracle import oracle_metrics

            row.update(oracle_metrics(frames, prompt, source=source_prompt, source_frames=source_frames,
                                      source_centres=source_centres))
        results.append(row)
    return results


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the rows that have it (NaN values ignored)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)]
    out = {}
    for k in keys:
        values = [r[k] for r in rows if k in r and r[k] is not None and not math.isnan(r[k])]
        out[k] = float(np.mean(values)) if values else float("nan")
    return out


def format_table(rows: list[dict], label_key: str, label_title: str) -> str:
    """A plain-text table of the metric columns that any row has."""
    columns = [k for k in COLUMNS if any(k in r for r in rows)]
    header = [label_title] + [COLUMNS[k][0] for k in columns]
    body = []
    for r in rows:
        cells = [str(r.get(label_key, ""))]
        for k in columns:
            v = r.get(k)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else COLUMNS[k][1].format(v))
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run folders
def _read(path: Path) -> np.ndarray:
    from ..video import read_video

    return read_video(path).frames


def _pick(run_dir: Path, names: list[str]) -> Path:
    """The gif among a run's outputs when there is one, else the first that exists."""
    paths = [run_dir / n for n in names]
    for p in sorted(paths, key=lambda p: p.suffix.lower() != ".gif"):
        if p.exists():
            return p
    raise ConfigError(f"{run_dir}: none of {', '.join(names)} exists; the run folder is incomplete")


def evaluate_run(run_dir: str | Path, clip_model: str | None = None, metrics=KINDS, device: str = "cpu") -> dict:
    """Compute the metrics of an `ei2 edit` run folder and store them in its run.json (atomically)."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        hint = " (an interrupted run; finish it first)" if run_dir.name.endswith(".partial") else ""
        raise ConfigError(f"{run_dir} is not an ei2 run folder: no run.json{hint}")
    record = json.loads(record_path.read_text())
    edits = (record.get("outputs") or {}).get("edits")
    if record.get("command") != "edit" or not edits:
        raise ConfigError(f"{run_dir} holds no edits (command {record.get('command')!r}); "
                          "ei2 eval measures the folders of `ei2 edit`")
    source_prompt = record["settings"]["source_prompt"]
    source = _read(_pick(run_dir, record["outputs"].get("source", ["source.gif", "source.mp4"])))
    frames = []
    for e in edits:
        frames.append((e["prompt"], _read(_pick(run_dir, [e[k] for k in ("gif", "mp4") if e.get(k)]))))
    scorer = None
    if "clip" in metrics:
        from .clip import ClipScorer

        scorer = ClipScorer(clip_model, device=device)
    rows = evaluate_edits(frames, source, source_prompt, metrics, scorer)
    result = {
        "evaluated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "clip_model": scorer.source if scorer else None,
        "edits": [{"prompt": p, **r} for (p, _), r in zip(frames, rows)],
        "mean": mean_rows(rows),
    }
    record["metrics"] = result
    write_json(record_path, record)
    return result


# ---------------------------------------------------------------------------------------------- command
def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="measure a finished edit run (CLIP, Shapes oracle, warp error) and store it in run.json",
        description="Compute Tex-Ali, Tem-Con, frame accuracy, the warp error and (for Shapes prompts) the oracle "
                    "metrics of every edit of an `ei2 edit` run folder; add them to its run.json and print them.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `ei2 edit`")
    parser.add_argument("--clip-model", metavar="PATH_OR_ID",
                        help="transformers CLIPModel folder or hub id (default: the embedded Shapes CLIP)")
    parser.add_argument("--metrics", nargs="+", choices=KINDS, default=list(KINDS), help="which metrics (default: all)")
    parser.add_argument("--device", default="cpu", help="device of the CLIP model (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=run_eval)
    return parser


def run_eval(args, argv=None) -> int:
    result = evaluate_run(args.run_dir, args.clip_model, tuple(args.metrics), args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        rows = [*result["edits"], {"prompt": "mean", **result["mean"]}]
        print(format_table(rows, "prompt", "edit"))
        print(f"ei2: metrics added to {Path(args.run_dir) / 'run.json'}", file=sys.stderr)
    return 0

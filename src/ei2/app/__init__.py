"""`ei2 serve`: a gradio web app over the same jobs as `ei2 edit` (`ei2.runs`).

Upload a video or pick a bundled sample, type one or several target prompts, watch tuning, inversion and
each edit advance, and get the grid, every edit, the adapter and run.json. Every job writes an ordinary
run folder under the app's output folder; jobs run one at a time, within the caps of `ei2 serve`'s flags,
and a job whose page is closed is cancelled at its next step. Only gradio's own folder is served: the
files of a finished job lie there under a random token; run folders, uploads and adapters.json never.

This package is optional (`pip install -e ".[app]"`): nothing else in ei2 imports it, and it imports
the library, never the CLI. Importing `ei2.app` does not import gradio; `serve` and `build_app` do.
"""
from __future__ import annotations

import os
from pathlib import Path

# gradio's uploads and cache, the bundled samples and the files of finished jobs, under the output folder
FILES = (".gradio", "files")
LIMITS = {"max_upload_mb": 50.0, "max_frames": 32, "max_steps": 500, "max_inference_steps": 100, "max_prompts": 4}


def _gradio_environment(out: Path) -> None:
    """Keep gradio's uploads and caches inside the output folder, and send nothing anywhere."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(out.joinpath(*FILES))
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(out / ".gradio" / "examples")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_app(model: str | None = None, out: str | os.PathLike = "outputs/app", device: str = "auto",
              keep_runs: int | None = None, **limits):
    """The gradio `Blocks` of the app (not launched); see `serve`. `limits`: the caps of `LIMITS`."""
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise TypeError(f"unknown limits {sorted(unknown)}; known: {sorted(LIMITS)}")
    out = Path(out).resolve()
    _gradio_environment(out)
    from .server import App

    return App(model=model, out=out, device=device, keep_runs=keep_runs, **{**LIMITS, **limits}).blocks()


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, out: str | os.PathLike = "outputs/app",
          device: str = "auto", keep_runs: int | None = None, block: bool = True, **limits):
    """Build and launch the app on `host:port` (loopback by default); returns the launched `Blocks`.

    `limits` (`LIMITS`): the largest upload, and the most frames, tuning steps, inference steps and target
    prompts a job may ask for. `keep_runs`: keep the newest N runs, uploads and inversion-cache entries."""
    out = Path(out).resolve()
    demo = build_app(model=model, out=out, device=device, keep_runs=keep_runs, **limits)
    from .server import launch

    return launch(demo, out=out, host=host, port=port, max_upload_mb=limits.get("max_upload_mb", LIMITS["max_upload_mb"]),
                  block=block)

"""`ei2 serve`: a gradio web app over the same jobs as `ei2 edit` (`ei2.runs`).

Upload a video or pick a bundled sample, type one or several target prompts, watch tuning, inversion and
each edit advance, and get the grid, every edit, the adapter and run.json. Every job writes an ordinary
run folder under the app's output folder; jobs run one at a time. Only files under that folder are served.

This package is optional (`pip install -e ".[app]"`): nothing else in ei2 imports it, and it imports
the library, never the CLI. Importing `ei2.app` does not import gradio; `serve` and `build_app` do.
"""
from __future__ import annotations

import os
from pathlib import Path


def _gradio_environment(out: Path) -> None:
    """Keep gradio's uploads and caches inside the output folder, and send nothing anywhere."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(out / ".gradio" / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(out / ".gradio" / "examples")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_app(model: str | None = None, out: str | os.PathLike = "outputs/app", max_upload_mb: float = 50.0,
              max_frames: int = 32, device: str = "auto"):
    """The gradio `Blocks` of the app (not launched); see `serve`."""
    out = Path(out).resolve()
    _gradio_environment(out)
    from .server import App

    return App(model=model, out=out, max_upload_mb=max_upload_mb, max_frames=max_frames, device=device).blocks()


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, out: str | os.PathLike = "outputs/app",
          max_upload_mb: float = 50.0, max_frames: int = 32, device: str = "auto", block: bool = True):
    """Build and launch the app on `host:port` (loopback by default); returns the launched `Blocks`."""
    out = Path(out).resolve()
    demo = build_app(model=model, out=out, max_upload_mb=max_upload_mb, max_frames=max_frames, device=device)
    from .server import launch

    return launch(demo, out=out, host=host, port=port, max_upload_mb=max_upload_mb, block=block)

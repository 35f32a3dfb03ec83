"""Files and folders that appear whole (DESIGN §5): a finished temporary file or folder replaces the target in
one rename, so a reader sees the old one or the new one, never a part.

    with atomic_path("out/grid.png") as tmp:    # a temporary file beside the target, renamed on success
        image.save(tmp)
    write_json("out/run.json", record)           # the one JSON writer: atomic, indent 2, default=str
    replace_folder("out/.run.tmp", "out/run")    # a finished folder replaces the old one
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path` (same suffix); on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as JSON to `path` atomically: indented by 2, with a trailing newline; values that JSON has
    no type for (paths, say) are written as their `str`."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=str) + "\n"  # serialised first: a bad value writes nothing
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder `tmp` to `final`, replacing an existing `final`.

    A rename cannot replace a non-empty folder, so an old `final` is moved aside first and removed after;
    if the rename fails, the old one is put back: `final` is always the old folder or the new one.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final

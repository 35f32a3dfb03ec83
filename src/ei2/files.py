"""Folders that appear whole: a finished temporary folder replaces the target in one rename (DESIGN §5)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


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

"""Files and folders that appear whole (DESIGN §5): a finished temporary file or folder replaces the target in
one rename, so a reader sees the old one or the new one, never a part.

    with atomic_path("out/grid.png") as tmp:    # a temporary file beside the target, renamed on success
        image.save(tmp)
    write_json("out/run.json", record)           # the one JSON writer: atomic, indent 2, default=str
    replace_folder("out/.run.tmp", "out/run")    # a finished folder replaces the old one
    with staged_folder("out/adapter") as tmp:    # written in a temporary sibling, then replaces the old one
    with FolderLock("out/run.partial"):          # one process at a time writes a run folder

Files are created with the modes the user's umask gives (a temporary file is made 0600; it is widened to
`0666 & ~umask` before it takes the target's name). JSON is strict: NaN and infinity are refused, never written.
"""
from __future__ import annotations

import contextlib
import errno
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
    os.fchmod(fd, 0o666 & ~umask())
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
    no type for (paths, say) are written as their `str`; NaN or infinity is a `ValueError` (strict JSON)."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=str, allow_nan=False) + "\n"  # serialised first: a bad value writes nothing
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


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike):
    """Yield an empty temporary folder beside `final`; when the block ends without an error it replaces `final`
    (`replace_folder`), and in any case nothing of it is left: `final` is the old folder or the new one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class FolderBusyError(OSError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, pid: int | None):
        super().__init__(errno.EBUSY, f"{folder} is locked by process {pid}")
        self.folder, self.pid = folder, pid


class FolderLock:
    """An exclusive OS lock (`flock`) on the folder itself, held while the context is open.

    The kernel releases it when the process dies, however it dies, so a killed run's folder is free at once;
    it follows the folder through a rename. `folder/.pid` names the owner, for the message of a process that
    is refused. `folder` is created if missing (`created` says whether this lock created it); a refused lock
    touches nothing else.
    """

    PID_FILE = ".pid"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "FolderLock":
        import fcntl

        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(self.folder, self.owner()) from None
        self.fd, self.created = fd, created
        return self

    def write_pid(self) -> None:
        """Name this process as the holder (`owner()`), once it has decided to use the folder."""
        with contextlib.suppress(OSError):
            (self.folder / self.PID_FILE).write_text(f"{os.getpid()}\n")

    @staticmethod
    def held(folder: str | os.PathLike) -> bool:
        """Whether a live process holds `folder`'s lock now (a cleaner must leave such a folder alone)."""
        import fcntl

        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def owner(self) -> int | None:
        """The PID written by the process that holds (or last held) the lock, if any."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.folder / self.PID_FILE).read_text().strip())
        return None

    def forget_pid(self) -> None:
        """Remove the PID file (before the folder is renamed into its final place); the lock stays held."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / self.PID_FILE)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        self.write_pid()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks: what a writer records and a reader checks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_digests(folder: str | os.PathLike, digests: dict[str, str]) -> list[str]:
    """The names in `digests` whose file in `folder` is missing or has another sha256 (empty: all intact)."""
    folder = Path(folder)
    return [name for name, want in digests.items()
            if not (folder / name).is_file() or file_digest(folder / name) != want]


# what the user can act on: no permission, no space, a read-only file system, a quota
FILE_SYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def as_os_error(error: BaseException) -> OSError | None:
    """`error` as an `OSError`: itself, or the one a library wrapped in its own type (safetensors writes
    "I/O error: No space left on device (os error 28)"); None for any other error."""
    import re

    for e in (error, error.__cause__):
        if isinstance(e, OSError):
            return e
        match = re.search(r"\(os error (\d+)\)", str(e)) if e is not None else None
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
    return None


def file_system_problem(error: BaseException) -> OSError | None:
    """The `OSError` in `error` when it is one the user can act on (`FILE_SYSTEM_ERRNOS`), else None."""
    e = as_os_error(error)
    return e if e is not None and e.errno in FILE_SYSTEM_ERRNOS else None


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' `save_file`, with the mode the umask gives (safetensors creates its files 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())
    return Path(path)

"""User-facing errors: the message says what was wrong and what to do.

The `ei2` command prints the message of any `EI2Error` (one line, no traceback) and exits with code 2.
"""
from __future__ import annotations


class EI2Error(Exception):
    """Base class of errors caused by the user's input (a file, an option, a model folder)."""


class VideoError(EI2Error):
    """A video cannot be read, is corrupt or has too few frames."""


class ConfigError(EI2Error):
    """A command-line option or a YAML key is unknown, has the wrong type or an invalid value."""


class ModelError(EI2Error):
    """A model folder is incomplete or a model id cannot be loaded."""


class TuningError(EI2Error):
    """Tuning diverged (NaN/inf loss) or a checkpoint cannot be resumed."""


class FileSystemError(EI2Error):
    """A file or folder cannot be written or read: no permission, no space left, a read-only file system."""


class SettingError(ConfigError, ValueError):
    """A setting out of range, said in the library's words: `setting` names it (a `Settings` field), `problem` says
    what is wrong; a front end says it in its own words (the CLI: `--strength must be ...`, `config.flag`)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

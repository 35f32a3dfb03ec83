"""Run folders: the jobs of `ei2 edit` and `ei2 tune`, shared by the command line and the web app.

    final = runs.edit(settings, progress=lambda stage, step, total: ..., say=print)

A run is built in `<out>.partial/` (`Staging`) and renamed to `<out>` when complete, so a run folder
is either whole or absent. The partial folder is locked (an OS lock the kernel drops when the process dies)
from before the model loads: a second run on the same `--out` is refused and touches nothing. Bad input raises
an `EI2Error` (or `AdapterMismatchError`) and leaves no run folder. What can be resumed is never deleted by an
error: tuning checkpoints and a finished adapter stay in `<out>.partial/` for `resume` (an edit resumed after
its tuning finished goes straight to inversion), and a refused resume leaves the folder as it was.

Under `accelerate launch --multi_gpu --num_processes N`, `tune` and `edit` share the tuning out among the
processes: each takes its own seeded clips (micro-batches) of every step and the gradients are averaged, so the
adapter is the one of one process with gradient accumulation N (`ei2.tuning`); `edit` then shares the windows of a
long video out (DESIGN §1.10, `ei2.windows`): every process inverts and edits its windows, merged at every step.
Only rank 0 writes the run folder (checkpoints included); the others wait for it at a barrier.

`progress(stage, step, total)` is called as the job advances: stage "load", "tuning", "inversion",
"null-text inversion", "edit I/N" (one per target prompt) and "write". `say(message)` receives the
one-line messages the CLI prints. Neither is required. This module imports neither the CLI nor the app.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from . import config as cfg
from .errors import ConfigError, EI2Error, FileSystemError, SettingError
from .files import FolderBusyError, FolderLock, file_system_problem, replace_folder, write_json

RUN_FILE = "run.json"
PARTIAL = ".partial"
WARNING = "warning: "  # the start of a `say` message that --quiet does not silence
TUNED_FILE = ".tuned.json"  # in `<out>.partial/` beside a finished adapter: what it was tuned on, for `resume`

Progress = Callable[[str, int, int], None]
Say = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- checks
def validate(s: cfg.Settings, command: str) -> None:
    """Check the settings of `command` before anything is loaded; a problem is a `ConfigError`."""
    for f in dataclasses.fields(s):  # every number: the CLI, YAML, app and benchmark all come through here
        v = getattr(s, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{cfg.flag(f.name)} must be a finite number, got {v}")
    if not s.video:
        raise ConfigError("no video given; pass VIDEO (a file or folder of frames) or `video:` in --config")
    if not (s.source_prompt or "").strip():
        raise ConfigError('--source-prompt is empty; describe the source video, e.g. --source-prompt "a man is skiing"')
    if command == cfg.EDIT:
        if not s.target_prompt:
            raise ConfigError('no --target-prompt given; pass one or more, e.g. --target-prompt "a panda is skiing"')
        for p in s.target_prompt:
            if not p.strip():
                raise ConfigError('a --target-prompt is empty; describe the edited video in words')
        sampling(s)  # steps, strength, guidance: checked where the frozen sampling config is made
        if s.fps is not None and s.fps <= 0:
            raise ConfigError(f"--fps must be positive, got {s.fps}")
        _p2p_config(s)  # fractions, thresholds, option combinations: before anything is loaded
        injection_config(s)
        if s.adapter and s.resume:
            raise ConfigError("--resume continues a tuning; with --adapter there is no tuning to resume")
    from .pipeline import check_frame_size
    from .windows import Windowing

    with in_flags():
        check_frame_size(s.height, s.width)
        Windowing(s.window, anchors=s.anchor_frames)  # window and anchors, checked where windows are made
    if s.frames != "all" and (isinstance(s.frames, bool) or not isinstance(s.frames, int)):
        raise ConfigError(f"--frames must be a number of frames or `all`, got {s.frames!r}")
    for name, low in (("frames", 1), ("stride", 1), ("start", 0), ("steps", 0), ("checkpoint_every", 0)):
        v = getattr(s, name)
        if v == "all":
            continue
        if v < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    if not s.lr > 0:
        raise ConfigError(f"--lr must be positive, got {s.lr}")
    _check_control_settings(s)
    from .models import RECIPES

    if s.recipe is not None and s.recipe not in RECIPES:
        raise ConfigError(f"unknown --recipe {s.recipe!r}; choose one of: {', '.join(RECIPES)}")
    if s.resume and not s.out:
        raise ConfigError("--resume needs the --out of the interrupted run")
    if not Path(s.video).exists():
        raise ConfigError(f"video not found: {s.video}")


def sampling(s: cfg.Settings):
    """The settings' `ei2.sampling.Sampling` (grid, strength, guidance, negative prompt); a bad value is a
    ConfigError naming its flag."""
    from .sampling import Sampling

    with in_flags():
        return Sampling(s.inference_steps, s.strength, s.guidance_scale, s.guidance_rescale, s.guidance_rescale_std,
                        s.negative_prompt)


@contextlib.contextmanager
def in_flags():
    """A library `SettingError` raised inside, said in the CLI's words: its setting's flag (`--strength ...`)."""
    try:
        yield
    except SettingError as e:
        raise ConfigError(f"{cfg.flag(e.setting)} {e.problem}") from None


def control_scales(s: cfg.Settings) -> list[float]:
    """`--control-scale`: one number for every net, or one per `--control` (default 1.0)."""
    scales = []
    for v in s.control_scale or ["1.0"]:
        try:
            scales.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"--control-scale must be a number, got {v!r}") from None
    return scales


def _check_control_settings(s: cfg.Settings) -> None:
    """The structure-condition options, checked before anything is loaded."""
    from .structure.controlnet import check_scale, check_window
    from .structure.maps import KINDS

    if not cfg.controlled(s):
        given = [k for k in ("controlnet", "control_scale", "guess_mode") if getattr(s, k)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags} need --control (a condition kind, e.g. --control canny, or a folder of maps)")
        return
    if cfg.NO_CONTROL in s.control:
        raise ConfigError("--control none turns the condition off; do not combine it with other --control values")
    for kind in s.control:
        if kind not in KINDS and not Path(kind).exists():
            raise ConfigError(f"--control {kind!r} is neither a condition kind ({', '.join(KINDS)}) nor an existing "
                              "folder or video of maps")
    if s.controlnet and len(s.controlnet) != len(s.control):
        raise ConfigError(f"give one --controlnet per --control, paired in order: {len(s.control)} --control, "
                          f"{len(s.controlnet)} --controlnet")
    scales = control_scales(s)
    if len(scales) not in (1, len(s.control)):
        raise ConfigError(f"give one --control-scale for all, or one per --control: {len(s.control)} --control, "
                          f"{len(scales)} --control-scale")
    for v in scales:
        check_scale(v, "--control-scale")
    check_window(s.control_start, s.control_end)
    if not 0 <= s.canny_low <= s.canny_high:
        raise ConfigError(f"--canny-low must be between 0 and --canny-high, got {s.canny_low} and {s.canny_high}")
    if "depth" in s.control and not s.depth_model:
        raise ConfigError("--control depth needs --depth-model PATH_OR_ID (a transformers depth-estimation model "
                          "folder, or an id in your Hugging Face cache)")


def controlnet_sources(s: cfg.Settings) -> list[str]:
    """The ControlNet of each `--control`: `--controlnet` in order, else the model's bundled net for that kind."""
    if s.controlnet:
        return list(s.controlnet)
    bundled = cfg.bundled_controlnets(model_folder(s.model))
    missing = [k for k in s.control if k not in bundled]
    if missing:
        have = f" (it bundles: {', '.join(sorted(bundled))})" if bundled else ""
        raise ConfigError(f"the model bundles no ControlNet for --control {missing[0]!r}{have}; pass --controlnet "
                          "PATH_OR_ID for it")
    return [bundled[k] for k in s.control]


def structure_control(s: cfg.Settings, pipe, frames):
    """The settings' structure condition for the source `frames` (f, h, w, 3): `(StructureControl, [(label,
    maps)])`, or `(None, [])` without `--control`."""
    if not cfg.controlled(s):
        return None, []
    from .structure import build_control

    return build_control(frames, s.control, controlnet_sources(s), control_scales(s), s.control_start,
                         s.control_end, pipe.unet.unet.config, device=pipe.unet.device, dtype=pipe.unet.dtype,
                         depth_model=s.depth_model, canny_thresholds=(s.canny_low, s.canny_high),
                         maps_sampling={"stride": s.stride, "start": s.start}, guess_mode=s.guess_mode)


def _write_control_maps(made, out: Path, fps: float) -> list[str]:
    from .video import write_mp4

    (out / "control").mkdir(exist_ok=True)
    names = []
    for i, (label, maps) in enumerate(made, 1):
        name = f"control/{i:02d}-{_slug(label)}.mp4"
        write_mp4(maps, out / name, fps)
        names.append(name)
    return names


def _control_record(s: cfg.Settings, control, files: list[str], command: str) -> dict:
    tuned = s.steps > 0 and not (command == cfg.EDIT and s.adapter)  # an adapter reused: no tuning here
    record = {"control": list(s.control), "controlnet": controlnet_sources(s), **control.record(),
              "tuning": s.control_tuning and tuned, "maps": files}
    if command == cfg.EDIT:
        record["inversion"] = s.control_inversion
    return record


# ---------------------------------------------------------------------------------------------- folders
def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "run"


def _run_folder(s: cfg.Settings, command: str, root: Path | str = "outputs") -> Path:
    if s.out:
        final = Path(s.out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = s.target_prompt[0] if command == cfg.EDIT else "adapter-" + s.source_prompt
        final = Path(root) / f"{stamp}-{_slug(label)}"
        n = 2
        while final.exists() or _partial(final).exists():
            final = final.with_name(f"{stamp}-{_slug(label)}-{n}")
            n += 1
    partial = _partial(final)
    if final.exists() and not s.overwrite:
        raise ConfigError(f"run folder {final} already exists; pass --overwrite to replace it, or another --out")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"--out {final} is a file, not a folder")
    if s.resume and not partial.is_dir():
        raise ConfigError(f"--resume: no interrupted run at {partial}; run without --resume to start")
    return final


def _partial(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


class Staging:
    """`<out>.partial/` while a run is built: locked from `__enter__` (before the model loads) to the end, renamed
    to `<out>` by `commit`.

    On entry, another live run's folder is refused ("another ei2 run (PID n) is writing ..."); a folder left by
    a dead run is "interrupted": it needs `resume` (continue it) or `overwrite` (empty it). On failure the
    folder is removed only if this process started it (no `resume`) and nothing resumable exists yet (a tuning
    checkpoint or a finished adapter); otherwise it stays as it is, and an interruption says how to go on.
    """

    def __init__(self, final: Path, resume: bool, overwrite: bool = False):
        self.final, self.path, self.resume, self.overwrite = final, _partial(final), resume, overwrite
        self.created_parents: list[Path] = []
        self.lock = FolderLock(self.path)

    def __enter__(self) -> "Staging":
        parent = self.path.parent
        while not parent.exists():
            self.created_parents.append(parent)
            parent = parent.parent
        try:
            self.lock.acquire()
        except FolderBusyError as e:
            owner = f" (PID {e.pid})" if e.pid else ""
            raise ConfigError(f"another ei2 run{owner} is writing {self.final}; wait for it or choose another --out") \
                from None
        except OSError as e:
            self._remove_created_parents()
            raise file_system_error(e, self.path) from e
        try:
            self._check_state()
        except BaseException:
            if self.lock.created:
                shutil.rmtree(self.path, ignore_errors=True)
                self._remove_created_parents()
            self.lock.release()
            raise
        self.lock.write_pid()
        return self

    def _check_state(self) -> None:
        held = [p for p in self.path.iterdir() if p.name != FolderLock.PID_FILE]
        if self.resume:
            if not self.resumable():
                raise ConfigError(f"--resume: nothing to resume in {self.path} (no tuning checkpoint and no finished "
                                  "adapter); start over with --overwrite")
        elif held:
            if not self.overwrite:
                raise ConfigError(f"{self.path} holds an interrupted run; pass --resume to continue it or --overwrite "
                                  "to start over")
            for p in held:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def resumable(self) -> str | None:
        """What `resume` would continue from: "adapter" (tuning finished), "checkpoint", or None."""
        from .models.video_unet import ADAPTER_CONFIG
        from .tuning import latest_checkpoint

        if (self.path / TUNED_FILE).is_file() and (self.path / "adapter" / ADAPTER_CONFIG).is_file():
            return "adapter"
        return "checkpoint" if latest_checkpoint(self.path / "checkpoints") is not None else None

    def commit(self) -> Path:
        self.lock.forget_pid()
        (self.path / TUNED_FILE).unlink(missing_ok=True)
        return replace_folder(self.path, self.final)

    def __exit__(self, kind, error, tb):
        try:
            if kind is None:
                return False
            kept = self.resumable()
            if self.resume or kept:
                if kept and not isinstance(error, EI2Error):  # an interruption: say how to go on
                    what = "the tuned adapter" if kept == "adapter" else "tuning checkpoints"
                    print(f"ei2: {what} kept in {self.path}; continue with the same command and --resume",
                          file=sys.stderr)
                return False
            shutil.rmtree(self.path, ignore_errors=True)
            self._remove_created_parents()
            return False
        finally:
            self.lock.release()

    def _remove_created_parents(self) -> None:
        for parent in self.created_parents:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()


def file_system_error(error: OSError, where: Path) -> FileSystemError:
    """One line for a file-system failure the user can act on, naming the path and what to do."""
    path = error.filename or where
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space there or choose another --out"
    elif error.errno == errno.EROFS:
        advice = "the file system is read-only; choose another --out"
    else:
        advice = "choose an --out in a folder you can write to"
    return FileSystemError(f"cannot write {path}: {error.strerror or error}; {advice}")


@contextlib.contextmanager
def _file_system_errors(where: Path):
    """Turn a file-system failure (permission, no space, read-only) met while writing `where` into one line."""
    try:
        yield
    except EI2Error:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or a library's wrapper of one (safetensors)
        problem = file_system_problem(e)
        if problem is None:
            raise
        raise file_system_error(problem, where) from e


def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"ei2": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "av", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def cache_dir() -> Path:
    """The inversion cache's folder: `$EI2_CACHE_DIR/inversions`, else `$XDG_CACHE_HOME/ei2/inversions`."""
    if os.environ.get("EI2_CACHE_DIR"):
        return Path(os.environ["EI2_CACHE_DIR"]) / "inversions"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ei2" / "inversions"




# ---------------------------------------------------------------------------------------------- progress
class _Reporter:
    """Routes the pipeline's bars (inversion, editing, null-text inversion) to `progress`, through the pipeline's
    progress callback; `stage` names the current edit ("edit 2/3") so its sampling bar reports under that name."""

    def __init__(self, pipe, progress: Progress | None):
        self.pipe, self.progress, self.stage = pipe, progress, None

    def __enter__(self):
        if self.progress is not None:
            self.pipe.set_progress_callback(self._bar_step)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.pipe.set_progress_callback(None)
        return False

    def _bar_step(self, desc: str, step: int, total: int) -> None:
        self.progress(self.stage if (self.stage and desc == "editing") else desc, step, total)

    def __call__(self, stage: str, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, step, total)


# ---------------------------------------------------------------------------------------------- stages
def model_folder(model: str | None) -> Path | None:
    """The local folder of `model` (None: the embedded Shapes model) whose `ei2_defaults.json` applies; None for
    a hub id."""
    from .loading import default_model_path

    folder = default_model_path() if model is None else Path(model)
    return folder if folder.is_dir() else None


def _prepare(s: cfg.Settings, command: str, timings: dict):
    """Load the model, then read the video at the model's size; nothing is written yet."""
    import torch

    from .pipeline import EI2Pipeline
    from .video import read_video

    s.model_defaults = cfg.apply_model_defaults(s, model_folder(s.model), command)
    if s.model_defaults:
        validate(s, command)
    torch.manual_seed(s.seed)
    t = time.perf_counter()
    pipe = EI2Pipeline.from_pretrained(
        s.model, recipe=s.recipe, adapter=s.adapter if command == cfg.EDIT else None, device=s.device, dtype=s.dtype,
        inversion_cache_dir=cache_dir(),
    )
    pipe.set_progress_bar_config(disable=s.quiet)
    timings["load_s"] = round(time.perf_counter() - t, 3)
    height = s.height or pipe.default_size
    width = s.width or pipe.default_size
    t = time.perf_counter()
    video = read_video(s.video, None if s.frames == "all" else s.frames, s.stride, s.start, (height, width))
    timings["read_video_s"] = round(time.perf_counter() - t, 3)
    if video.num_frames < s.window and "window" in s.explicit:
        raise ConfigError(f"video has {video.num_frames} frames; --window {s.window} needs at least {s.window} "
                          f"(pass a smaller --window, or no --window to edit it in one piece)")
    configure(pipe, s)
    return pipe, video, (height, width)


def configure(pipe, s: cfg.Settings) -> None:
    """The pipeline-wide options of the settings: windows of long videos, the inversion's noise regularisation."""
    from .inversion import NoiseRegularization

    pipe.set_windowing(s.window, anchors=s.anchor_frames)
    pipe.set_noise_regularization(NoiseRegularization(seed=s.seed) if s.noise_regularization else None)


def _tune(s: cfg.Settings, pipe, latents, staging: Staging, timings: dict, record: dict,
          report: Progress | None = None, control=None) -> None:
    """Tune (from the latest checkpoint with `resume`) and save the adapter in the staging folder, with what it was
    tuned on (`TUNED_FILE`); a resumed run whose tuning had finished loads that adapter instead of tuning again."""
    from .tuning import across_processes

    tuned_on = _tuned_on(s, record, control)
    if s.resume and staging.resumable() == "adapter":
        saved = json.loads((staging.path / TUNED_FILE).read_text())
        changed = [key for key in tuned_on if saved["tuned_on"].get(key) != tuned_on[key]]
        if changed:
            raise ConfigError(f"--resume: the adapter in {staging.path} was tuned with another "
                              f"{', '.join(changed)}; use the settings of the interrupted run (or start over with "
                              "--overwrite)")
        pipe.load_adapter(staging.path / "adapter")
        record["tuning"] = {**saved["tuning"], "reloaded": True}
        timings.update(saved["timings"])
        return
    if report is not None:
        report("tuning", 0, s.steps)
    with across_processes():  # under `accelerate launch`, the processes share the steps (`ei2.tuning`)
        result = tune_on(s, pipe, latents, control, staging.path / "checkpoints",
                         s.resume and staging.resumable() == "checkpoint", report)
    timings["tune_s"] = round(result.seconds, 3)
    timings["tune_step_s"] = None if result.seconds_per_step is None else round(result.seconds_per_step, 4)
    record["tuning"] = {
        "steps": result.steps, "resumed_from": result.resumed_from,
        "processes": result.processes, "micro_batches": result.micro_batches,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "losses": [round(v, 6) for v in result.losses],
    }
    _save_tuned(s, pipe, staging, tuned_on, record["tuning"],
                {"tune_s": timings["tune_s"], "tune_step_s": timings["tune_step_s"]})


def tune_on(s: cfg.Settings, pipe, latents, control=None, checkpoint_dir: Path | None = None, resume: bool = False,
            report: Progress | None = None):
    """The job layer's tuning stage: `pipe` tuned on the clean source `latents` as the settings say (steps, lr,
    seed, gradient checkpointing, under the structure condition unless --no-control-tuning), with checkpoints in
    `checkpoint_dir` every --checkpoint-every steps; -> `ei2.tuning.TuningResult`. `ei2 tune`, `ei2 edit`, the app
    and the benchmark all tune through it."""
    return pipe.tune(
        latents=latents, source_prompt=s.source_prompt, steps=s.steps, learning_rate=s.lr, seed=s.seed,
        gradient_checkpointing=s.gradient_checkpointing, checkpoint_dir=checkpoint_dir,
        checkpoint_every=s.checkpoint_every if checkpoint_dir is not None else 0, resume=resume,
        callback=None if report is None else (lambda step, loss: report("tuning", step, s.steps)),
        control=control if s.control_tuning else None,
    )


def _save_tuned(s: cfg.Settings, pipe, staging: Staging, tuned_on: dict, tuning: dict | None, times: dict) -> None:
    """The finished adapter and what it was tuned on, then the checkpoints go: the adapter is what resumes now."""
    pipe.save_adapter(staging.path / "adapter")  # `--adapter <out>` finds it there
    write_json(staging.path / TUNED_FILE, {"tuned_on": tuned_on, "tuning": tuning, "timings": times})
    shutil.rmtree(staging.path / "checkpoints", ignore_errors=True)


def _tuned_on(s: cfg.Settings, record: dict, control) -> dict:
    """What a finished adapter depends on: a resumed run must match it to reuse the adapter."""
    return {"video": record["video"]["hash"], "source prompt": s.source_prompt, "model": record["model"]["base_fingerprint"],
            "recipe": record["recipe"], "tuning steps": s.steps, "learning rate": s.lr, "seed": s.seed,
            "window": s.window, "structure condition": control.key() if control is not None and s.control_tuning
            else None}


def _record(s: cfg.Settings, command: str, argv, pipe, video, size, final: Path) -> dict:
    from .video import frames_hash

    settings = s.to_dict()
    settings.update(height=size[0], width=size[1], recipe=pipe.unet.recipe.name, device=str(pipe.unet.device),
                    dtype=pipe.mixed_precision, model=getattr(pipe, "model_source", s.model))
    return {
        "command": command,
        "argv": list(argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_folder": str(final),
        "settings": settings,
        "model_defaults": s.model_defaults,
        "versions": _versions(),
        "seeds": {"seed": s.seed, "tuning_noise_seed": s.seed},
        "video": {"path": str(video.path), "frames": video.num_frames, "fps": video.fps, "hash": frames_hash(video.frames),
                  "height": size[0], "width": size[1]},
        "model": {"source": settings["model"], "base_fingerprint": str(pipe.unet.base_fingerprint)},
        "recipe": pipe.unet.recipe.to_dict(),
        "windowing": pipe.windowing.record(video.num_frames),
        "prompts_truncated": _prompts_truncated(s, command, pipe),
    }


def _load(s: cfg.Settings, command: str, argv, progress: Progress | None, say: Say, timings: dict, final: Path):
    """A job's opening, in its locked folder: the model and the video (the "load" stage), the run record (with
    a warning for each prompt too long) and the structure condition with its maps."""
    if progress is not None:
        progress("load", 0, 1)
    pipe, video, size = _prepare(s, command, timings)
    if progress is not None:
        progress("load", 1, 1)
    record = _record(s, command, argv, pipe, video, size, final)
    _warn_truncated(record, pipe, say)
    control, made = structure_control(s, pipe, video.frames)
    return pipe, video, size, record, control, made


def _prompts_truncated(s: cfg.Settings, command: str, pipe) -> dict[str, int]:
    """The prompts longer than the text encoder takes, with how many tokens of each are dropped."""
    prompts = [s.source_prompt] + (list(s.target_prompt) + [s.negative_prompt or ""] if command == cfg.EDIT else [])
    return {p: n for p in prompts if p and (n := pipe.prompt_overflow(p))}


def _warn_truncated(record: dict, pipe, say: Say) -> None:
    for prompt, n in record["prompts_truncated"].items():
        say(f"{WARNING}the prompt {prompt!r} is {n} token(s) longer than the text encoder takes "
            f"({pipe.tokenizer.model_max_length}, with its start and end tokens); they are dropped")


def _frames_phrase(pipe, video) -> str:
    """"8 frames", or "40 frames (clips of 8)" for a windowed video."""
    frames = f"{video.num_frames} frame{'s' if video.num_frames != 1 else ''}"
    if pipe.windowed(video.num_frames):
        return f"{frames} (clips of {pipe.windowing.window})"
    return frames


def _noop(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- jobs
@contextlib.contextmanager
def _process(s: cfg.Settings, progress: Progress | None, say: Say | None):
    """This process's part of a job: (rank, world, progress, say). Under `accelerate launch` the device is the
    process's own; a process other than rank 0 computes its share (tuning micro-batches, windows) quietly in a
    scratch folder it removes after, and rank 0 alone writes the run."""
    import tempfile

    from .distributed import init_distributed

    say = say or _noop
    rank, world, s.device = init_distributed(s.device)
    if not rank:
        yield rank, world, progress, say
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"ei2-rank{rank}-"))
    s.out, s.overwrite, s.resume, s.quiet = str(scratch / "run"), True, False, True
    try:
        yield rank, world, None, _noop
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tune(s: cfg.Settings, argv=(), progress: Progress | None = None, say: Say | None = None,
         root: Path | str = "outputs") -> Path:
    """`ei2 tune`: tune on the video and write the adapter folder (with run.json); returns that folder.

    `s` must have passed `validate(s, "tune")`; `root` holds the new folder when `s.out` is not set.
    Under `accelerate launch --multi_gpu --num_processes N` every process tunes its share of each step
    (`ei2.tuning`); rank 0 alone writes the folder and the others wait for it at a barrier.
    """
    with _process(s, progress, say) as (rank, world, progress, say):
        return _tune_job(s, argv, progress, say, root, rank, world)


def _tune_job(s: cfg.Settings, argv, progress: Progress | None, say: Say, root, rank: int, world: int) -> Path:
    from .distributed import barrier

    final = _run_folder(s, cfg.TUNE, root)
    t0 = time.perf_counter()
    timings: dict = {}
    with _file_system_errors(final), Staging(final, s.resume, s.overwrite) as staging:
        pipe, video, size, record, control, made = _load(s, cfg.TUNE, argv, progress, say, timings, final)
        if control is not None:
            record["control"] = _control_record(s, control, _write_control_maps(made, staging.path, video.fps),
                                                cfg.TUNE)
        shared = f", {world} processes" if world > 1 else ""
        say(f"tuning {s.steps} steps on {_frames_phrase(pipe, video)} of {size[1]}x{size[0]} "
            f"(recipe {pipe.unet.recipe.name}, {pipe.unet.device}{shared})")
        latents = pipe.encode_frames(video.frames)
        _tune(s, pipe, latents, staging, timings, record, progress, control)  # checkpoints: rank 0's only
        if rank == 0:
            timings["total_s"] = round(time.perf_counter() - t0, 3)
            record["timings"] = timings
            record["adapter"] = {"path": str(final), "hash": pipe.adapter_hash()}
            write_json(staging.path / RUN_FILE, record)
            staging.commit()
    barrier(world)  # the other processes end once the adapter is written
    say(f"adapter written to {final}")
    return final


def edit(s: cfg.Settings, argv=(), progress: Progress | None = None, say: Say | None = None,
         root: Path | str = "outputs") -> Path:
    """`ei2 edit`: tune (or reuse `s.adapter`), invert, edit every target prompt, write the run folder.

    The folder holds `adapter/` (unless reused), `edits/NN-<prompt>.mp4|.gif`, `source.*`, `grid.*` and
    `run.json`; returns it. `s` must have passed `validate(s, "edit")`.
    """
    with _process(s, progress, say) as (rank, world, progress, say):
        return _edit(s, argv, progress, say, root, world)


def _edit(s: cfg.Settings, argv, progress: Progress | None, say: Say, root, world: int) -> Path:
    final = _run_folder(s, cfg.EDIT, root)
    t0 = time.perf_counter()
    timings: dict = {}
    with _file_system_errors(final), Staging(final, s.resume, s.overwrite) as staging:
        pipe, video, size, record, control, made = _load(s, cfg.EDIT, argv, progress, say, timings, final)
        record["windowing"]["processes"] = world
        p2p = check_control(s, pipe)
        with _Reporter(pipe, progress) as report:
            _edit_stages(s, pipe, video, size, record, timings, t0, staging, report, say, p2p, control, made)
    say(f"wrote {len(s.target_prompt)} edit(s) to {final}")
    return final


def _edit_stages(s: cfg.Settings, pipe, video, size, record: dict, timings: dict, t0: float, staging: Staging,
                 report: "_Reporter", say: Say, p2p, control, made) -> None:
    """Tuning (or the reused adapter), inversion, the edits and the files of an edit run, in the locked folder."""
    from .distributed import broadcast_parameters
    from .video import write_gif, write_mp4

    fps = s.fps or video.fps
    out = staging.path
    if control is not None:
        record["control"] = _control_record(s, control, _write_control_maps(made, out, fps), cfg.EDIT)
    latents = pipe.encode_frames(video.frames)
    if s.adapter:
        say(f"using adapter {s.adapter} (recipe {pipe.unet.recipe.name}); no tuning")
        record["adapter"] = {"path": str(s.adapter), "hash": pipe.adapter_hash(), "reused": True}
    else:
        if s.steps:
            say(f"tuning {s.steps} steps on {_frames_phrase(pipe, video)} of {size[1]}x{size[0]} "
                f"(recipe {pipe.unet.recipe.name}, {pipe.unet.device})")
            _tune(s, pipe, latents, staging, timings, record, report.progress, control)
            broadcast_parameters([p for _, p in pipe.unet.trainable_parameters()])
        else:
            _save_tuned(s, pipe, staging, _tuned_on(s, record, control), None, {})
        record["adapter"] = {"path": "adapter", "hash": pipe.adapter_hash(), "reused": False}

    t = time.perf_counter()
    inversion_control = control if s.control_inversion else None
    cached = pipe.is_inverted(latents, s.source_prompt, s.inference_steps, inversion_control, s.strength)
    steps_run = sampling(s).steps_run  # the DDIM steps each edit samples
    inverted = None
    if not s.null_text:  # null-text inversion runs (cached) in the first edit
        report("inversion", 0, s.inference_steps)
        inverted = pipe.invert(latents=latents, prompt=s.source_prompt, num_inference_steps=s.inference_steps,
                               strength=s.strength, control=inversion_control)
        report("inversion", s.inference_steps, s.inference_steps)
    timings["invert_s"] = round(time.perf_counter() - t, 3)
    record["inversion"] = {"prompt": s.source_prompt, "steps": s.inference_steps, "cached": cached,
                           "null_text": s.null_text, "strength": s.strength,
                           "noise_regularization": None if pipe.noise_regularization is None
                           else dataclasses.asdict(pipe.noise_regularization),
                           "sampled_steps": steps_run}
    if p2p is not None:
        record["p2p"] = p2p.to_dict()
    injection = injection_config(s)
    if injection.active(steps_run):
        record["injection"] = injection.to_dict()

    edits, edited, timings["edit_s"] = [], [], []
    shutil.rmtree(out / "edits", ignore_errors=True)  # a resumed run's unfinished edits are made again
    (out / "edits").mkdir()
    for i, prompt in enumerate(s.target_prompt, 1):
        t = time.perf_counter()
        say(f"edit {i}/{len(s.target_prompt)}: {prompt!r}")
        report.stage = f"edit {i}/{len(s.target_prompt)}"
        report(report.stage, 0, steps_run)
        stem = f"{i:02d}-{_slug(prompt)}"
        frames, extra = edit_one(s, pipe, latents, prompt, p2p, out / "edits" / stem, control, inverted)
        timings["edit_s"].append(round(time.perf_counter() - t, 3))
        write_mp4(frames, out / "edits" / f"{stem}.mp4", fps)
        write_gif(frames, out / "edits" / f"{stem}.gif", fps)
        edits.append({"prompt": prompt, "mp4": f"edits/{stem}.mp4", "gif": f"edits/{stem}.gif", **extra})
        edited.append(frames)
        report(report.stage, steps_run, steps_run)
    report.stage = None

    report("write", 0, 1)
    _write_edit_run(s, video.frames, made, edited, edits, fps, record, timings, t0, staging)
    report("write", 1, 1)


def _write_edit_run(s: cfg.Settings, frames, made, edited, edits: list[dict], fps: float, record: dict,
                    timings: dict, t0: float, staging: Staging) -> None:
    """The source, the side-by-side grid (source, condition maps, edits) and run.json; then the folder is final."""
    import numpy as np

    from .video import make_grid, write_gif, write_mp4

    t = time.perf_counter()
    out = staging.path
    write_mp4(frames, out / "source.mp4", fps)
    write_gif(frames, out / "source.gif", fps)
    grid = make_grid([frames, *(m for _, m in made), *edited],
                     ["source: " + s.source_prompt, *(f"control: {label}" for label, _ in made), *s.target_prompt])
    write_mp4(np.ascontiguousarray(grid), out / "grid.mp4", fps)
    write_gif(grid, out / "grid.gif", fps)
    timings["write_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    record["timings"] = timings
    record["outputs"] = {"edits": edits, "source": ["source.mp4", "source.gif"], "grid": ["grid.mp4", "grid.gif"],
                         "adapter": record["adapter"]["path"]}
    write_json(out / RUN_FILE, record)
    staging.commit()


def edit_one(s: cfg.Settings, pipe, latents, prompt: str, p2p, stem: Path, control=None, inverted=None):
    """One target prompt -> (frames (f, h, w, 3) uint8, extra run.json entries of this edit): the job layer's one
    edit, which every front end reaches, through the pipeline's one dispatcher (`EI2Pipeline.edit`) from the clean
    source `latents` (`inverted`: their inversion at the settings' strength, if made; else from the cache).
    `control`: the structure condition (`structure_control`), on every branch. --save-attention's grid is written
    beside the edit (`stem`)."""
    from .control import save_attention_grid, word_token_indices

    result = pipe.edit(None, s.source_prompt, [prompt], source_latents=latents, inverted=inverted,
                       sampling=sampling(s), p2p=p2p,
                       null_text=s.null_text, injection=injection_config(s), record_attention=bool(s.save_attention),
                       control=control, control_inversion=s.control_inversion)
    extra = {}
    if s.save_attention and any(word_token_indices(pipe.tokenizer, p, s.save_attention) for p in result.prompts):
        path = stem.with_name(f"{stem.name}.attention-{_slug(s.save_attention)}.png")
        save_attention_grid(result.attention, pipe.tokenizer, result.prompts, s.save_attention, path)
        extra["attention"] = f"edits/{path.name}"
    return result.frames[0], extra


def injection_config(s: cfg.Settings):
    """The structure-preserving injection of the settings (`--inject-*`); bad values are a ConfigError."""
    from .control import InjectionConfig

    return InjectionConfig(features=s.inject_features, attention=s.inject_attention, block=s.inject_block)


def _p2p_config(s: cfg.Settings):
    """The Prompt-to-Prompt options given, as a `P2PConfig` (None without --p2p); bad values are a ConfigError."""
    from .control import P2PConfig, parse_cross_replace, parse_reweight

    given = {"cross_replace": parse_cross_replace(s.cross_replace) if s.cross_replace else None,
             "self_replace": s.self_replace, "reweight": parse_reweight(s.reweight) if s.reweight else None,
             "blend_words": tuple(s.blend_words) or None, "blend_threshold": s.blend_threshold}
    given = {k: v for k, v in given.items() if v is not None}
    if s.p2p is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags} need --p2p replace, refine or reweight")
        return None
    return P2PConfig(s.p2p, **given)


def check_control(s: cfg.Settings, pipe):
    """The settings' Prompt-to-Prompt control (`P2PConfig`, None without --p2p), its words checked against the
    prompts and the tokenizer before anything is written (and --save-attention's word); bad ones raise P2PError."""
    from .control import build_controller, word_token_indices
    from .control.words import P2PError

    steps_run = sampling(s).steps_run
    p2p = _p2p_config(s)
    if p2p is not None:
        build_controller(p2p, pipe.tokenizer, s.source_prompt, s.target_prompt, steps_run)
    blocks = len(pipe.unet.unet.up_blocks)
    if injection_config(s).active(steps_run) and s.inject_block >= blocks:
        raise P2PError(f"--inject-block {s.inject_block}: this model's decoder has blocks 0..{blocks - 1}")
    if s.save_attention and not any(word_token_indices(pipe.tokenizer, p, s.save_attention)
                                    for p in [s.source_prompt, *s.target_prompt]):
        raise P2PError(f"--save-attention word {s.save_attention!r} is in no prompt; use a word of the source "
                       "or a target prompt")
    return p2p

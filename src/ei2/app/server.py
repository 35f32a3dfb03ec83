"""The gradio app of `ei2 serve`: one form, one queue, one run folder per job (`ei2.runs.edit`).

Layout of the output folder `out/`:

    runs/<stamp>-<prompt>/     ordinary run folders, as `ei2 edit` writes them (never served)
    uploads/<sha256>.<ext>     uploaded videos, named by content (so "reuse tuning" can recognise them; never served)
    adapters.json              tuning settings -> adapter folder, for "reuse tuning" (never served)
    .gradio/files/             gradio's uploads and cache (under seeded content hashes), the bundled samples
                               (samples/) and the files of each finished job (jobs/<random token>/<run>/):
                               the only folder served
    .gradio/examples/          gradio's examples cache (unused)

Nothing is served from `allowed_paths`: gradio serves only its own folder, where a job's files lie under a
random 128-bit token that only the page that ran the job is given.
"""
from __future__ import annotations

import hashlib
import html
import inspect
import json
import math
import os
import re
import secrets
import shutil
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path

import gradio as gr

from .. import config as cfg
from .. import runs
from ..cpu import use_free_cores
from ..errors import ConfigError, EI2Error
from ..files import FolderLock, write_json
from . import FILES

UPLOAD = "upload"
VIDEO_TYPES = (".mp4", ".mov", ".webm", ".gif", ".avi", ".mkv", ".m4v")
P2P_OFF = "off"
CONTROL_OFF = "off"  # no structure condition
CSS = """
#ei2-status { min-height: 7em; }
#ei2-status .ei2-now { font-weight: 600; margin-bottom: 4px; }
#ei2-status .ei2-bar { font-family: ui-monospace, monospace; white-space: pre; }
#ei2-status .ei2-error { color: #b91c1c; font-weight: 600; }
.ei2-note { background: #fef3c7; border-left: 4px solid #d97706; padding: 6px 10px; border-radius: 4px; }
#ei2-grid video, #ei2-edits video, #ei2-edits img, #ei2-preview video { image-rendering: pixelated; }
#ei2-grid video { width: 100%; height: auto; max-height: none; }
#ei2-edits .caption-label { white-space: normal !important; overflow: visible !important; text-overflow: clip !important;
                            max-width: calc(100% - 16px) !important; }
#ei2-downloads .label-clear-button, #ei2-downloads td:has(> .label-clear-button) { display: none !important; }
@media (min-width: 1000px) {  /* the results beside the long form stay in view while it scrolls */
  #ei2-results { position: sticky; top: 8px; align-self: flex-start; max-height: calc(100vh - 16px);
                 overflow-y: auto; flex-wrap: nowrap !important; }
  #ei2-results > * { flex-shrink: 0; }
}
#ei2-stage .ei2-stage { display: flex; gap: 16px; align-items: center; padding: 28px 20px; min-height: 160px;
                        border: 1px dashed #a5b4fc; border-radius: 8px; }
#ei2-stage .ei2-stage-text { flex: 1; }
#ei2-stage .ei2-stage-now { font-size: 1.15em; font-weight: 600; margin-bottom: 10px; }
#ei2-stage .ei2-meter { height: 10px; background: #e0e7ff; border-radius: 5px; overflow: hidden; }
#ei2-stage .ei2-meter div { height: 100%; background: #6366f1; transition: width 0.4s; }
#ei2-stage .ei2-spinner { width: 28px; height: 28px; border: 4px solid #e0e7ff; border-top-color: #6366f1;
                          border-radius: 50%; animation: ei2-spin 0.9s linear infinite; }
@keyframes ei2-spin { to { transform: rotate(360deg); } }
.gradio-container { overflow: visible !important; }  /* its `hidden` would keep the results from sticking */
footer { display: none !important; }
"""
# The one table of the page's words: each `ei2 edit` flag the form sets -> the label of its control. The job layer
# (`runs`, `config`) raises its errors in the CLI's words; `page_words` renders them with these labels, and
# `blocks()` labels the controls with them, so that an error names the field as the page shows it.
FIELDS = {
    "--source-prompt": "Source prompt", "--target-prompt": "Target prompts", "--recipe": "Recipe",
    "--frames": "Frames", "--steps": "Tuning steps", "--inference-steps": "Inference steps",
    "--guidance-scale": "Guidance scale", "--seed": "Seed", "--strength": "Edit strength",
    "--guidance-rescale": "Guidance rescale", "--negative-prompt": "Negative prompt", "--p2p": "Prompt-to-Prompt",
    "--cross-replace": "Cross replace", "--self-replace": "Self replace", "--reweight": "Reweight",
    "--blend-words": "Blend words", "--blend-threshold": "Blend threshold", "--inject-features": "Inject features",
    "--inject-attention": "Inject attention", "--inject-block": "Decoder block", "--control": "Condition",
    "--control-scale": "Condition scale",
}
_FLAG = re.compile(r"--[a-z0-9]+(?:-[a-z0-9]+)*")
_FLAG_VALUE = re.compile(r"""(--[a-z0-9]+(?:-[a-z0-9]+)*) ("[^"]*"|'[^']*')""")  # --target-prompt "a panda ..."
# the command line's verb for giving a value, where the value goes into a control of the form
_PASS = re.compile(r"\bpass (?=one or more\b|(?:%s)\b)" % "|".join(map(re.escape, FIELDS)))


def page_words(message: str) -> str:
    """A message in the CLI's words, rendered in the page's (`FIELDS`): `--target-prompt` -> "Target prompts",
    `--target-prompt "a panda"` -> `"a panda" in Target prompts`, "pass one or more" -> "type one or more".
    Flags the form has no control for (`ei2 serve --max-steps`) stay as they are."""
    message = _PASS.sub("type ", message)
    message = _FLAG_VALUE.sub(lambda m: f"{m[2]} in {FIELDS[m[1]]}" if m[1] in FIELDS else m[0], message)
    return _FLAG.sub(lambda m: FIELDS.get(m[0], m[0]), message)


HEX = re.compile(r"[0-9a-f]{64}")  # a folder of gradio's uploads (a seeded sha256 of the content)
PRUNED = {"runs": "run", "uploads": "upload", "inversion-cache entries": "inversion-cache entry",
          "interrupted runs": "interrupted run"}  # what --keep-runs removes: plural -> singular


class JobCancelled(EI2Error):
    """Raised from the progress callback of a job whose page was closed; `runs` then removes its staging folder."""


def log(message: str) -> None:
    print(f"ei2 serve: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _number(value, name: str, whole: bool = True) -> int | float:
    """A number box's value; an emptied box or a non-number is the one-line `ConfigError` (in the CLI's words:
    `name` is the flag, which `page_words` renders as the box's label)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name} is empty; type a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if whole:
        if not number.is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # run folders are never changed once written
    except OSError:
        shutil.copyfile(source, target)


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a temporary file beside it: `target` is whole or absent."""
    from ..files import atomic_path

    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _optional_float(text, name: str) -> float | None:
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None


def _words(text) -> list[str]:
    return [w for w in str(text or "").replace(",", " ").split() if w]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


STAGE_NAMES = {"waiting": "waiting for the previous job", "load": "loading the model", "write": "writing videos"}


class _Progress:
    """Collects `runs` progress (stage, step, total) from the job thread, with when each stage started and last
    moved; renders it as HTML: a line saying what runs now (stage, step of total, elapsed, time left in the stage
    at its pace so far), a bar per stage with its time, and the job's last messages."""

    def __init__(self, root: Path | None = None, clock=time.monotonic):
        self.root = root  # paths under it are shown relative to it: the page does not show the server's folders
        self.clock = clock
        self.stages: dict[str, tuple[int, int]] = {}
        self.times: dict[str, list[float]] = {}  # stage -> [started, last moved]
        self.paced: dict[str, tuple[float, int]] = {}  # stage -> (time, step) of its first step
        self.lock = threading.Lock()
        self.messages: list[str] = []
        self.cancel = threading.Event()  # set when the page that runs the job is closed
        self.last = ("waiting", 0, 0)
        self.started = clock()
        self.finished: float | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if self.cancel.is_set():  # runs.edit calls this at every step: the job stops at its next one
            raise JobCancelled(f"the page of this job was closed; cancelled at {stage} {step}/{total}")
        now = self.clock()
        with self.lock:
            self.times.setdefault(stage, [now, now])[1] = now
            if step >= 1 and stage not in self.paced:
                self.paced[stage] = (now, step)  # the first step includes the stage's set-up: pace counts after it
            self.stages[stage] = (step, total)
            self.last = (stage, step, total)

    def done(self) -> None:
        with self.lock:
            self.finished = self.clock()

    def gradio_args(self) -> tuple:
        """The last event as `gr.Progress` arguments: ((step, total), desc) for a stage that counts steps, else a
        fraction with the stage's name ("loading the model", "writing videos")."""
        with self.lock:
            stage, step, total = self.last
        if stage in STAGE_NAMES:
            return (1.0 if total and step >= total else 0.0), STAGE_NAMES[stage]
        return (step, total), stage

    def say(self, message: str) -> None:
        if self.root is not None:
            message = message.replace(str(self.root) + os.sep, "")
        with self.lock:
            self.messages.append(message)

    def _left(self, stage: str, step: int, total: int, now: float) -> float | None:
        """Seconds left in `stage` at its pace since its first step; None before two steps."""
        if stage not in self.paced or step <= self.paced[stage][1] or step >= total:
            return None
        first, first_step = self.paced[stage]
        moved = self.times[stage][1]
        return (moved - first) / (step - first_step) * (total - step) - (now - moved)

    def now_line(self) -> str:
        """What runs now, in words: "tuning: step 12 of 100 · 0:24 · about 1:10 left in this stage"."""
        now = self.clock()
        with self.lock:
            stage, step, total = self.last
            elapsed = (self.finished or now) - self.started
            left = self._left(stage, step, total, now)
        if self.finished is not None:
            return f"finished in {_clock(elapsed)}"
        what = STAGE_NAMES.get(stage, stage)
        if stage not in STAGE_NAMES and total:
            what += f": step {step} of {total}"
        estimate = "" if left is None else f" · about {_clock(max(left, 0))} left in this stage"
        return f"{what} · {_clock(elapsed)} so far{estimate}"

    def stage_html(self) -> str:
        """The stage card shown in the grid's place while the job runs: what runs now, a bar of its steps and its
        times (`now_line`), under a spinner."""
        with self.lock:
            stage, step, total = self.last
        fraction = min(step / total, 1.0) if total else 0.0
        return (f"<div class='ei2-stage'><div class='ei2-spinner'></div><div class='ei2-stage-text'>"
                f"<div class='ei2-stage-now'>{html.escape(self.now_line())}</div>"
                f"<div class='ei2-meter'><div style='width: {100 * fraction:.1f}%'></div></div></div></div>")

    def html(self, header: str = "") -> str:
        with self.lock:
            stages, messages, times = dict(self.stages), list(self.messages), dict(self.times)
        lines = []
        for stage, (step, total) in stages.items():
            took = _clock(times[stage][1] - times[stage][0]) if stage in times else ""
            if stage in ("load", "write"):
                lines.append(f"{'✓' if step >= total else '…'} {STAGE_NAMES[stage]:<18} {took:>5}")
                continue
            width = 24
            filled = int(width * step / total) if total else width
            lines.append(f"{stage:<20} {'█' * filled}{'░' * (width - filled)} {step}/{total} {took:>5}")
        body = html.escape("\n".join(lines))
        notes = "".join(f"<div>{html.escape(m)}</div>" for m in messages[-3:])
        return (f"<div class='ei2-now'>{html.escape(self.now_line())}</div>{header}"
                f"<div class='ei2-bar'>{body}</div>{notes}")


class App:
    def __init__(self, model: str | None, out: Path, max_upload_mb: float, max_frames: int, device: str,
                 max_steps: int = 500, max_inference_steps: int = 100, max_prompts: int = 4,
                 keep_runs: int | None = None):
        self.model, self.out, self.device = model, Path(out), device
        self.max_upload_bytes, self.max_frames = int(max_upload_mb * 1024 * 1024), int(max_frames)
        self.max_steps, self.max_inference_steps = int(max_steps), int(max_inference_steps)
        self.max_prompts, self.keep_runs = int(max_prompts), keep_runs
        self.files = self.out.joinpath(*FILES)  # gradio's own folder (GRADIO_TEMP_DIR): the only one served
        for folder in (self.out / "runs", self.out / "uploads", self.files / "jobs", self.files / "samples"):
            folder.mkdir(parents=True, exist_ok=True)
        self.samples = self._copy_samples()
        self.model_dir = self._model_dir()
        self.defaults = cfg.defaults_for(self.model_dir, cfg.EDIT)
        self.index_lock = threading.Lock()
        # gradio's queue runs one job at a time; this lock also holds a job whose page was closed (cancelled at
        # its next step) until it has stopped, so that no two jobs ever overlap
        self.job_lock = threading.Lock()
        self.prune()  # what earlier sessions left beyond --keep-runs

    # ------------------------------------------------------------------------------------------ setup
    def _copy_samples(self) -> dict:
        """The bundled samples (assets/samples/index.json), their videos copied into gradio's folder (samples/)."""
        from ..demo import TARGETS, samples_dir

        index_path = samples_dir() / "index.json"
        if not index_path.is_file():
            return {}
        samples = {}
        for name, entry in json.loads(index_path.read_text()).items():
            source = samples_dir() / entry["video"]
            if not source.is_file():
                continue
            copy = self.files / "samples" / source.name
            if not copy.exists() or copy.stat().st_size != source.stat().st_size:
                _atomic_copy(source, copy)
            samples[name] = {"video": str(copy), "caption": entry["caption"], "frames": int(entry.get("frames", 8)),
                             "target": TARGETS.get(name, "")}
        return samples

    def _model_dir(self) -> Path | None:
        """The model folder whose `ei2_defaults.json` applies, as `runs` finds it (None: a hub id, no defaults)."""
        from ..loading import default_model_path

        model_dir = default_model_path() if self.model is None else Path(self.model)
        return model_dir if model_dir.is_dir() else None

    # ------------------------------------------------------------------------------------------ jobs
    def _video(self, choice: str, upload) -> str:
        if choice and choice != UPLOAD:
            if choice not in self.samples:
                raise ConfigError(f"no bundled sample {choice!r}; choose one of: {', '.join(sorted(self.samples))}")
            return self.samples[choice]["video"]
        if not upload:
            raise ConfigError("no video given; upload a video or pick a bundled sample")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
        if not path.is_file():
            raise ConfigError(f"the upload {path.name} is no longer on the server; upload it again")
        if path.suffix.lower() not in VIDEO_TYPES:
            raise ConfigError(f"{path.name} is not a video this app reads; upload one of: {', '.join(VIDEO_TYPES)}")
        if path.stat().st_size > self.max_upload_bytes:
            raise ConfigError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MB; this app takes uploads up to "
                              f"{self.max_upload_bytes / 2**20:.0f} MB (ei2 serve --max-upload-mb)")
        kept = self.out / "uploads" / f"{_sha256(path)[:16]}{path.suffix.lower()}"
        if kept.is_file() and kept.stat().st_size == path.stat().st_size:
            os.utime(kept)  # used again: the newest for --keep-runs
        else:  # written whole or not at all, so that a copy cut off by a crash is never taken for the video
            _atomic_copy(path, kept)
        return str(kept)

    def settings(self, choice, upload, source_prompt, targets, recipe, steps, inference_steps, guidance, seed,
                 frames, negative_prompt, p2p, cross_replace, self_replace, reweight, blend_words,
                 blend_threshold, inject_features, inject_attention, inject_block, strength=None,
                 guidance_rescale=None, control=None, control_scale=None) -> cfg.Settings:
        """The form as `Settings`, checked as the CLI checks its flags.

        The form shows the model's defaults (`config.defaults_for`); a value left as shown is not given, so
        that the model's defaults and their rules apply as to an `ei2 edit` without that flag (with P2P, the
        model's injection stays off unless the sliders are moved).
        """
        p2p = None if p2p in (None, "", P2P_OFF) else p2p
        control = None if control in (None, "", CONTROL_OFF) else control
        frames = _number(frames, "--frames")
        steps = _number(steps, "--steps")
        inference_steps = _number(inference_steps, "--inference-steps")
        target_prompt = [line.strip() for line in str(targets or "").splitlines() if line.strip()]
        for flag, value, limit, serve_flag in (("--frames", frames, self.max_frames, "--max-frames"),
                                               ("--steps", steps, self.max_steps, "--max-steps"),
                                               ("--inference-steps", inference_steps, self.max_inference_steps,
                                                "--max-inference-steps")):
            if value > limit:
                raise ConfigError(f"{flag} {value} is over this app's limit of {limit} (ei2 serve {serve_flag})")
        if len(target_prompt) > self.max_prompts:
            raise ConfigError(f"{len(target_prompt)} target prompts are over this app's limit of {self.max_prompts} "
                              "per job (ei2 serve --max-prompts)")
        # "off" with a model whose edits take a condition by default is `--control none`
        chosen = [control] if control else ([cfg.NO_CONTROL] if cfg.controlled(self.defaults) else [])
        shown = cfg.defaults_for(self.model_dir, cfg.EDIT, p2p, chosen or None)
        values = dict(
            video=self._video(choice, upload), source_prompt=(source_prompt or "").strip(),
            target_prompt=target_prompt, model=self.model, recipe=recipe or None, frames=frames, steps=steps,
            inference_steps=inference_steps, guidance_scale=_number(guidance, "--guidance-scale",
                                                                    whole=False),
            seed=_number(seed, "--seed"), device=self.device,
            negative_prompt=(negative_prompt or "").strip() or None,
            p2p=p2p, cross_replace=_words(cross_replace),
            self_replace=_optional_float(self_replace, "--self-replace"), reweight=_words(reweight),
            blend_words=_words(blend_words), blend_threshold=_optional_float(blend_threshold, "--blend-threshold"),
            inject_features=_number(inject_features, "--inject-features", whole=False),
            inject_attention=_number(inject_attention, "--inject-attention", whole=False),
            inject_block=_number(inject_block, "--inject-block"), quiet=True,
            strength=shown.strength if strength is None else _number(strength, "--strength", False),
            guidance_rescale=shown.guidance_rescale if guidance_rescale is None
            else _number(guidance_rescale, "--guidance-rescale", whole=False),
            control=chosen,
            control_scale=[str(_number(1.0 if control_scale is None else control_scale,
                                       "--control-scale", whole=False))] if control else [],
        )
        s = cfg.Settings(**values)
        s.explicit = frozenset(k for k, v in values.items()
                               if k not in cfg.MODEL_DEFAULT_KEYS or v != getattr(shown, k))
        cfg.apply_model_defaults(s, self.model_dir, cfg.EDIT)  # as runs does again: the values the job will use
        runs.validate(s, cfg.EDIT)
        return s

    def _tuning_key(self, s: cfg.Settings) -> str:
        video = Path(s.video)
        key = {"model": s.model, "recipe": s.recipe, "steps": s.steps, "lr": s.lr, "seed": s.seed, "frames": s.frames,
               "stride": s.stride, "start": s.start, "height": s.height, "width": s.width, "device": s.device,
               "dtype": s.dtype, "source_prompt": s.source_prompt, "video": _sha256(video),
               "control": s.control if s.control_tuning else [],
               "control_scale": s.control_scale if s.control_tuning else []}
        return json.dumps(key, sort_keys=True)

    def _adapters(self) -> dict:
        path = self.out / "adapters.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return {}

    def find_adapter(self, s: cfg.Settings) -> Path | None:
        """The adapter an earlier job of this app tuned on the same video with the same settings, if any."""
        found = self._adapters().get(self._tuning_key(s))
        if found and Path(found).is_dir():
            return Path(found)
        return None

    def _remember_adapter(self, s: cfg.Settings, adapter: Path) -> None:
        with self.index_lock:
            index = self._adapters()
            index[self._tuning_key(s)] = str(adapter)
            write_json(self.out / "adapters.json", index)

    @staticmethod
    def _argv(s: cfg.Settings) -> list[str]:
        """The `ei2 edit` command line that makes the same run (kept in run.json): a model-default option is
        on it only when the user changed it, so that the model's defaults apply to it as they did here."""
        argv = ["edit", s.video, "--source-prompt", s.source_prompt]
        for p in s.target_prompt:
            argv += ["--target-prompt", p]
        explicit = s.explicit
        for name in ("model", "recipe", "adapter", "frames", "steps", "inference_steps", "guidance_scale", "seed",
                     "device", "negative_prompt", "p2p", "self_replace", "blend_threshold", "inject_features",
                     "inject_attention", "inject_block", "strength", "guidance_rescale", "guidance_rescale_std"):
            value = getattr(s, name)
            if value is None or (name in cfg.MODEL_DEFAULT_KEYS and name not in explicit):
                continue
            argv += ["--" + name.replace("_", "-"), str(value)]
        for name in ("control", "control_scale"):
            for value in getattr(s, name):
                argv += ["--" + name.replace("_", "-"), value]
        for name in ("cross_replace", "reweight", "blend_words"):
            if getattr(s, name):
                argv += ["--" + name.replace("_", "-"), *getattr(s, name)]
        return argv

    def _serve(self, final: Path) -> Path:
        """The files of a finished run, linked into gradio's folder under a random token: `jobs/<token>/<run>/`
        holds the grid, the edits, run.json and the adapter (zip); nothing else of `out/` can be fetched."""
        record = json.loads((final / runs.RUN_FILE).read_text())
        served = self.files / "jobs" / secrets.token_hex(16) / final.name
        names = [*record["outputs"]["grid"], runs.RUN_FILE]
        for e in record["outputs"]["edits"]:
            names += [e["mp4"], e["gif"]]
        for name in names:
            if (final / name).is_file():
                _link_or_copy(final / name, served / name)
        adapter = Path(record["adapter"]["path"])
        adapter = adapter if adapter.is_absolute() else final / adapter
        if adapter.is_dir():
            with zipfile.ZipFile(served / "adapter.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for path in sorted(adapter.rglob("*")):
                    if path.is_file():
                        z.write(path, Path("adapter") / path.relative_to(adapter))
        return served

    def run(self, choice, upload, source_prompt, targets, recipe, steps, inference_steps, guidance, seed, frames,
            negative_prompt, p2p, cross_replace, self_replace, reweight, blend_words, blend_threshold,
            inject_features, inject_attention, inject_block, strength, guidance_rescale, reuse,
            control=CONTROL_OFF, control_scale=1.0, page_progress=gr.Progress()):
        """The queued job: a generator that yields (status, stage, grid, edits, downloads) as the edit advances:
        while it runs, the stage card (what runs now, its bar and time) stands in the grid's place.

        The form's values, one argument each: this signature is the form's one list (`FORM`), which `blocks()`
        wires its components to by name; they reach `settings` by name too.
        `page_progress`: gradio's progress of this event (gradio fills it in; API clients see it, the page hides
        its overlay, which each yield cleared); the job's stage and step are
        shown on it, the detailed per-stage bars in the status box.
        Closing the page closes this generator (gradio), which cancels the job at its next step."""
        form = {name: value for name, value in locals().items() if name in FORM}  # the form, by name
        nothing = (gr.update(value="", visible=False), gr.update(value=None, visible=True), None, None)
        try:
            s = self.settings(**{name: value for name, value in form.items() if name != "reuse"})
        except (EI2Error, ValueError) as e:
            yield (self._error(e), *nothing)
            return
        header = ""
        if reuse:
            adapter = self.find_adapter(s)
            if adapter is not None:
                s.adapter = str(adapter)
                header = f"<div>reusing the adapter of {html.escape(adapter.parent.name)}</div>"
            else:
                header = "<div>no adapter for this video and these settings yet: tuning</div>"
        if self.job_lock.locked():
            header += "<div>waiting for the previous job to stop</div>"
        progress = _Progress(self.out)
        result: dict = {}

        def job():
            from ..models import AdapterMismatchError

            try:
                with self.job_lock:
                    try:
                        progress("load", 0, 1)  # a page closed while it waited for the lock: nothing runs
                        use_free_cores(recount=True)  # this job's threads: the cores free now (ei2.cpu)
                        final = runs.edit(s, self._argv(s), progress=progress, say=progress.say,
                                          root=self.out / "runs")
                        if not s.adapter:
                            self._remember_adapter(s, final / "adapter")
                        result["served"] = self._serve(final)
                        result["final"] = final
                    finally:
                        self.prune()
            except JobCancelled:
                stage, step, total = progress.last
                log(f"cancelled a job whose page was closed, at {stage} {step}/{total}; its run folder was removed")
                result["error"] = "cancelled"
            except (EI2Error, AdapterMismatchError) as e:
                result["error"] = e
            except Exception as e:  # the app stays up; the traceback goes to the server's log
                traceback.print_exc(file=sys.stderr)
                result["error"] = e

        thread = threading.Thread(target=job, name="ei2-job", daemon=True)
        thread.start()
        shown = None
        try:
            while thread.is_alive():
                thread.join(0.5)
                if progress.last != shown:  # gradio's own bar: the stage that runs now, step of total
                    shown = progress.last
                    page_progress(*progress.gradio_args())
                yield (progress.html(header), gr.update(value=progress.stage_html(), visible=True),
                       gr.update(value=None, visible=False), None, None)
        finally:  # GeneratorExit: the page was closed (or the queue dropped the job)
            if thread.is_alive():
                progress.cancel.set()
        progress.done()
        if "error" in result:
            yield (progress.html(header) + self._error(result["error"]), *nothing)
            return
        final = result["final"]
        grid, edits, files = self._outputs(result["served"])
        yield (progress.html(header) + f"<div>done: {html.escape(str(final.relative_to(self.out)))}</div>",
               gr.update(value="", visible=False), gr.update(value=grid, visible=True), edits, files)

    @staticmethod
    def _error(e: Exception) -> str:
        from ..models import AdapterMismatchError

        text = str(e) if isinstance(e, (EI2Error, AdapterMismatchError, ValueError, str)) else f"{type(e).__name__}: {e}"
        return f"<div class='ei2-error'>Error: {html.escape(page_words(text))}</div>"

    def _outputs(self, served: Path):
        record = json.loads((served / runs.RUN_FILE).read_text())
        outputs = record["outputs"]
        # the gallery shows the gifs: images, so they play at once, in a loop, without a click on each
        edits = [(str(served / e["gif"]), e["prompt"]) for e in outputs["edits"]]
        files = [served / "grid.mp4", served / "grid.gif"]
        for e in outputs["edits"]:
            files += [served / e["mp4"], served / e["gif"]]
        files.append(served / runs.RUN_FILE)
        if (served / "adapter.zip").is_file():
            files.append(served / "adapter.zip")
        return str(served / "grid.mp4"), edits, [str(f) for f in files]

    # ------------------------------------------------------------------------------------------ pruning
    def prune(self) -> dict:
        """`ei2 serve --keep-runs N`: remove the oldest run folders (with their served files and adapters.json
        entries), uploads (ours and gradio's) and inversion-cache entries beyond the newest N of each, and
        interrupted runs (`*.partial`, never resumed by the app); says what went in the log."""
        if self.keep_runs is None:
            return {}
        keep = max(int(self.keep_runs), 0)
        runs_dir = self.out / "runs"
        removed = dict.fromkeys(PRUNED, 0)

        def oldest(paths, stamp=lambda p: p.stat().st_mtime):
            dated = []
            for path in paths:
                try:
                    dated.append((stamp(path), path.name, path))
                except OSError:
                    continue
            dated.sort(reverse=True)
            return [path for _, _, path in dated[keep:]]

        def remove(path: Path) -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

        with self.index_lock:
            finished = [p for p in runs_dir.iterdir() if p.is_dir() and (p / runs.RUN_FILE).is_file()]
            gone = oldest(finished, lambda p: (p / runs.RUN_FILE).stat().st_mtime)
            for path in gone:
                remove(path)
            removed["runs"] = len(gone)
            for path in runs_dir.iterdir():
                # interrupted runs only: a folder whose OS lock a live run holds (another `ei2`) is left alone
                if path.name.endswith(runs.PARTIAL) and path.is_dir() and not FolderLock.held(path):
                    remove(path)
                    removed["interrupted runs"] += 1
            names = {p.name for p in runs_dir.iterdir()}
            for token in (self.files / "jobs").iterdir():  # the served files of runs that are gone
                if not (token.is_dir() and any(child.name in names for child in token.iterdir())):
                    remove(token)
            index = self._adapters()
            kept = {key: path for key, path in index.items() if Path(path).is_dir()}
            if kept != index:
                write_json(self.out / "adapters.json", kept)
            uploads = oldest([p for p in (self.out / "uploads").iterdir() if p.is_file()])
            uploads += oldest([p for p in self.files.iterdir() if p.is_dir() and HEX.fullmatch(p.name)])
            for path in uploads:
                remove(path)
            removed["uploads"] = len(uploads)
            cache = runs.cache_dir()
            entries = oldest([p for p in cache.glob("*.safetensors")  # not the temporary files of a write
                              if p.is_file() and not p.name.startswith(".")]) if cache.is_dir() else []
            for path in entries:
                remove(path)
            removed["inversion-cache entries"] = len(entries)
        if any(removed.values()):
            what = ", ".join(f"{n} {name if n != 1 else PRUNED[name]}" for name, n in removed.items() if n)
            log(f"pruned {what} (--keep-runs {keep}: the newest {keep} of each are kept)")
        return removed

    # ------------------------------------------------------------------------------------------ page
    def on_source(self, choice):
        """A sample picked: its caption fills the source prompt, its edit the target, its video the preview."""
        if choice in self.samples:
            sample = self.samples[choice]
            return (sample["caption"], sample["target"], sample["video"], min(sample["frames"], self.max_frames),
                    gr.update(value=None))
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()

    def on_upload(self, upload):
        if upload:
            return gr.update(value=UPLOAD), upload if isinstance(upload, str) else getattr(upload, "name", None)
        return gr.update(), gr.update()

    def _shown_control(self):
        """The condition the form starts with: the model's default one, or None."""
        return self.defaults.control[0] if cfg.controlled(self.defaults) else None

    def on_p2p(self, mode, features, attention, strength, last, control=CONTROL_OFF):
        """P2P or the structure condition changed: injection and strength sliders left at the model's default for
        the last (P2P mode, condition) show the default of the new one (with P2P the model's injection is off and
        its strength the generic one, `config.PLAIN_EDIT_ONLY`; with a condition, the model's controlled-edit
        defaults); sliders the user moved stay. `last`: the (mode, condition) the sliders showed."""
        mode = None if mode in (None, "", P2P_OFF) else mode
        control = None if control in (None, "", CONTROL_OFF) else control
        last_mode, last_control = last if isinstance(last, (list, tuple)) else (last, self._shown_control())
        off = [cfg.NO_CONTROL] if cfg.controlled(self.defaults) else None  # "off" against a default condition
        before = cfg.defaults_for(self.model_dir, cfg.EDIT, last_mode, [last_control] if last_control else off)
        after = cfg.defaults_for(self.model_dir, cfg.EDIT, mode, [control] if control else off)
        updates = []
        for value, name in ((features, "inject_features"), (attention, "inject_attention"), (strength, "strength")):
            untouched = value is None or value == getattr(before, name)
            updates.append(getattr(after, name) if untouched else gr.update())
        return (*updates, [mode, control])

    def on_p2p_note(self, mode):
        """The note beside the Prompt-to-Prompt control: shown while a mode is chosen, where the loaded model has
        a measured warning for it (its ei2_defaults.json "notes", `config.model_notes`)."""
        note = cfg.model_notes(self.model_dir).get("p2p")
        return gr.update(visible=bool(note) and mode not in (None, "", P2P_OFF))

    def blocks(self) -> gr.Blocks:
        """The page: the form (its parts below, each giving its components by name) beside the results."""
        with gr.Blocks(title="ei2: edit a video from text", analytics_enabled=False) as demo:
            gr.Markdown("## ei2: edit a video from text\nTune on the video, invert it with DDIM, sample it again "
                        "under each target prompt (EI², NeurIPS 2023). Jobs run one at a time.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, elem_id="ei2-form"):
                    c = {**self._source_part(), **self._settings_part(), **self._p2p_part(), **self._injection_part(),
                         **self._condition_part()}
                    run = gr.Button("Edit", variant="primary", elem_id="ei2-run")
                # the results stay in view beside the long form (CSS: sticky): the status, then the grid
                with gr.Column(scale=2, elem_id="ei2-results"):
                    out = self._results_part()
            mode = gr.State(None)  # the P2P mode the injection sliders show the defaults of
            c["choice"].change(self.on_source, c["choice"],
                               [c["source_prompt"], c["targets"], c["preview"], c["frames"], c["upload"]], queue=False)
            c["upload"].upload(self.on_upload, c["upload"], [c["choice"], c["preview"]], queue=False)
            shown = [c["inject_features"], c["inject_attention"], c["strength"]]
            for changed in (c["p2p"], c["control"]):
                changed.change(self.on_p2p, [c["p2p"], *shown, mode, c["control"]], [*shown, mode], queue=False)
            c["p2p"].change(self.on_p2p_note, c["p2p"], c["note"], queue=False)
            form = [c[name] for name in FORM]  # in the order `run` takes them (a name missing: KeyError)
            # the status box into view at once (where the columns stack, on a narrow window)
            run.click(None, None, None, js="() => { document.getElementById('ei2-status')"
                                           "?.scrollIntoView({block: 'nearest'}); }", queue=False)
            # while a job runs, the stage card stands in the grid's place; gradio's own overlay is hidden (each
            # yield of the job cleared it, so it flickered)
            run.click(self.run, form, [out[k] for k in ("status", "stage", "grid", "edits", "downloads")],
                      concurrency_limit=1, concurrency_id="ei2-jobs", api_name="edit", show_progress="hidden")
        demo.queue(default_concurrency_limit=1, max_size=32)
        return demo

    def _source_part(self) -> dict:
        """The source video (a bundled sample or an upload), its preview and the prompts."""
        from ..demo import SAMPLE

        first = next(iter(self.samples), None)
        start = SAMPLE if SAMPLE in self.samples else first
        choices = [("upload a video", UPLOAD)] + [(name.replace("_", " "), name) for name in self.samples]
        source = gr.Dropdown(choices, value=start or UPLOAD, label="Source video",
                             info="a bundled sample, or your own video (upload it below)",
                             elem_id="ei2-source")
        upload = gr.File(label=f"Upload a video (up to {self.max_upload_bytes / 2**20:.0f} MB)",
                         file_types=list(VIDEO_TYPES), type="filepath", elem_id="ei2-upload")
        preview = gr.Video(value=self.samples[start]["video"] if start else None, label="Source",
                           interactive=False, autoplay=True, loop=True, height=200, elem_id="ei2-preview")
        source_prompt = gr.Textbox(self.samples[start]["caption"] if start else "",
                                   label=FIELDS["--source-prompt"],
                                   info="what the video shows now; tuning teaches it to the model",
                                   elem_id="ei2-source-prompt")
        targets = gr.Textbox(self.samples[start]["target"] if start else "", lines=3,
                             label=f"{FIELDS['--target-prompt']} (one per line, up to {self.max_prompts})",
                             info="what the video should show instead: one edit per line",
                             elem_id="ei2-targets")
        return dict(choice=source, upload=upload, preview=preview, source_prompt=source_prompt, targets=targets)

    def _settings_part(self) -> dict:
        """Tuning and sampling: recipe, frames, steps, guidance, seed, strength, rescale, negative prompt, reuse."""
        from ..models import RECIPES

        d = self.defaults
        with gr.Accordion("Settings", open=True):
            with gr.Row():
                recipe = gr.Dropdown(list(RECIPES), value="ei2", label=FIELDS["--recipe"],
                                     info="ei2: the paper's method; tune-a-video: the baseline",
                                     elem_id="ei2-recipe")
                frames = gr.Slider(1, self.max_frames, value=min(d.frames, self.max_frames), step=1,
                                   label=FIELDS["--frames"], info="frames to edit",
                                   elem_id="ei2-frames")
            with gr.Row():  # no minimum/maximum: out-of-range values get the one-line error
                steps = gr.Number(min(d.steps, self.max_steps), precision=0,
                                  label=f"{FIELDS['--steps']} (up to {self.max_steps})",
                                  info="one-shot tuning on this video", elem_id="ei2-steps")
                inference_steps = gr.Number(min(d.inference_steps, self.max_inference_steps), precision=0,
                                            label=f"{FIELDS['--inference-steps']} "
                                                  f"(up to {self.max_inference_steps})",
                                            info="DDIM steps of the inversion and of each edit",
                                            elem_id="ei2-inference-steps")
            with gr.Row():
                guidance = gr.Number(d.guidance_scale, label=FIELDS["--guidance-scale"],
                                     info="how closely an edit follows its prompt (1: no guidance)",
                                     elem_id="ei2-guidance")
                seed = gr.Number(d.seed, precision=0, label=FIELDS["--seed"],
                                 info="the same seed and settings give the same edit", elem_id="ei2-seed")
            with gr.Row():
                strength = gr.Slider(0.04, 1, value=d.strength, step=0.02, label=FIELDS["--strength"],
                                     info="fraction of the steps sampled again: less keeps more of the "
                                          "source", elem_id="ei2-strength")
                guidance_rescale = gr.Slider(0, 1, value=d.guidance_rescale, step=0.05,
                                             label=FIELDS["--guidance-rescale"],
                                             info="tames over-saturated colours of high guidance (0: off)",
                                             elem_id="ei2-guidance-rescale")
            negative = gr.Textbox(d.negative_prompt or "", label=FIELDS["--negative-prompt"],
                                  info="what the edits should not show", elem_id="ei2-negative")
            reuse = gr.Checkbox(True, label="Reuse tuning",
                                info="skip tuning when this video was tuned with these settings before",
                                elem_id="ei2-reuse")
        return dict(recipe=recipe, frames=frames, steps=steps, inference_steps=inference_steps, guidance=guidance,
                    seed=seed, strength=strength, guidance_rescale=guidance_rescale, negative_prompt=negative,
                    reuse=reuse)

    def _p2p_part(self) -> dict:
        """Prompt-to-Prompt: the mode, its note and its options."""
        p2p_note = cfg.model_notes(self.model_dir).get("p2p")
        with gr.Accordion("Prompt-to-Prompt", open=False):
            p2p = gr.Dropdown([P2P_OFF, "replace", "refine", "reweight"], value=P2P_OFF,
                              label=FIELDS["--p2p"],
                              info="edit through the source's attention: replace swaps words, "
                                   "refine adds words, reweight scales one", elem_id="ei2-p2p")
            note = gr.HTML(f"<div class='ei2-note'>⚠ {html.escape(p2p_note or '')}</div>",
                           visible=False, elem_id="ei2-p2p-note")
            with gr.Row():
                cross = gr.Textbox("", label=FIELDS["--cross-replace"],
                                   info="fraction of steps that keep the source's word attention, "
                                        "or WORD=FRACTION", elem_id="ei2-cross-replace")
                self_replace = gr.Textbox("", label=FIELDS["--self-replace"],
                                          info="fraction of steps that keep the source's frame "
                                               "attention", elem_id="ei2-self-replace")
            with gr.Row():
                reweight = gr.Textbox("", label=FIELDS["--reweight"],
                                      info="WORD=FACTOR: a word's weight, with reweight",
                                      elem_id="ei2-reweight")
                blend = gr.Textbox("", label=FIELDS["--blend-words"],
                                   info="edit only where these words attend (local blend)",
                                   elem_id="ei2-blend-words")
                threshold = gr.Textbox("", label=FIELDS["--blend-threshold"],
                                       info="attention level (0-1) that counts as the word's area",
                                       elem_id="ei2-blend-threshold")
        return dict(p2p=p2p, note=note, cross_replace=cross, self_replace=self_replace, reweight=reweight,
                    blend_words=blend, blend_threshold=threshold)

    def _injection_part(self) -> dict:
        """Feature injection (Plug-and-Play)."""
        d = self.defaults
        with gr.Accordion("Structure (feature injection, Plug-and-Play; off with Prompt-to-Prompt "
                          "unless set)", open=False):
            with gr.Row():
                inject_features = gr.Slider(0, 1, value=d.inject_features, step=0.05,
                                            label=FIELDS["--inject-features"],
                                            info="fraction of steps that take the source's decoder "
                                                 "features", elem_id="ei2-inject-features")
                inject_attention = gr.Slider(0, 1, value=d.inject_attention, step=0.05,
                                             label=FIELDS["--inject-attention"],
                                             info="fraction of steps that take the source's "
                                                  "self-attention", elem_id="ei2-inject-attention")
                inject_block = gr.Number(d.inject_block, precision=0, label=FIELDS["--inject-block"],
                                         info="the decoder block whose features are injected",
                                         elem_id="ei2-inject-block")
        return dict(inject_features=inject_features, inject_attention=inject_attention, inject_block=inject_block)

    def _condition_part(self) -> dict:
        """The structure condition (a bundled ControlNet's kind) and its scale."""
        d = self.defaults
        bundled = sorted(cfg.bundled_controlnets(self.model_dir))
        with gr.Accordion("Structure condition (ControlNet per frame; keeps the source's "
                          "layout)", open=bool(bundled)):
            with gr.Row():
                control = gr.Dropdown([CONTROL_OFF, *bundled],
                                      value=d.control[0] if cfg.controlled(d) else CONTROL_OFF,
                                      label=FIELDS["--control"],
                                      info="a map of each source frame (its maps are shown in the "
                                           "grid) that holds the layout",
                                      elem_id="ei2-control", interactive=bool(bundled))
                control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label=FIELDS["--control-scale"],
                                          info="how strongly the map holds the layout (0: not at all)",
                                          elem_id="ei2-control-scale")
        return dict(control=control, control_scale=control_scale)

    @staticmethod
    def _results_part() -> dict:
        """Status, the stage card, the grid, the edits and the downloads."""
        status = gr.HTML("<div class='ei2-now'>ready: pick a video, type the target prompts, press "
                         "Edit</div>", elem_id="ei2-status")
        gr.Markdown("**Source and edits, side by side**")
        # no download button over the grid (it hid the last caption): grid.mp4 is in the downloads
        stage = gr.HTML("", visible=False, elem_id="ei2-stage")
        grid = gr.Video(label="Source and edits, side by side", show_label=False, interactive=False,
                        autoplay=True, loop=True, buttons=[], elem_id="ei2-grid")
        edits = gr.Gallery(label="Edits", columns=2, fit_columns=False, height="auto",
                           object_fit="contain", elem_id="ei2-edits")
        downloads = gr.File(label="Downloads: mp4, gif, adapter, run.json", file_count="multiple",
                            interactive=False, elem_id="ei2-downloads")
        return dict(status=status, stage=stage, grid=grid, edits=edits, downloads=downloads)


def launch(demo: gr.Blocks, out: Path, host: str, port: int, max_upload_mb: float, block: bool = True):
    """Serve `demo` on host:port. No `allowed_paths`: gradio serves only its own folder (`out/.gradio/files`),
    where a finished job's files lie under a random token; runs, uploads and adapters.json are blocked too."""
    print(f"ei2 serve: http://{host}:{port}  (run folders in {out}/runs; Ctrl+C to stop)", file=sys.stderr)
    blocked = [str(out / "runs"), str(out / "uploads"), str(out / "adapters.json")]
    demo.launch(server_name=host, server_port=port, blocked_paths=blocked, max_file_size=int(max_upload_mb * 1024 * 1024),
                show_error=True, quiet=True, ssr_mode=False, inbrowser=False, share=False,
                prevent_thread_lock=not block, theme=gr.themes.Soft(), css=CSS, footer_links=[])
    return demo


# The form of the page: `App.run`'s arguments, in order (gradio passes the components' values positionally).
FORM = tuple(name for name in inspect.signature(App.run).parameters if name not in ("self", "page_progress"))

"""The gradio app of `ei2 serve`: one form, one queue, one run folder per job (`ei2.runs.edit`).

Layout of the output folder `out/`:

    runs/<stamp>-<prompt>/     ordinary run folders, as `ei2 edit` writes them
    uploads/<sha256>.<ext>     uploaded videos, named by content (so "reuse tuning" can recognise them)
    samples/                   copies of the bundled samples, so that previews are served from `out/`
    downloads/                 zipped adapters
    adapters.json              tuning settings -> adapter folder, for "reuse tuning"
    .gradio/                   gradio's own uploads and cache

Only `out/` is served (gradio `allowed_paths`, with gradio's upload and cache folders moved inside it).
"""
from __future__ import annotations

import hashlib
import html
import json
import queue
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
from ..errors import ConfigError, EI2Error

UPLOAD = "upload"
VIDEO_TYPES = (".mp4", ".mov", ".webm", ".gif", ".avi", ".mkv", ".m4v")
P2P_OFF = "off"
CSS = """
#ei2-status { min-height: 7em; }
#ei2-status .ei2-bar { font-family: ui-monospace, monospace; white-space: pre; }
#ei2-status .ei2-error { color: #b91c1c; font-weight: 600; }
footer { display: none !important; }
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


class _Progress:
    """Collects `runs` progress (stage, step, total) from the job thread; renders it as HTML."""

    def __init__(self):
        self.stages: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()
        self.messages: list[str] = []

    def __call__(self, stage: str, step: int, total: int) -> None:
        with self.lock:
            self.stages[stage] = (step, total)

    def say(self, message: str) -> None:
        with self.lock:
            self.messages.append(message)

    def html(self, header: str = "") -> str:
        with self.lock:
            stages, messages = dict(self.stages), list(self.messages)
        lines = []
        for stage, (step, total) in stages.items():
            if stage in ("load", "write"):
                label = {"load": "loading the model", "write": "writing videos"}[stage]
                lines.append(f"{'✓' if step >= total else '…'} {label}")
                continue
            width = 24
            filled = int(width * step / total) if total else width
            lines.append(f"{stage:<20} {'█' * filled}{'░' * (width - filled)} {step}/{total}")
        body = html.escape("\n".join(lines))
        notes = "".join(f"<div>{html.escape(m)}</div>" for m in messages[-3:])
        return f"{header}<div class='ei2-bar'>{body}</div>{notes}"


class App:
    def __init__(self, model: str | None, out: Path, max_upload_mb: float, max_frames: int, device: str):
        self.model, self.out, self.device = model, Path(out), device
        self.max_upload_bytes, self.max_frames = int(max_upload_mb * 1024 * 1024), int(max_frames)
        for name in ("runs", "uploads", "samples", "downloads"):
            (self.out / name).mkdir(parents=True, exist_ok=True)
        self.samples = self._copy_samples()
        self.defaults = self._model_defaults()
        self.index_lock = threading.Lock()
        # gradio's queue runs one job at a time; this lock also holds a job whose page was closed (its
        # generator is cancelled, its thread is not) until it ends, so that no two jobs ever overlap
        self.job_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ setup
    def _copy_samples(self) -> dict:
        """The bundled samples (assets/samples/index.json), their videos copied under out/samples/."""
        from ..demo import TARGETS, samples_dir

        index_path = samples_dir() / "index.json"
        if not index_path.is_file():
            return {}
        samples = {}
        for name, entry in json.loads(index_path.read_text()).items():
            source = samples_dir() / entry["video"]
            if not source.is_file():
                continue
            copy = self.out / "samples" / source.name
            if not copy.exists() or copy.stat().st_size != source.stat().st_size:
                shutil.copyfile(source, copy)
            samples[name] = {"video": str(copy), "caption": entry["caption"], "frames": int(entry.get("frames", 8)),
                             "target": TARGETS.get(name, "")}
        return samples

    def _model_defaults(self) -> cfg.Settings:
        from ..pipeline import default_model_path

        s = cfg.Settings()
        s.explicit = frozenset()
        model_dir = default_model_path() if self.model is None else Path(self.model)
        if model_dir.is_dir():
            cfg.apply_model_defaults(s, model_dir, cfg.EDIT)
        return s

    # ------------------------------------------------------------------------------------------ jobs
    def _video(self, choice: str, upload) -> str:
        if choice and choice != UPLOAD:
            if choice not in self.samples:
                raise ConfigError(f"no bundled sample {choice!r}; choose one of: {', '.join(sorted(self.samples))}")
            return self.samples[choice]["video"]
        if not upload:
            raise ConfigError("no video given; upload a video or pick a bundled sample")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "name", upload))
        if path.suffix.lower() not in VIDEO_TYPES:
            raise ConfigError(f"{path.name} is not a video this app reads; upload one of: {', '.join(VIDEO_TYPES)}")
        if path.stat().st_size > self.max_upload_bytes:
            raise ConfigError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MB; this app takes uploads up to "
                              f"{self.max_upload_bytes / 2**20:.0f} MB (ei2 serve --max-upload-mb)")
        kept = self.out / "uploads" / f"{_sha256(path)[:16]}{path.suffix.lower()}"
        if not kept.exists():
            shutil.copyfile(path, kept)
        return str(kept)

    def settings(self, choice, upload, source_prompt, targets, recipe, steps, inference_steps, guidance, seed,
                 frames, negative_prompt, p2p, cross_replace, self_replace, reweight, blend_words,
                 blend_threshold, inject_features, inject_attention, inject_block, strength=None,
                 guidance_rescale=None) -> cfg.Settings:
        """The form as `Settings`, checked as the CLI checks its flags."""
        frames = int(frames)
        if frames > self.max_frames:
            raise ConfigError(f"--frames {frames} is over this app's limit of {self.max_frames} "
                              "(ei2 serve --max-frames)")
        values = dict(
            video=self._video(choice, upload), source_prompt=(source_prompt or "").strip(),
            target_prompt=[line.strip() for line in str(targets or "").splitlines() if line.strip()],
            model=self.model, recipe=recipe or None, frames=frames, steps=int(steps),
            inference_steps=int(inference_steps), guidance_scale=float(guidance), seed=int(seed), device=self.device,
            negative_prompt=(negative_prompt or "").strip() or None,
            p2p=None if p2p in (None, "", P2P_OFF) else p2p, cross_replace=_words(cross_replace),
            self_replace=_optional_float(self_replace, "--self-replace"), reweight=_words(reweight),
            blend_words=_words(blend_words), blend_threshold=_optional_float(blend_threshold, "--blend-threshold"),
            inject_features=float(inject_features), inject_attention=float(inject_attention),
            inject_block=int(inject_block), quiet=True,
            strength=self.defaults.strength if strength is None else float(strength),
            guidance_rescale=self.defaults.guidance_rescale if guidance_rescale is None else float(guidance_rescale),
            guidance_rescale_std=self.defaults.guidance_rescale_std,
        )
        s = cfg.Settings(**values)
        s.explicit = frozenset(values)  # the form sets every value: a model's defaults replace none of them
        runs.validate(s, cfg.EDIT)
        return s

    def _tuning_key(self, s: cfg.Settings) -> str:
        video = Path(s.video)
        key = {"model": s.model, "recipe": s.recipe, "steps": s.steps, "lr": s.lr, "seed": s.seed, "frames": s.frames,
               "stride": s.stride, "start": s.start, "height": s.height, "width": s.width, "device": s.device,
               "dtype": s.dtype, "source_prompt": s.source_prompt, "video": _sha256(video)}
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
            runs._write_json(self.out / "adapters.json", index)

    @staticmethod
    def _argv(s: cfg.Settings) -> list[str]:
        """The `ei2 edit` command line that makes the same run (kept in run.json)."""
        argv = ["edit", s.video, "--source-prompt", s.source_prompt]
        for p in s.target_prompt:
            argv += ["--target-prompt", p]
        for name in ("model", "recipe", "adapter", "frames", "steps", "inference_steps", "guidance_scale", "seed",
                     "device", "negative_prompt", "p2p", "self_replace", "blend_threshold", "inject_features",
                     "inject_attention", "inject_block", "strength", "guidance_rescale", "guidance_rescale_std"):
            value = getattr(s, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        for name in ("cross_replace", "reweight", "blend_words"):
            if getattr(s, name):
                argv += ["--" + name.replace("_", "-"), *getattr(s, name)]
        return argv

    def _zip_adapter(self, final: Path, adapter: Path) -> Path:
        target = self.out / "downloads" / final.name / "adapter.zip"
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(adapter.rglob("*")):
                if path.is_file():
                    z.write(path, Path("adapter") / path.relative_to(adapter))
        return target

    def run(self, *form):
        """The queued job: a generator that yields (status, grid, edits, downloads) as the edit advances."""
        nothing = (None, None, None)
        reuse = bool(form[-1])
        try:
            s = self.settings(*form[:-1])
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
            header += "<div>waiting for the previous job (its page was closed) to finish</div>"
        progress = _Progress()
        result: dict = {}

        def job():
            from ..models import AdapterMismatchError

            try:
                with self.job_lock:
                    result["final"] = runs.edit(s, self._argv(s), progress=progress, say=progress.say,
                                                root=self.out / "runs")
            except (EI2Error, AdapterMismatchError) as e:
                result["error"] = e
            except Exception as e:  # the app stays up; the traceback goes to the server's log
                traceback.print_exc(file=sys.stderr)
                result["error"] = e

        thread = threading.Thread(target=job, name="ei2-job", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            yield (progress.html(header), *nothing)
        if "error" in result:
            yield (progress.html(header) + self._error(result["error"]), *nothing)
            return
        final = result["final"]
        if not s.adapter:
            self._remember_adapter(s, final / "adapter")
        yield (progress.html(header) + f"<div>done: {html.escape(str(final.relative_to(self.out)))}</div>",
               *self._outputs(final))

    @staticmethod
    def _error(e: Exception) -> str:
        from ..models import AdapterMismatchError

        text = str(e) if isinstance(e, (EI2Error, AdapterMismatchError, ValueError)) else f"{type(e).__name__}: {e}"
        return f"<div class='ei2-error'>ei2: error: {html.escape(text)}</div>"

    def _outputs(self, final: Path):
        record = json.loads((final / runs.RUN_FILE).read_text())
        outputs = record["outputs"]
        edits = [(str(final / e["mp4"]), e["prompt"]) for e in outputs["edits"]]
        adapter = Path(record["adapter"]["path"])
        adapter = adapter if adapter.is_absolute() else final / adapter
        files = [final / "grid.mp4", final / "grid.gif"]
        for e in outputs["edits"]:
            files += [final / e["mp4"], final / e["gif"]]
        files.append(final / runs.RUN_FILE)
        if adapter.is_dir():
            files.append(self._zip_adapter(final, adapter))
        return str(final / "grid.mp4"), edits, [str(f) for f in files]

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

    def blocks(self) -> gr.Blocks:
        from ..models import RECIPES

        d = self.defaults
        first = next(iter(self.samples), None)
        from ..demo import SAMPLE

        start = SAMPLE if SAMPLE in self.samples else first
        choices = [("upload a video", UPLOAD)] + [(name.replace("_", " "), name) for name in self.samples]
        with gr.Blocks(title="ei2: edit a video from text", analytics_enabled=False) as demo:
            gr.Markdown("## ei2: edit a video from text\nTune on the video, invert it with DDIM, sample it again "
                        "under each target prompt (EI², NeurIPS 2023). Jobs run one at a time.")
            with gr.Row():
                with gr.Column(scale=1):
                    source = gr.Dropdown(choices, value=start or UPLOAD, label="Source video",
                                         elem_id="ei2-source")
                    upload = gr.File(label=f"Upload a video (up to {self.max_upload_bytes / 2**20:.0f} MB)",
                                     file_types=list(VIDEO_TYPES), type="filepath", elem_id="ei2-upload")
                    preview = gr.Video(value=self.samples[start]["video"] if start else None, label="Source",
                                       interactive=False, autoplay=True, loop=True, height=200, elem_id="ei2-preview")
                    source_prompt = gr.Textbox(self.samples[start]["caption"] if start else "", label="Source prompt",
                                               elem_id="ei2-source-prompt")
                    targets = gr.Textbox(self.samples[start]["target"] if start else "", lines=3,
                                         label="Target prompts (one per line)", elem_id="ei2-targets")
                    with gr.Accordion("Settings", open=True):
                        with gr.Row():
                            recipe = gr.Dropdown(list(RECIPES), value="ei2", label="Recipe", elem_id="ei2-recipe")
                            frames = gr.Slider(1, self.max_frames, value=min(d.frames, self.max_frames), step=1,
                                               label="Frames", elem_id="ei2-frames")
                        with gr.Row():
                            steps = gr.Number(d.steps, precision=0, minimum=0, label="Tuning steps",
                                              elem_id="ei2-steps")
                            inference_steps = gr.Number(d.inference_steps, precision=0, minimum=1,
                                                        label="Inference steps", elem_id="ei2-inference-steps")
                        with gr.Row():
                            guidance = gr.Number(d.guidance_scale, label="Guidance scale", elem_id="ei2-guidance")
                            seed = gr.Number(d.seed, precision=0, label="Seed", elem_id="ei2-seed")
                        with gr.Row():
                            strength = gr.Slider(0.04, 1, value=d.strength, step=0.02,
                                                 label="Edit strength (fraction of the steps sampled again)",
                                                 elem_id="ei2-strength")
                            guidance_rescale = gr.Slider(0, 1, value=d.guidance_rescale, step=0.05,
                                                         label="Guidance rescale (0: off)",
                                                         elem_id="ei2-guidance-rescale")
                        negative = gr.Textbox("", label="Negative prompt", elem_id="ei2-negative")
                        reuse = gr.Checkbox(True, label="Reuse tuning (when this video and these settings already "
                                                        "have an adapter)", elem_id="ei2-reuse")
                    with gr.Accordion("Prompt-to-Prompt", open=False):
                        p2p = gr.Dropdown([P2P_OFF, "replace", "refine", "reweight"], value=P2P_OFF,
                                          label="Attention control", elem_id="ei2-p2p")
                        with gr.Row():
                            cross = gr.Textbox("", label="Cross replace (fraction, WORD=FRACTION)",
                                               elem_id="ei2-cross-replace")
                            self_replace = gr.Textbox("", label="Self replace (fraction)", elem_id="ei2-self-replace")
                        with gr.Row():
                            reweight = gr.Textbox("", label="Reweight (WORD=FACTOR)", elem_id="ei2-reweight")
                            blend = gr.Textbox("", label="Blend words", elem_id="ei2-blend-words")
                            threshold = gr.Textbox("", label="Blend threshold", elem_id="ei2-blend-threshold")
                    with gr.Accordion("Structure (feature injection, Plug-and-Play)", open=False):
                        with gr.Row():
                            inject_features = gr.Slider(0, 1, value=d.inject_features, step=0.05,
                                                        label="Inject features (fraction of steps)",
                                                        elem_id="ei2-inject-features")
                            inject_attention = gr.Slider(0, 1, value=d.inject_attention, step=0.05,
                                                         label="Inject attention (fraction of steps)",
                                                         elem_id="ei2-inject-attention")
                            inject_block = gr.Number(d.inject_block, precision=0, minimum=0,
                                                     label="Decoder block", elem_id="ei2-inject-block")
                    run = gr.Button("Edit", variant="primary", elem_id="ei2-run")
                with gr.Column(scale=1):
                    status = gr.HTML("<div>ready</div>", elem_id="ei2-status")
                    gr.Markdown("**Source and edits, side by side**")
                    grid = gr.Video(label="Source and edits, side by side", show_label=False, interactive=False,
                                    autoplay=True, loop=True, elem_id="ei2-grid")
                    edits = gr.Gallery(label="Edits", columns=3, height=320, object_fit="contain",
                                       elem_id="ei2-edits")
                    downloads = gr.File(label="Downloads: mp4, gif, adapter, run.json", file_count="multiple",
                                        interactive=False, elem_id="ei2-downloads")
            source.change(self.on_source, source, [source_prompt, targets, preview, frames, upload], queue=False)
            upload.upload(self.on_upload, upload, [source, preview], queue=False)
            form = [source, upload, source_prompt, targets, recipe, steps, inference_steps, guidance, seed, frames,
                    negative, p2p, cross, self_replace, reweight, blend, threshold, inject_features,
                    inject_attention, inject_block, strength, guidance_rescale, reuse]
            run.click(self.run, form, [status, grid, edits, downloads], concurrency_limit=1,
                      concurrency_id="ei2-jobs", api_name="edit")
        demo.queue(default_concurrency_limit=1, max_size=32)
        return demo


def launch(demo: gr.Blocks, out: Path, host: str, port: int, max_upload_mb: float, block: bool = True):
    """Serve `demo` on host:port; only files under `out` can be fetched."""
    print(f"ei2 serve: http://{host}:{port}  (run folders in {out}/runs; Ctrl+C to stop)", file=sys.stderr)
    demo.launch(server_name=host, server_port=port, allowed_paths=[str(out)], max_file_size=int(max_upload_mb * 1024 * 1024),
                show_error=True, quiet=True, ssr_mode=False, inbrowser=False, share=False,
                prevent_thread_lock=not block, theme=gr.themes.Soft(), css=CSS, footer_links=[])
    return demo

"""The `ei2` command: a thin layer over `EI2Pipeline`.

    ei2 edit VIDEO --source-prompt "a man is skiing" --target-prompt "a panda is skiing"
    ei2 tune VIDEO --source-prompt "a man is skiing" --out adapters/ski
    ei2 edit VIDEO --adapter adapters/ski --source-prompt "a man is skiing" --target-prompt "..."
    ei2 edit --config run.yaml

A run is built in `<out>.partial/` and renamed to `<out>` when complete, so a run folder is either
whole or absent. Bad input (a missing video, an empty prompt, a bad YAML key, NaN loss, ...) prints
one line `ei2: error: ...`, exits with code 2 and leaves no run folder. An interrupted tuning keeps
its checkpoints in `<out>.partial/` for `--resume`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

from . import config as cfg
from .errors import ConfigError, EI2Error

RUN_FILE = "run.json"
PARTIAL = ".partial"


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ei2", description="Edit videos from text with EI² (NeurIPS 2023) and Tune-A-Video.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ei2 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    edit = commands.add_parser("edit", help="tune on a video (or reuse an adapter), invert it and edit it",
                               description="Tune on the source video (or reuse --adapter), invert it with DDIM "
                                           "and sample it again under each --target-prompt.")
    edit.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    cfg.add_arguments(edit, cfg.EDIT)
    edit.set_defaults(handler=run_edit)
    tune = commands.add_parser("tune", help="tune on a video and keep the adapter",
                               description="One-shot tuning on the source video; --out is the adapter folder.")
    tune.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    cfg.add_arguments(tune, cfg.TUNE)
    tune.set_defaults(handler=run_tune)
    from . import bench, demo
    from .metrics import evaluate, shift_cli

    demo.add_parser(commands)
    shift_cli.add_parser(commands)
    bench.add_parser(commands)
    evaluate.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _quiet_libraries()
    from .models import AdapterMismatchError

    try:
        return args.handler(args, argv if argv is not None else sys.argv[1:])
    except (EI2Error, AdapterMismatchError) as e:
        print(f"ei2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ei2: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub(\..*)?")
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _say(settings, message: str) -> None:
    if not settings.quiet:
        print(f"ei2: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- checks
def _validate(s: cfg.Settings, command: str) -> None:
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
        if s.inference_steps < 1:
            raise ConfigError(f"--inference-steps must be at least 1, got {s.inference_steps}")
        if s.fps is not None and s.fps <= 0:
            raise ConfigError(f"--fps must be positive, got {s.fps}")
        _p2p_config(s)  # fractions, thresholds, option combinations: before anything is loaded
        if s.adapter and s.resume:
            raise ConfigError("--resume continues a tuning; with --adapter there is no tuning to resume")
    for name in ("width", "height"):
        v = getattr(s, name)
        if v is not None and (v <= 0 or v % 8):
            raise ConfigError(f"--{name} {v} is not a positive multiple of 8")
    for name, low in (("frames", 1), ("stride", 1), ("start", 0), ("steps", 0), ("checkpoint_every", 0)):
        v = getattr(s, name)
        if v < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    if not s.lr > 0:
        raise ConfigError(f"--lr must be positive, got {s.lr}")
    from .models import RECIPES

    if s.recipe is not None and s.recipe not in RECIPES:
        raise ConfigError(f"unknown --recipe {s.recipe!r}; choose one of: {', '.join(RECIPES)}")
    if s.resume and not s.out:
        raise ConfigError("--resume needs the --out of the interrupted run")
    if not Path(s.video).exists():
        raise ConfigError(f"video not found: {s.video}")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "run"


def _run_folder(s: cfg.Settings, command: str) -> Path:
    if s.out:
        final = Path(s.out)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        label = s.target_prompt[0] if command == cfg.EDIT else "adapter-" + s.source_prompt
        final = Path("outputs") / f"{stamp}-{_slug(label)}"
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
    if partial.exists() and not s.resume and not s.overwrite:
        raise ConfigError(f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite to start over")
    return final


def _partial(final: Path) -> Path:
    return final.with_name(final.name + PARTIAL)


class Staging:
    """`<out>.partial/` while a run is built; renamed to `<out>` on success, removed on bad input."""

    def __init__(self, final: Path, resume: bool):
        self.final, self.path, self.resume = final, _partial(final), resume
        self.created_parents: list[Path] = []
        self.keep_on_interrupt = False

    def __enter__(self) -> "Staging":
        parent = self.path.parent
        while not parent.exists():
            self.created_parents.append(parent)
            parent = parent.parent
        if self.path.exists() and not self.resume:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.replaced-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def __exit__(self, kind, error, tb):
        if kind is None:
            return False
        interrupted = not issubclass(kind, EI2Error) and not _is_adapter_error(error)
        if interrupted and self.keep_on_interrupt:
            print(f"ei2: tuning checkpoints kept in {self.path}; continue with the same command and --resume",
                  file=sys.stderr)
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.created_parents:  # innermost first
            with contextlib.suppress(OSError):
                parent.rmdir()
        return False


def _is_adapter_error(error) -> bool:
    from .models import AdapterMismatchError

    return isinstance(error, AdapterMismatchError)


# ---------------------------------------------------------------------------------------------- stages
def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"ei2": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "av", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _cache_dir() -> Path:
    if os.environ.get("EI2_CACHE_DIR"):
        return Path(os.environ["EI2_CACHE_DIR"]) / "inversions"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ei2" / "inversions"


def _prepare(s: cfg.Settings, command: str, timings: dict):
    """Load the model, then read the video at the model's size; nothing is written yet."""
    import torch

    from .pipeline import EI2Pipeline, default_model_path
    from .video import read_video

    model_dir = default_model_path() if s.model is None else Path(s.model)
    s.model_defaults = cfg.apply_model_defaults(s, model_dir if model_dir.is_dir() else None, command)
    if s.model_defaults:
        _validate(s, command)
    torch.manual_seed(s.seed)
    t = time.perf_counter()
    pipe = EI2Pipeline.from_pretrained(
        s.model, recipe=s.recipe, adapter=s.adapter if command == cfg.EDIT else None, device=s.device, dtype=s.dtype,
        inversion_cache_dir=_cache_dir(),
    )
    pipe.set_progress_bar_config(disable=s.quiet)
    timings["load_s"] = round(time.perf_counter() - t, 3)
    height = s.height or pipe.default_size
    width = s.width or pipe.default_size
    t = time.perf_counter()
    video = read_video(s.video, s.frames, s.stride, s.start, (height, width))
    timings["read_video_s"] = round(time.perf_counter() - t, 3)
    return pipe, video, (height, width)


def _tune(s: cfg.Settings, pipe, latents, staging: Staging, timings: dict, record: dict) -> None:
    checkpoints = staging.path / "checkpoints"
    staging.keep_on_interrupt = s.checkpoint_every > 0
    result = pipe.tune(
        latents=latents, source_prompt=s.source_prompt, steps=s.steps, learning_rate=s.lr, seed=s.seed,
        gradient_checkpointing=s.gradient_checkpointing, checkpoint_dir=checkpoints,
        checkpoint_every=s.checkpoint_every, resume=s.resume,
    )
    staging.keep_on_interrupt = False
    timings["tune_s"] = round(result.seconds, 3)
    timings["tune_step_s"] = None if result.seconds_per_step is None else round(result.seconds_per_step, 4)
    record["tuning"] = {
        "steps": result.steps, "resumed_from": result.resumed_from,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "losses": [round(v, 6) for v in result.losses],
    }


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
        "model_defaults": getattr(s, "model_defaults", {}),
        "versions": _versions(),
        "seeds": {"seed": s.seed, "tuning_noise_seed": s.seed},
        "video": {"path": str(video.path), "frames": video.num_frames, "fps": video.fps, "hash": frames_hash(video.frames),
                  "height": size[0], "width": size[1]},
        "model": {"source": settings["model"], "base_fingerprint": str(pipe.unet.base_fingerprint)},
        "recipe": pipe.unet.recipe.to_dict(),
    }


def _write_json(path: Path, data: dict) -> None:
    from .video import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def run_tune(args, argv) -> int:
    s = cfg.resolve(cfg.TUNE, args, args.config)
    _validate(s, cfg.TUNE)
    final = _run_folder(s, cfg.TUNE)
    t0 = time.perf_counter()
    timings: dict = {}
    pipe, video, size = _prepare(s, cfg.TUNE, timings)
    record = _record(s, cfg.TUNE, argv, pipe, video, size, final)
    with Staging(final, s.resume) as staging:
        _say(s, f"tuning {s.steps} steps on {video.num_frames} frames of {size[1]}x{size[0]} "
                f"(recipe {pipe.unet.recipe.name}, {pipe.unet.device})")
        latents = pipe.encode_frames(video.frames)
        _tune(s, pipe, latents, staging, timings, record)
        pipe.save_adapter(staging.path)
        shutil.rmtree(staging.path / "checkpoints", ignore_errors=True)
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        record["timings"] = timings
        record["adapter"] = {"path": str(final), "hash": pipe.adapter_hash()}
        _write_json(staging.path / RUN_FILE, record)
        staging.commit()
    _say(s, f"adapter written to {final}")
    return 0


def run_edit(args, argv) -> int:
    import numpy as np

    from .video import make_grid, write_gif, write_mp4

    s = cfg.resolve(cfg.EDIT, args, args.config)
    _validate(s, cfg.EDIT)
    final = _run_folder(s, cfg.EDIT)
    t0 = time.perf_counter()
    timings: dict = {}
    pipe, video, size = _prepare(s, cfg.EDIT, timings)
    record = _record(s, cfg.EDIT, argv, pipe, video, size, final)
    p2p = _check_control(s, pipe)
    fps = s.fps or video.fps
    with Staging(final, s.resume) as staging:
        out = staging.path
        latents = pipe.encode_frames(video.frames)
        if s.adapter:
            _say(s, f"using adapter {s.adapter} (recipe {pipe.unet.recipe.name}); no tuning")
            record["adapter"] = {"path": str(s.adapter), "hash": pipe.adapter_hash(), "reused": True}
        else:
            if s.steps:
                _say(s, f"tuning {s.steps} steps on {video.num_frames} frames of {size[1]}x{size[0]} "
                        f"(recipe {pipe.unet.recipe.name}, {pipe.unet.device})")
                _tune(s, pipe, latents, staging, timings, record)
            pipe.save_adapter(out / "adapter")
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            record["adapter"] = {"path": "adapter", "hash": pipe.adapter_hash(), "reused": False}

        t = time.perf_counter()
        cached = pipe.inversion_cache.get(_inversion_key(pipe, latents, s)) is not None
        if not s.null_text:  # null-text inversion runs (cached) in the first controlled edit
            inverted = pipe.invert(latents=latents, prompt=s.source_prompt, num_inference_steps=s.inference_steps)
        timings["invert_s"] = round(time.perf_counter() - t, 3)
        record["inversion"] = {"prompt": s.source_prompt, "steps": s.inference_steps, "cached": cached,
                               "null_text": s.null_text}
        if p2p is not None:
            record["p2p"] = dataclasses.asdict(p2p)

        edits, edited, timings["edit_s"] = [], [], []
        (out / "edits").mkdir()
        for i, prompt in enumerate(s.target_prompt, 1):
            t = time.perf_counter()
            _say(s, f"edit {i}/{len(s.target_prompt)}: {prompt!r}")
            stem = f"{i:02d}-{_slug(prompt)}"
            if p2p is not None or s.null_text or s.save_attention:
                frames, extra = _controlled_edit(s, pipe, latents, prompt, p2p, out / "edits" / stem)
            else:
                extra = {}
                result = pipe(prompt, latents=inverted, negative_prompt=s.negative_prompt,
                              num_inference_steps=s.inference_steps, guidance_scale=s.guidance_scale)
                frames = result.frames[0]
            timings["edit_s"].append(round(time.perf_counter() - t, 3))
            write_mp4(frames, out / "edits" / f"{stem}.mp4", fps)
            write_gif(frames, out / "edits" / f"{stem}.gif", fps)
            edits.append({"prompt": prompt, "mp4": f"edits/{stem}.mp4", "gif": f"edits/{stem}.gif", **extra})
            edited.append(frames)

        t = time.perf_counter()
        write_mp4(video.frames, out / "source.mp4", fps)
        write_gif(video.frames, out / "source.gif", fps)
        grid = make_grid([video.frames, *edited], ["source: " + s.source_prompt, *s.target_prompt])
        write_mp4(np.ascontiguousarray(grid), out / "grid.mp4", fps)
        write_gif(grid, out / "grid.gif", fps)
        timings["write_s"] = round(time.perf_counter() - t, 3)
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        record["timings"] = timings
        record["outputs"] = {"edits": edits, "source": ["source.mp4", "source.gif"], "grid": ["grid.mp4", "grid.gif"],
                             "adapter": record["adapter"]["path"]}
        _write_json(out / RUN_FILE, record)
        staging.commit()
    _say(s, f"wrote {len(edits)} edit(s) to {final}")
    return 0


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


def _check_control(s: cfg.Settings, pipe):
    """Check the P2P words against the prompts and tokenizer before anything is written."""
    from .control import build_controller, word_token_indices
    from .control.words import P2PError

    p2p = _p2p_config(s)
    if p2p is not None:
        build_controller(p2p, pipe.tokenizer, s.source_prompt, s.target_prompt, s.inference_steps)
    if s.save_attention and not any(word_token_indices(pipe.tokenizer, p, s.save_attention)
                                    for p in [s.source_prompt, *s.target_prompt]):
        raise P2PError(f"--save-attention word {s.save_attention!r} is in no prompt; use a word of the source "
                       "or a target prompt")
    return p2p


def _controlled_edit(s: cfg.Settings, pipe, latents, prompt: str, p2p, stem: Path):
    """One edit with attention control and/or null-text inversion -> (frames, run.json entries);
    the attention grid of --save-attention is written beside the edit."""
    from .control import controlled_edit, save_attention_grid, word_token_indices

    result = controlled_edit(pipe, latents, s.source_prompt, [prompt], p2p=p2p, null_text=s.null_text,
                             num_inference_steps=s.inference_steps, guidance_scale=s.guidance_scale,
                             negative_prompt=s.negative_prompt, record_attention=bool(s.save_attention))
    extra = {}
    if s.save_attention and any(word_token_indices(pipe.tokenizer, p, s.save_attention) for p in result.prompts):
        path = stem.with_name(f"{stem.name}.attention-{_slug(s.save_attention)}.png")
        save_attention_grid(result.controller, pipe.tokenizer, result.prompts, s.save_attention, path)
        extra["attention"] = f"edits/{path.name}"
    return pipe.decode_latents(result.latents)[0], extra


def _inversion_key(pipe, latents, s) -> str:
    from .inversion import inversion_key, tensor_hash

    return inversion_key(tensor_hash(latents.to(pipe.unet.device).float()), pipe.adapter_hash(), s.inference_steps,
                         s.source_prompt, pipe.mixed_precision)


if __name__ == "__main__":
    sys.exit(main())

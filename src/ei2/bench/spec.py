"""A benchmark spec: videos with their source and target prompts, recipes, seeds and shared settings.

    name: shapes
    model: null                 # default: the embedded Shapes model; a folder (relative to this file) or hub id
    clip_model: null            # default: the Shapes CLIP (assets/shapes-clip)
    metrics: [clip, oracle, flow]
    settings: {steps: 150, lr: 1.0e-4, inference_steps: 25, guidance_scale: 7.5, frames: 8}
                                # a setting left out is `ei2 edit`'s default for the model (ei2_defaults.json)
    recipes:                    # a recipe name, or {name, recipe, <setting>: ...} for a variant
      - ei2
      - tune-a-video
      - {name: untuned, recipe: ei2, steps: 0}
      - {name: ei2+inject, recipe: ei2, inject_features: 0.5, inject_attention: 0.5}
      - {name: as-edit, recipe: ei2, defaults: edit}   # `ei2 edit`'s settings (on the spec's frames), not the spec's
    seeds: [0, 1, 2]
    videos:
      - name: red-circle-right
        source_prompt: a red circle moving right on a gray background
        shapes: {motion: right, color: red, shape: circle, background: gray, seed: 1}   # rendered
        # path: clips/ski.mp4                                                           # or a file
        edits:
          - {kind: color, prompt: a blue circle moving right on a gray background}
          - a red square moving right on a gray background                             # kind inferred
    quick:                      # `--quick`: the first N videos, fewer recipes/seeds, other settings
      videos: 2
      recipes: [ei2, tune-a-video]
      seeds: [0]
      settings: {steps: 20}

A job is one (video, recipe, seed): one tuning and all the video's edits. Its `config` (everything
that decides its result) is stored with its outputs, so a resumed run redoes nothing that is finished
and refuses to mix in results made with other settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import read_yaml_mapping
from ..errors import ConfigError

METRICS = ("clip", "oracle", "flow")
# key: type. A setting the spec does not give is `ei2 edit`'s default for the spec's model (`edit_defaults`: the
# generic defaults of `ei2.defaults` with the model's `ei2_defaults.json`), so that it has one home.
SETTINGS = {
    "frames": int, "stride": int, "start": int, "size": int, "steps": int, "lr": float,
    "gradient_checkpointing": bool, "inference_steps": int, "guidance_scale": float, "dtype": str, "window": int,
    # structure-preserving injection (DESIGN §1.9): fractions of the steps, decoder block
    "inject_features": float, "inject_attention": float, "inject_block": int,
    # edit strength, rescaled guidance, pix2pix-zero noise regularisation (issue 19; `ei2 edit`'s options)
    "strength": float, "guidance_rescale": float, "guidance_rescale_std": str, "noise_regularization": bool,
    # Prompt-to-Prompt (DESIGN §1.8) on every edit of the column: the mode, one cross-replace fraction for all
    # words, the self-replace fraction (`--p2p`, `--cross-replace`, `--self-replace`); the word swap of each edit
    # comes from its prompts
    "p2p": str, "cross_replace": float, "self_replace": float,
    # a structure condition (DESIGN §1.12): one kind (or null: none) through the model's bundled ControlNet, its
    # scale and window, and whether it is on during inversion and tuning (`--control`, `--control-scale`, ...)
    "control": str, "control_scale": float, "control_start": float, "control_end": float,
    "control_inversion": bool, "control_tuning": bool, "guess_mode": bool,
}
BENCH_ONLY = {"size": None}  # settings of the benchmark alone (`ei2 edit` has --width/--height)
VIDEO_SETTINGS = ("frames", "stride", "start", "size")  # which frames are edited: the same for every column
EDIT_DEFAULTS = "edit"  # a recipe entry with `defaults: edit` runs as `ei2 edit` does, not with the spec's settings
LOWEST = {"frames": 2, "stride": 1, "start": 0, "steps": 0, "inference_steps": 1}


def edit_defaults(model: str | None, p2p: str | None = None, control: str | None = None) -> dict:
    """The value of every setting that `ei2 edit` would use for `model` (None: the embedded Shapes model), without
    or with `--p2p` (whose edits do not take the model's injection and strength: `config.apply_model_defaults`),
    without or with `--control` (a plain controlled edit takes the model's controlled-edit defaults)."""
    from .. import config as cfg
    from ..runs import model_folder

    settings = cfg.defaults_for(model_folder(model), cfg.EDIT, p2p, [control] if control else None)
    out = {**BENCH_ONLY, **{k: getattr(settings, k) for k in SETTINGS if k not in BENCH_ONLY}}
    out["cross_replace"] = None  # `ei2 edit`'s [] (P2PConfig's default)
    out["control"] = control
    out["control_scale"] = 1.0  # `ei2 edit`'s [] (StructureControl's default)
    return out


def resolve_settings(model: str | None, given: dict) -> dict:
    """Every setting of a job: those given (by the spec's settings, its quick section, the recipe entry), the rest
    `ei2 edit`'s defaults for the model, exactly as the CLI resolves a command line that gives the same options."""
    return {**edit_defaults(model, given.get("p2p"), given.get("control")), **given}


TOP_KEYS = ("name", "model", "clip_model", "metrics", "settings", "recipes", "seeds", "videos", "quick")
VIDEO_KEYS = ("name", "source_prompt", "path", "shapes", "edits")
SHAPES_KEYS = ("motion", "color", "shape", "background", "seed")
QUICK_KEYS = ("videos", "recipes", "seeds", "settings")


@dataclass(frozen=True)
class RecipeEntry:
    """A column of the benchmark: an inflation recipe, optionally with its own settings (e.g. steps: 0)."""

    name: str
    recipe: str
    overrides: dict = field(default_factory=dict)
    edit_defaults: bool = False  # `defaults: edit`: `ei2 edit`'s settings for the model instead of the spec's


@dataclass(frozen=True)
class Edit:
    prompt: str
    kind: str  # color, shape, background, ... or "edit"


@dataclass(frozen=True)
class VideoEntry:
    name: str
    source_prompt: str
    edits: tuple[Edit, ...]
    path: str | None = None
    shapes: dict | None = None

    def describe(self) -> dict:
        return {"path": self.path} if self.path else {"shapes": self.shapes}

    def load(self, settings: dict, size: int) -> tuple[np.ndarray, np.ndarray | None, float]:
        """(frames (f, h, w, 3) uint8, ground-truth centres (f, 2) or None, fps)."""
        if self.shapes is not None:
            from ..shapes.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, render, video_scenes

            s = self.shapes
            scenes = video_scenes(s["motion"], settings["frames"], COLOR_NAMES.index(s["color"]),
                                  SHAPES.index(s["shape"]), BACKGROUND_NAMES.index(s["background"]),
                                  seed=int(s.get("seed", 0)))
            frames = render(scenes)
            centres = np.stack([scenes.cx, scenes.cy], 1)
            if frames.shape[1] != size:
                from ..video import resize_and_crop
                from PIL import Image

                scale = size / frames.shape[1]
                frames = np.stack([np.asarray(resize_and_crop(Image.fromarray(f), (size, size))) for f in frames])
                centres = centres * scale
            return frames, centres, 8.0
        from ..video import read_video

        video = read_video(self.path, settings["frames"], settings["stride"], settings["start"], (size, size))
        return video.frames, None, video.fps


@dataclass(frozen=True)
class Job:
    video: VideoEntry
    recipe: RecipeEntry
    seed: int
    settings: dict

    @property
    def id(self) -> str:
        return f"{self.video.name}--{self.recipe.name}--s{self.seed}"

    def config(self, spec: "BenchSpec") -> dict:
        """Everything that decides this job's result (compared on resume)."""
        return {
            "model": spec.model, "recipe": self.recipe.recipe, "seed": self.seed, "settings": self.settings,
            "video": self.video.describe(), "source_prompt": self.video.source_prompt,
            "edits": [dataclasses.asdict(e) for e in self.video.edits],
        }


@dataclass
class BenchSpec:
    name: str
    path: Path
    model: str | None
    clip_model: str | None
    metrics: tuple[str, ...]
    settings: dict
    recipes: list[RecipeEntry]
    seeds: list[int]
    videos: list[VideoEntry]
    quick: bool = False
    given: dict = field(default_factory=dict)  # the settings the spec gives (and its quick section); `settings`: all

    def job_settings(self, recipe: RecipeEntry) -> dict:
        """All settings of a column: those given by the spec (only its frames with `defaults: edit`) and by the
        recipe entry, the rest `ei2 edit`'s defaults for the model (`resolve_settings`)."""
        given = {k: v for k, v in self.given.items() if not recipe.edit_defaults or k in VIDEO_SETTINGS}
        return resolve_settings(self.model, {**given, **recipe.overrides})

    def jobs(self) -> list[Job]:
        """Every (video, recipe, seed), seed-major so that consecutive shares mix recipes and videos."""
        columns = {recipe.name: self.job_settings(recipe) for recipe in self.recipes}
        out = []
        for seed in self.seeds:
            for video in self.videos:
                for recipe in self.recipes:
                    out.append(Job(video, recipe, seed, dict(columns[recipe.name])))
        return out

    def digest(self) -> str:
        text = json.dumps([j.config(self) for j in self.jobs()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- loading
def _unknown(where: str, keys, known) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(known)}")


def _settings(where: str, values, base: dict) -> dict:
    """`base` updated with the checked settings of `values` (a mapping from the spec)."""
    from ..control.options import MODES

    if values is None:
        return dict(base)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: settings must be a mapping of key: value, got {values!r}")
    _unknown(where, values, SETTINGS)
    out = dict(base)
    for key, value in values.items():
        kind = SETTINGS[key]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, str))
        if value is None and key not in ("size", "p2p", "cross_replace", "self_replace", "control"):
            raise ConfigError(f"{where}: {key!r} needs a value")
        if value is not None and not ok:
            raise ConfigError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
        out[key] = float(value) if kind is float and value is not None else value
    for key, low in LOWEST.items():
        if key in values and out[key] < low:
            raise ConfigError(f"{where}: {key!r} must be at least {low}, got {out[key]}")
    if "lr" in values and not out["lr"] > 0:
        raise ConfigError(f"{where}: 'lr' must be positive, got {out['lr']}")
    if out.get("p2p") is not None and out["p2p"] not in MODES:
        raise ConfigError(f"{where}: 'p2p' must be one of {', '.join(MODES)} (or null: no Prompt-to-Prompt), "
                          f"got {out['p2p']!r}")
    return out


def _recipes(where: str, values) -> list[RecipeEntry]:
    from ..models import RECIPES

    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: 'recipes' must be a non-empty list of recipe names or {{name, recipe, steps}}")
    out = []
    for item in values:
        if isinstance(item, str):
            item = {"name": item, "recipe": item}
        if not isinstance(item, dict) or "recipe" not in item:
            raise ConfigError(f"{where}: a recipe entry must be a name or a mapping with 'recipe', got {item!r}")
        recipe = item["recipe"]
        if recipe not in RECIPES:
            raise ConfigError(f"{where}: unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        use_defaults = item.get("defaults")
        if use_defaults not in (None, EDIT_DEFAULTS):
            raise ConfigError(f"{where}: recipe {recipe!r}: 'defaults' can only be {EDIT_DEFAULTS!r} (run as `ei2 edit` "
                              f"does, without the spec's settings), got {use_defaults!r}")
        overrides = {k: v for k, v in item.items() if k not in ("name", "recipe", "defaults")}
        overrides = _settings(f"{where}: recipe {recipe!r}", overrides, {})
        out.append(RecipeEntry(str(item.get("name", recipe)), recipe, overrides, use_defaults == EDIT_DEFAULTS))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: recipe names repeat ({', '.join(names)}); give variants distinct names")
    return out


def _edit_kind(source: str, target: str) -> str:
    from ..metrics.oracle import ATTRIBUTES, parse_caption

    a, b = parse_caption(source), parse_caption(target)
    changed = [k for k in ATTRIBUTES if a[k] and b[k] and a[k] != b[k]]
    return "+".join(changed) if changed else "edit"


def _videos(spec_path: Path, values) -> list[VideoEntry]:
    from ..shapes.world import BACKGROUND_NAMES, COLOR_NAMES, MOTIONS, SHAPES

    where = str(spec_path)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: 'videos' must be a non-empty list")
    out = []
    for i, v in enumerate(values):
        at = f"{where}: videos[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{at} must be a mapping with name, source_prompt, path or shapes, edits")
        _unknown(at, v, VIDEO_KEYS)
        for key in ("name", "source_prompt", "edits"):
            if not v.get(key):
                raise ConfigError(f"{at}: {key!r} is missing")
        if ("path" in v) == ("shapes" in v):
            raise ConfigError(f"{at}: give either 'path' (a video file or folder) or 'shapes' (a rendered video)")
        name = str(v["name"])
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{at}: name {name!r} may use letters, digits, '-' and '_' only")
        path = shapes = None
        if "path" in v:
            path = str((spec_path.parent / Path(str(v["path"])).expanduser()))
            if not Path(path).exists():
                raise ConfigError(f"{at}: video not found: {path}")
        else:
            shapes = dict(v["shapes"]) if isinstance(v["shapes"], dict) else None
            if shapes is None:
                raise ConfigError(f"{at}: 'shapes' must be a mapping of {', '.join(SHAPES_KEYS)}")
            _unknown(f"{at}: shapes", shapes, SHAPES_KEYS)
            for key, allowed in (("motion", tuple(MOTIONS)), ("color", COLOR_NAMES), ("shape", SHAPES),
                                 ("background", BACKGROUND_NAMES)):
                if shapes.get(key) not in allowed:
                    raise ConfigError(f"{at}: shapes {key} {shapes.get(key)!r} is not one of {', '.join(allowed)}")
        edits = []
        for e in v["edits"]:
            if isinstance(e, str):
                e = {"prompt": e}
            if not isinstance(e, dict) or not str(e.get("prompt", "")).strip():
                raise ConfigError(f"{at}: an edit must be a prompt or {{kind, prompt}}, got {e!r}")
            _unknown(f"{at}: edit", e, ("prompt", "kind"))
            edits.append(Edit(str(e["prompt"]), str(e.get("kind") or _edit_kind(v["source_prompt"], e["prompt"]))))
        out.append(VideoEntry(name, str(v["source_prompt"]), tuple(edits), path, shapes))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: video names repeat; each video needs its own name")
    return out


def _seeds(where: str, values) -> list[int]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list) or not values or any(not isinstance(s, int) or isinstance(s, bool) for s in values):
        raise ConfigError(f"{where}: 'seeds' must be a list of integers, got {values!r}")
    return list(values)


def load_spec(path: str | Path, quick: bool = False) -> BenchSpec:
    """Read and check a spec YAML file; `quick` applies its `quick:` section."""
    path = Path(path)
    data = read_yaml_mapping(path, "benchmark spec", f"a mapping with {', '.join(TOP_KEYS)}")
    _unknown(str(path), data, TOP_KEYS)
    where = str(path)
    metrics = data.get("metrics", list(METRICS))
    if not isinstance(metrics, list) or any(m not in METRICS for m in metrics):
        raise ConfigError(f"{where}: 'metrics' must be a list of {', '.join(METRICS)}, got {metrics!r}")
    model = data.get("model")
    if model is not None and (path.parent / str(model)).is_dir():
        model = str((path.parent / str(model)).resolve())
    given = _settings(f"{where}: settings", data.get("settings"), {})
    recipes = _recipes(where, data.get("recipes"))
    seeds = _seeds(where, data.get("seeds", [0]))
    videos = _videos(path, data.get("videos"))
    clip_model = data.get("clip_model")
    if clip_model is not None and (path.parent / str(clip_model)).is_dir():
        clip_model = str((path.parent / str(clip_model)).resolve())
    name = str(data.get("name") or path.stem)
    if quick:
        q = data.get("quick")
        if not isinstance(q, dict):
            raise ConfigError(f"{where}: --quick needs a 'quick:' section ({', '.join(QUICK_KEYS)})")
        _unknown(f"{where}: quick", q, QUICK_KEYS)
        if "videos" in q:
            n = q["videos"]
            if isinstance(n, int) and not isinstance(n, bool):
                videos = videos[:n]
            elif isinstance(n, list) and all(isinstance(x, str) for x in n):
                missing = [x for x in n if x not in {v.name for v in videos}]
                if missing:
                    raise ConfigError(f"{where}: quick videos {missing} are not in 'videos'")
                videos = [v for v in videos if v.name in n]
            else:
                raise ConfigError(f"{where}: quick 'videos' must be a count or a list of video names")
        if "recipes" in q:
            by_name = {r.name: r for r in recipes}
            if not isinstance(q["recipes"], list) or any(r not in by_name for r in q["recipes"]):
                raise ConfigError(f"{where}: quick 'recipes' must list names from 'recipes' ({', '.join(by_name)})")
            recipes = [by_name[r] for r in q["recipes"]]
        if "seeds" in q:
            seeds = _seeds(f"{where}: quick", q["seeds"])
        quick_given = _settings(f"{where}: quick settings", q.get("settings"), {})
        given = {**given, **quick_given}
        name += "-quick"
    return BenchSpec(name, path, None if model is None else str(model), None if clip_model is None else str(clip_model),
                     tuple(metrics), resolve_settings(model, given), recipes, seeds, videos, quick, given)

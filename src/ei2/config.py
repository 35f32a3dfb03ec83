"""Settings of the `ei2 edit` and `ei2 tune` commands: one table for flags, YAML keys and defaults.

Every option is a field of `Settings`, with its default, its help and the commands that take it.
The command line is built from this table, a YAML file is checked against it (an unknown key or a
wrong type is an error naming the key), and flags given on the command line override the file.
YAML keys are the flag names with `_` or `-` (`source_prompt` or `source-prompt`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import defaults
from .control.options import MODES as P2P_MODES, P2PConfig
from .errors import ConfigError

EDIT, TUNE = "edit", "tune"
BOTH = (EDIT, TUNE)


def option(default, help: str, commands=BOTH, choices=None, metavar=None, path=False, repeat=False, nargs=False):
    """A `Settings` field: its default, help text, the commands that take it and how to parse it.

    `nargs`: a list given as `--flag A B ...` (YAML: a value, a list, or a mapping read as KEY=VALUE items).
    """
    meta = {"help": help, "commands": commands, "choices": choices, "metavar": metavar, "path": path, "repeat": repeat,
            "nargs": nargs}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


RECORD = {"commands": (), "record": True}  # the metadata of a Settings field that is not an option
RECORD_FIELDS = ("explicit", "model_defaults")


@dataclass
class Settings:
    video: str | None = option(None, "source video: mp4/mov/webm/gif file or folder of frames", path=True)
    source_prompt: str | None = option(None, "prompt that describes the source video")
    target_prompt: list[str] = option([], "edited prompt; repeat for several edits of one tuning", commands=(EDIT,),
                                      repeat=True)
    model: str | None = option(None, "diffusers Stable Diffusion 1.x/2.x folder or hub id (default: the embedded "
                                     "Shapes model)", metavar="PATH_OR_ID")
    recipe: str | None = option(None, "inflation recipe: ei2, ei2-after-cross, tune-a-video, ... (default: the "
                                      "adapter's, else ei2)")
    adapter: str | None = option(None, "reuse a tuned adapter folder instead of tuning", commands=(EDIT,), path=True)
    frames: int | str = option(defaults.FRAMES, "number of frames to sample, or `all` (longer than --window: "
                                                "edited in overlapping windows)", metavar="N|all")
    window: int = option(defaults.WINDOW, "frames per window of a long video: tuning draws one clip of this many "
                                          "frames per step, inversion and editing run in overlapping windows "
                                          "merged at every step", metavar="N")
    anchor_frames: int = option(defaults.ANCHOR_FRAMES, "frames spread over a long video whose coarse tokens every "
                                                        "window's frame attention also sees (0: none)", metavar="N")
    stride: int = option(1, "take every N-th frame")
    start: int = option(0, "index of the first frame")
    width: int | None = option(None, "frame width, a multiple of 8 (default: the model's size, 512 for SD 1.x)")
    height: int | None = option(None, "frame height, a multiple of 8 (default: the model's size)")
    steps: int = option(defaults.STEPS, "tuning steps (0: no tuning)")
    lr: float = option(defaults.LEARNING_RATE, "tuning learning rate (AdamW)")
    checkpoint_every: int = option(defaults.CHECKPOINT_EVERY, "write a tuning checkpoint every N steps (0: never)")
    resume: bool = option(False, "continue an interrupted tuning from its checkpoint (same --out)")
    gradient_checkpointing: bool = option(True, "gradient checkpointing during tuning")
    inference_steps: int = option(defaults.INFERENCE_STEPS, "DDIM steps of inversion and editing", commands=(EDIT,))
    guidance_scale: float = option(defaults.GUIDANCE_SCALE, "classifier-free guidance scale", commands=(EDIT,))
    guidance_rescale: float = option(defaults.GUIDANCE_RESCALE, "rescaled guidance (Lin et al. 2024): mix PHI of the "
                                                                "guided prediction rescaled to the conditional one's "
                                                                "std (0: off; their value 0.7)", commands=(EDIT,),
                                     metavar="PHI")
    guidance_rescale_std: str = option(defaults.GUIDANCE_RESCALE_STD, "the std of --guidance-rescale taken per video "
                                                                      "or per frame", commands=(EDIT,),
                                       choices=("video", "frame"))
    strength: float = option(defaults.STRENGTH, "edit strength, as img2img's: the fraction of the DDIM steps that "
                                                "is inverted and sampled again (1: all; lower keeps more of the "
                                                "source)", commands=(EDIT,), metavar="S")
    negative_prompt: str | None = option(None, "negative prompt for classifier-free guidance", commands=(EDIT,))
    p2p: str | None = option(None, "Prompt-to-Prompt attention control: replace (word swap), refine (added words) "
                                   "or reweight (--reweight)", commands=(EDIT,), choices=P2P_MODES)
    cross_replace: list[str] = option([], "fraction of the steps that use the source's cross-attention maps: a "
                                          f"number and/or WORD=FRACTION (default: {P2PConfig.cross_replace})",
                                      commands=(EDIT,), nargs=True, metavar="FRACTION")
    self_replace: float | None = option(None, "fraction of the steps that use the source's frame-attention maps "
                                              f"(default: {P2PConfig.self_replace})", commands=(EDIT,),
                                        metavar="FRACTION")
    reweight: list[str] = option([], "scale the cross-attention of target-prompt words (--p2p reweight)",
                                 commands=(EDIT,), nargs=True, metavar="WORD=FACTOR")
    blend_words: list[str] = option([], "local blend: edit only where these words (of the source or target prompt) "
                                        "attend", commands=(EDIT,), nargs=True, metavar="WORD")
    blend_threshold: float | None = option(None, "local-blend mask threshold in [0, 1] "
                                                 f"(default: {P2PConfig.blend_threshold})", commands=(EDIT,),
                                           metavar="THRESHOLD")
    inject_features: float = option(defaults.INJECT_FEATURES,
                                    "structure: fraction of the first steps whose decoder ResNet features come "
                                    "from the source branch (Plug-and-Play; SD: "
                                    f"{defaults.SD_INJECT_FEATURES}; 0: off)", commands=(EDIT,),
                                    metavar="FRACTION")
    inject_attention: float = option(defaults.INJECT_ATTENTION,
                                     "structure: fraction of the first steps whose frame-attention queries and "
                                     f"keys come from the source branch (SD: {defaults.SD_INJECT_ATTENTION}; 0: off)",
                                     commands=(EDIT,), metavar="FRACTION")
    inject_block: int = option(defaults.INJECT_BLOCK, "structure: decoder block up_blocks[N] whose features are "
                                                      "injected (attention: that block and finer ones)",
                               commands=(EDIT,), metavar="N")
    control: list[str] = option([], "structure condition per frame, computed from the source: canny, softedge, layout, "
                                    "depth, or a folder/video of maps you bring; repeat for several ControlNets "
                                    "(paired in order with --controlnet); `none`: no condition", repeat=True,
                                metavar="KIND_OR_PATH")
    controlnet: list[str] = option([], "diffusers ControlNet folder or hub id for each --control, in order "
                                       "(default: the one the model bundles for that kind)", repeat=True,
                                   metavar="PATH_OR_ID")
    control_scale: list[str] = option([], "controlnet_conditioning_scale: one for all, or one per --control "
                                          "(default 1.0)", repeat=True, metavar="S")
    control_start: float = option(0.0, "fraction of the sampled steps after which the ControlNet starts to act "
                                       "(control_guidance_start)", metavar="A")
    control_end: float = option(1.0, "fraction of the sampled steps after which it stops (control_guidance_end)",
                                metavar="B")
    control_inversion: bool = option(True, "keep the condition on during DDIM inversion, with the same maps "
                                           "(as RAVE and TokenFlow)", commands=(EDIT,))
    guess_mode: bool = option(False, "diffusers' guess_mode: under guidance the ControlNet sees only the conditional "
                                     "half, its residuals scaled from 0.1 (first block) to 1 (middle block)")
    control_tuning: bool = option(True, "tune with the condition on, so that the adapter learns what the "
                                        "controlled edit gives it")
    canny_low: int = option(50, "--control canny: OpenCV's lower hysteresis threshold")
    canny_high: int = option(100, "--control canny: OpenCV's upper hysteresis threshold")
    depth_model: str | None = option(None, "--control depth: a transformers depth-estimation folder or an id in "
                                           "your Hugging Face cache (never downloaded)", metavar="PATH_OR_ID")
    noise_regularization: bool = option(False, "pix2pix-zero: push each predicted noise of the inversion towards "
                                               "white Gaussian noise (auto-correlation and KL penalties, weights "
                                               f"{defaults.NOISE_REG_AUTO_CORR:g}/{defaults.NOISE_REG_KL:g}, "
                                               f"{defaults.NOISE_REG_STEPS} steps)", commands=(EDIT,))
    null_text: bool = option(False, "null-text inversion before editing: faithful reconstruction, slower",
                             commands=(EDIT,))
    save_attention: str | None = option(None, "save the cross-attention maps of WORD per frame as an image grid",
                                        commands=(EDIT,), metavar="WORD")
    fps: float | None = option(None, "frame rate of the outputs (default: the source's / stride)", commands=(EDIT,))
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    dtype: str = option("auto", "precision: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16",
                        choices=("auto", "fp32", "fp16", "bf16"))
    out: str | None = option(None, "run folder (default: a new folder under ./outputs/)", path=True, metavar="DIR")
    overwrite: bool = option(False, "replace an existing run folder")
    quiet: bool = option(False, "no progress bars or messages")

    # Not options: where the values came from. `explicit`: the names the user set (a file, flags, a form), which
    # a model's own defaults leave alone; `model_defaults`: the values the model's ei2_defaults.json gave.
    explicit: frozenset = field(default=frozenset(), compare=False, repr=False, metadata=RECORD)
    model_defaults: dict = field(default_factory=dict, compare=False, repr=False, metadata=RECORD)

    def to_dict(self) -> dict:
        """The options (not where they came from)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RECORD_FIELDS}


def fields_for(command: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Settings) if command in f.metadata["commands"]]


def _base_type(f: dataclasses.Field):
    hint = typing.get_type_hints(Settings)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return list
    return args[0] if args else hint


def flag(name: str) -> str:
    """The command-line flag of a settings field: `inference_steps` -> `--inference-steps`."""
    return "--" + name.replace("_", "-")


def parse_frames(value) -> int | str:
    """`--frames`: a number, or `all` (every frame of the video)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'frames' must be an integer, got {value!r} (or \"all\": every frame)")
    return value


def _check_type(name: str, value, kind, where: str):
    """Value of a YAML key, checked against the field type (ints are accepted for floats)."""
    if value is None:
        return None
    if name.replace("-", "_") == "frames":
        try:
            return parse_frames(value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name!r} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name!r} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name!r} must be a number, got {value!r}")
        return float(value)
    if kind is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}: {name!r} must be a string or a list of strings, got {value!r}")
        return list(items)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("model", "out", "video", "adapter"):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name!r} must be a string, got {value!r}")
    return value


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict:
    """The mapping in a YAML file; a missing file, invalid YAML or another shape is one ConfigError."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike, command: str) -> dict:
    """Settings from a YAML file: known keys of `command`, type-checked; paths relative to the file's folder."""
    path = Path(path)
    data = read_yaml_mapping(path, "config file", "a mapping of option: value")
    known = {f.name: f for f in fields_for(command)}
    everything = {f.name for f in dataclasses.fields(Settings)} - set(RECORD_FIELDS)
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key == "target_prompts":
            key = "target_prompt"
        if key not in known:
            if key in everything:
                raise ConfigError(f"{path}: key {raw_key!r} is not an option of `ei2 {command}`")
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {raw_key!r}{hint}; known keys: {', '.join(sorted(known))}")
        f = known[key]
        if f.metadata["nargs"]:  # `0.8`, `[0.8, panda=0.3]` or `{panda: 0.3}` -> ["0.8", "panda=0.3"]
            if isinstance(value, dict):
                value = [f"{k}={v}" for k, v in value.items()]
            items = value if isinstance(value, list) else [value]
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in items]
        value = _check_type(str(raw_key), value, _base_type(f), str(path))
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise ConfigError(f"{path}: {raw_key!r} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        if f.metadata["path"] and value is not None:
            value = str((path.parent / Path(value).expanduser()))
        elif key == "model" and value is not None and (path.parent / value).is_dir():
            value = str(path.parent / value)  # a folder beside the YAML file; otherwise a hub id or path as given
        values[key] = value
    return values


def add_arguments(parser, command: str) -> None:
    """Flags of `command`, all defaulting to None so that only the given ones override the YAML file."""
    import argparse

    for f in fields_for(command):
        kind = _base_type(f)
        if f.name == "video":
            parser.add_argument("video", nargs="?", default=None, help=f.metadata["help"])
            continue
        help_text = f.metadata["help"]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, False) and not isinstance(default, list):
            help_text += f" (default: {default})"
        kwargs = {"default": None, "help": help_text, "dest": f.name}
        if kind is bool:
            if f.default is True:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_const"
                kwargs["const"] = True
        elif kind is list and f.metadata["nargs"]:
            kwargs.update(nargs="+", metavar=f.metadata["metavar"] or "TEXT")
        elif kind is list:
            kwargs.update(action="append", metavar="TEXT")
        else:
            kwargs["type"] = _frames_argument if f.name == "frames" else kind
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata["metavar"]:
                kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag(f.name), **kwargs)


def _frames_argument(text: str) -> int | str:
    import argparse

    try:
        return parse_frames(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames or `all`") from None


def resolve(command: str, args, config_path: str | None) -> Settings:
    """Defaults < YAML file < flags given on the command line.

    The names set by the file or the flags are kept in `settings.explicit`, so that a model's own
    defaults (`apply_model_defaults`) replace only the generic ones.
    """
    values = load_yaml(config_path, command) if config_path else {}
    for f in fields_for(command):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    settings = Settings(**values)
    settings.explicit = frozenset(values)
    return settings


MODEL_DEFAULTS_FILE = defaults.MODEL_DEFAULTS_FILE
MODEL_DEFAULT_KEYS = ("frames", "window", "anchor_frames", "stride", "width", "height", "steps", "lr", "inference_steps", "guidance_scale",
                      "guidance_rescale", "guidance_rescale_std", "strength", "noise_regularization",
                      "inject_features", "inject_attention", "inject_block",
                      "negative_prompt", "fps")

# model defaults that a `--p2p` edit does not take (see `apply_model_defaults`)
PLAIN_EDIT_ONLY = ("inject_features", "inject_attention", "inject_block", "strength")
# keys of ei2_defaults.json that are not options: the structure conditions the model bundles a ControlNet for
# (kind -> folder inside the model folder), and the defaults of a controlled edit (`--control`)
MODEL_CONTROLNETS = "controlnets"
MODEL_NOTES = "notes"
MODEL_CONTROLLED = "controlled"
NO_CONTROL = "none"


def controlled(s: Settings) -> bool:
    """Whether the settings ask for a structure condition (`--control KIND_OR_PATH`, not `none`)."""
    return bool(s.control) and s.control != [NO_CONTROL]


def apply_model_defaults(settings: Settings, model_dir: str | os.PathLike | None, command: str) -> dict:
    """Size-dependent defaults that follow the model (DESIGN §1.6): `<model>/ei2_defaults.json`.

    A model folder may hold e.g. `{"steps": 100, "inference_steps": 25}`; those values replace the
    generic defaults of options the user did not set. Returns the values applied.

    The model's injection fractions (`inject_*`) and edit strength apply to plain edits only
    (`PLAIN_EDIT_ONLY`): with `--p2p` the source branch's attention maps and local blending already hold the
    layout; injecting on top of them collapsed a frame of the Shapes P2P colour swap, and so did the Shapes
    model's strength 0.6 (`benchmarks/injection/RESULTS.md`); `--inject-*`/`--strength` given with `--p2p` apply.

    A plain edit with `--control` takes the model's `"controlled"` defaults instead where it has them (the Shapes
    model: strength 1.0 and no injection; a structure condition holds the layout, and injection fights it).
    The model's `"controlnets"` (kind -> folder) are read by `bundled_controlnets`; its `"control"` (a kind or a
    list) is the condition of every edit and tuning that gives no `--control` (`--control none` turns it off).
    """
    import json

    if model_dir is None:
        return {}
    path = Path(model_dir) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object of option: value")
    known = {f.name: f for f in fields_for(command)}
    applied = {}
    data.pop(MODEL_CONTROLNETS, None)  # read by `bundled_controlnets`
    data.pop(MODEL_NOTES, None)  # read by `model_notes`
    default_control = data.pop("control", None)  # a condition every edit takes unless `--control` is given
    if default_control is not None:
        kinds = [default_control] if isinstance(default_control, str) else default_control
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ConfigError(f"{path}: 'control' must be a condition kind or a list of them")
        if "control" in known and "control" not in settings.explicit:
            settings.control = list(kinds)
            applied["control"] = list(kinds)
    controlled_defaults = data.pop(MODEL_CONTROLLED, {})
    if not isinstance(controlled_defaults, dict):
        raise ConfigError(f"{path}: {MODEL_CONTROLLED!r} must be an object of option: value")
    if "control" in known and controlled(settings) and not getattr(settings, "p2p", None):
        data.update(controlled_defaults)  # a controlled edit's own calibrated defaults replace the plain ones
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in MODEL_DEFAULT_KEYS:
            raise ConfigError(f"{path}: {key!r} cannot be a model default; allowed: {', '.join(MODEL_DEFAULT_KEYS)}")
        if name not in known or name in settings.explicit:
            continue
        if name in PLAIN_EDIT_ONLY and getattr(settings, "p2p", None):
            continue
        value = _check_type(key, value, _base_type(known[name]), str(path))
        setattr(settings, name, value)
        applied[name] = value
    return applied


def _model_entry(model_dir: str | os.PathLike | None, key: str, what: str) -> dict[str, str]:
    """The `{name: text}` mapping `key` of a model folder's ei2_defaults.json ({} where there is none)."""
    import json

    path = None if model_dir is None else Path(model_dir) / MODEL_DEFAULTS_FILE
    if path is None or not path.is_file():
        return {}
    try:
        entry = json.loads(path.read_text()).get(key, {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a valid JSON object ({e})") from e
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise ConfigError(f"{path}: {key!r} must map {what}")
    return entry


def bundled_controlnets(model_dir: str | os.PathLike | None) -> dict[str, str]:
    """The ControlNets a model folder bundles, `{kind: folder}` (its ei2_defaults.json's "controlnets")."""
    bundled = _model_entry(model_dir, MODEL_CONTROLNETS, "a condition kind to a ControlNet folder")
    return {k: str(Path(model_dir) / v) for k, v in bundled.items()}


def model_notes(model_dir: str | os.PathLike | None) -> dict[str, str]:
    """Measured warnings of a model folder, `{setting: text}` (its ei2_defaults.json's "notes"; e.g. "p2p": what
    Prompt-to-Prompt did on this model), for front ends to show beside that setting."""
    return _model_entry(model_dir, MODEL_NOTES, "a setting's name to a note")


def defaults_for(model_dir: str | os.PathLike | None, command: str, p2p: str | None = None,
                 control: list[str] | None = None) -> Settings:
    """The settings of `command` before the user sets anything: the generic defaults with the model's own
    (`apply_model_defaults`, with its rules) for an edit without or with `--p2p` (the web app's form).

    A front end that shows every option (the app) passes as `explicit` only the values that differ from
    these, so that an option left as shown gets the model's default exactly as a flag left out of a command
    line does: with `--p2p` the model's injection stays off and its strength is the generic one unless the user
    sets `--inject-*`/`--strength`; with `control` (a plain edit) the model's controlled-edit defaults apply.
    """
    settings = Settings(p2p=p2p, control=list(control or []))
    settings.explicit = frozenset({"control"} if control else ())  # a condition given replaces the model's
    apply_model_defaults(settings, model_dir, command)
    return settings

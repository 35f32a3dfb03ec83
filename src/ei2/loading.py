"""Loading and saving an EI2Pipeline's parts (DESIGN §5): devices and precisions, model folders and hub ids
(never downloaded when offline; one clear error for any failure), and the folder `save_pipeline` writes (a
diffusers Stable Diffusion folder plus the adapter). `EI2Pipeline.from_pretrained`/`save_pretrained` call these.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from . import defaults
from .errors import EI2Error, ModelError
from .files import save_tensors, staged_folder, write_json
from .models import VideoUNet
from .models.video_unet import ADAPTER_CONFIG, ADAPTER_FOLDER

MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



def default_model_path() -> Path:
    """The embedded Shapes model: `assets/shapes-sd` of the source tree."""
    import ei2

    return Path(ei2.__file__).resolve().parents[2] / "assets" / "shapes-sd"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise EI2Error(f"--device {device!r} is not a device; use auto, cuda, cuda:N, mps or cpu") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EI2Error("--device cuda: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EI2Error("--device mps: Apple MPS is not available here; use --device cpu (or auto)")
    return device


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """`auto`: fp16 mixed precision on CUDA (as Tune-A-Video), fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise EI2Error(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise EI2Error("--dtype fp16 needs a GPU; on the CPU use --dtype fp32 (or bf16)")
    return dtype


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (the hub libraries read it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value:
        return value.strip().lower() in ("1", "true", "yes", "on")
    with contextlib.suppress(Exception):
        import huggingface_hub.constants

        return bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    return False


def _needs_hub(source: str) -> bool:
    """Whether loading `source` must reach the Hugging Face Hub: a hub id not in the local cache. When the hub
    cannot be reached (no network), say so at once: the hub client would retry for a minute, line after line."""
    if Path(source).is_dir():
        return False
    with contextlib.suppress(Exception):
        from huggingface_hub import snapshot_download

        snapshot_download(source, local_files_only=True, allow_patterns=["model_index.json"])
        return False  # in the cache: loaded from there
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise ModelError(
            f"cannot load model {source!r}: it is not in the local Hugging Face cache and {host} cannot be reached "
            f"({e.strerror or e}); download it elsewhere and pass the local folder: --model /path/to/stable-diffusion"
        ) from None
    return True


def fit_prompt_length(tokenizer, text_encoder) -> None:
    """Make `tokenizer.model_max_length` the text encoder's prompt length when the tokenizer does not know it.

    A tokenizer config without `model_max_length` makes transformers report 1e30, which pads prompts to
    1e30 tokens (an OverflowError); the text encoder's `max_position_embeddings` is the real limit.
    """
    length = getattr(tokenizer, "model_max_length", None)
    limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if limit is not None and (length is None or length > limit):
        tokenizer.model_max_length = int(limit)
    elif length is None or length > 1_000_000:
        raise ModelError(
            "the tokenizer has no model_max_length and the text encoder no max_position_embeddings; add "
            '"model_max_length": 77 (the prompt length of Stable Diffusion) to tokenizer/tokenizer_config.json'
        )


def check_model_folder(path: Path) -> None:
    missing = [part for part in MODEL_PARTS if not (path / part).is_dir()]
    if missing:
        raise ModelError(
            f"{path} is not a diffusers Stable Diffusion folder: it has no {', '.join(p + '/' for p in missing)}; "
            f"pass a folder saved by StableDiffusionPipeline.save_pretrained (with {', '.join(MODEL_PARTS)})"
        )


def resolve_model(model) -> str:
    """A model folder (checked) or a hub id; None: the embedded Shapes model."""
    if model is None:
        path = default_model_path()
        if not path.is_dir():
            raise ModelError(
                f"the default Shapes model is not at {path} (it ships with the ei2 source tree); "
                "pass --model with a diffusers Stable Diffusion folder or hub id"
            )
        check_model_folder(path)
        return str(path)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: expected a diffusers model folder, got a file")
        check_model_folder(path)
        return str(path)
    text = str(model)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ModelError(f"model folder not found: {model}")
    return text  # a hub id, loaded through the ordinary diffusers from_pretrained

def load_error(model, source: str, error: Exception) -> ModelError:
    """One clear message for any failure to load `source`."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).is_dir():
        if "safetensors" in str(error).lower():
            return ModelError(f"cannot load {source}: {reason}; ei2 reads .safetensors weights only (no pickle files)")
        return ModelError(f"cannot load the model folder {source}: {reason}")
    return ModelError(
        f"cannot load model {model!r} from the Hugging Face Hub ({reason}); without network access, "
        "download it elsewhere and pass the local folder: --model /path/to/stable-diffusion "
        "(a diffusers folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )


def load_parts(model, recipe, adapter, weight_dtype, device) -> tuple[dict, str]:
    """The components of an `EI2Pipeline` from a diffusers Stable Diffusion folder or hub id (`resolve_model`), its
    UNet inflated with `recipe` (default: the adapter's recipe, else `ei2`) and the adapter loaded; -> (components
    on `device`, the model's source). A folder written by `save_pipeline` brings its own adapter."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model(model)
    if adapter is None and (Path(source) / ADAPTER_FOLDER / ADAPTER_CONFIG).is_file():
        adapter = Path(source) / ADAPTER_FOLDER  # a folder written by save_pipeline
    if adapter is not None:
        adapter_recipe = VideoUNet.read_adapter_recipe(adapter)
        if recipe is None:
            recipe = adapter_recipe
    recipe = recipe if recipe is not None else "ei2"
    local = {"local_files_only": True} if _hub_offline() or not _needs_hub(source) else {}
    try:
        unet2d = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True, **local)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True, torch_dtype=weight_dtype,
                                            **local)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True, **local)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **local)
    except EI2Error:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one clear message
        raise load_error(model, source, e) from e
    unet = VideoUNet.from_2d(unet2d, recipe=recipe, copy_weights=False)
    if adapter is not None:
        unet.load_adapter(adapter)
    parts = dict(vae=vae.to(device), text_encoder=text_encoder.to(device, weight_dtype), tokenizer=tokenizer,
                 unet=unet.to(device), scheduler=scheduler)
    return parts, str(source)


def save_pipeline(pipe, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> Path:
    """Write the pipeline as a diffusers Stable Diffusion folder plus its adapter; `EI2Pipeline.from_pretrained` reloads it.

    `unet/` holds the pretrained 2D UNet (not the tuned copy: the tuned tensors and the recipe are in
    `adapter/`), `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and `model_index.json` are as
    `StableDiffusionPipeline.save_pretrained` writes them, safetensors only. The folder appears whole
    (written beside it, then renamed); an existing folder is replaced.
    """
    import shutil

    from diffusers import __version__ as diffusers_version

    if not safe_serialization:
        raise ValueError("EI2Pipeline writes safetensors only; drop safe_serialization=False")
    if kwargs:
        raise TypeError(f"save_pretrained got unexpected arguments: {', '.join(kwargs)}")
    final = Path(save_directory)
    with staged_folder(final) as tmp:  # the folder appears whole
        (tmp / "unet").mkdir()
        pipe.unet.unet.save_config(tmp / "unet")
        base = {k: v.detach().cpu().contiguous() for k, v in pipe.unet.base_state_dict().items()}
        save_tensors(base, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        pipe.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        pipe.unet.save_adapter(tmp / ADAPTER_FOLDER)
        source = Path(getattr(pipe, "model_source", "") or "/nonexistent")
        if (source / defaults.MODEL_DEFAULTS_FILE).is_file():  # the model's own defaults travel with it
            shutil.copyfile(source / defaults.MODEL_DEFAULTS_FILE, tmp / defaults.MODEL_DEFAULTS_FILE)
        index = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "image_encoder": [None, None],
        }
        for name in MODEL_PARTS:
            module = pipe.unet.unet if name == "unet" else getattr(pipe, name)
            index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
        write_json(tmp / "model_index.json", dict(sorted(index.items())))  # sorted, as diffusers writes it
    return final

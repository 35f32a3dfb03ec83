"""VideoUNet: a pretrained diffusers UNet2DConditionModel inflated to video (DESIGN §1.2–1.5).

Composition, not copies: the 2D UNet is kept whole, its self-attention processors are swapped for
frame-attention processors, its transformer blocks are re-wired by `VideoTransformerBlock` (same
submodules, plus a temporal module at the recipe's position) and, with `group_norm="video"`, its
ResNet and output GroupNorms take statistics over all frames of a clip. Every 2D weight is the
pretrained tensor itself.

Frames are folded into the batch once, at entry, and unfolded once, at exit:
    sample  b c f h w -> (b f) c h w,   text  b L D -> (b f) L D
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput
from einops import rearrange
from safetensors.torch import load_file
from torch import nn

from ..files import check_digests, file_digest, save_tensors, staged_folder, write_json
from .context import VideoContext
from .frame_attention import frame_attention_processor
from .recipes import Recipe, get_recipe
from .temporal import ShiftRestrictedTemporalAttention, TemporalAttention

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FOLDER = "adapter"  # the adapter's folder inside a run folder or a saved pipeline
PRETRAINED_VALUES = "pretrained_values.safetensors"  # beside a saved VideoUNet: pretrained values of its tuned 2D tensors


class AdapterMismatchError(ValueError):
    """An adapter does not fit this base model or recipe."""


@dataclass
class VideoUNetOutput(BaseOutput):
    sample: torch.Tensor  # b c f h w


class VideoGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics span all frames of a clip: (b f) c h w is normalised as b c (f h w)."""

    def __init__(self, norm: nn.GroupNorm, context: VideoContext):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.weight, self.bias = norm.weight, norm.bias  # the pretrained tensors themselves
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.context.num_frames
        x5 = rearrange(x, "(b f) c h w -> b c f h w", f=f)
        x5 = F.group_norm(x5, self.num_groups, self.weight, self.bias, self.eps)
        return rearrange(x5, "b c f h w -> (b f) c h w")


class VideoTransformerBlock(nn.Module):
    """A Stable Diffusion transformer block (pre-norm, residual) with a temporal module inserted.

    Order is the recipe's: e.g. `ei2` runs FFAM -> STAM -> CA -> FF, `tune-a-video` SCA -> CA -> FF -> TA.
    norm1/attn1/norm2/attn2/norm3/ff are the 2D block's own modules (attn1 with a frame-attention
    processor); parameter names are unchanged.
    """

    def __init__(self, block: BasicTransformerBlock, temporal: nn.Module | None, position: str):
        super().__init__()
        unsupported = (
            block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None
            or block.attn2 is None or getattr(block, "fuser", None) is not None
        )
        if unsupported:
            raise ValueError("only Stable Diffusion 1.x/2.x transformer blocks (layer_norm, self+cross attention) can be inflated")
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        self.position = position
        # registered under its own name (`stam` or `temporal_attention`) so parameter names say what it is
        self.temporal_name = None
        if temporal is not None:
            self.temporal_name = "stam" if isinstance(temporal, ShiftRestrictedTemporalAttention) else "temporal_attention"
            self.add_module(self.temporal_name, temporal)

    @property
    def temporal(self) -> nn.Module | None:
        return getattr(self, self.temporal_name) if self.temporal_name else None

    def _temporal(self, hidden_states, position):
        if self.temporal_name is not None and self.position == position:
            return self.temporal(hidden_states)
        return hidden_states

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None):
        kwargs = cross_attention_kwargs or {}
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = self._temporal(hidden_states, "after-self")
        hidden_states = hidden_states + self.attn2(
            self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask, **kwargs,
        )
        hidden_states = self._temporal(hidden_states, "after-cross")
        hidden_states = hidden_states + self.ff(self.norm3(hidden_states))
        return self._temporal(hidden_states, "after-ff")


def transformer_levels(unet: UNet2DConditionModel):
    """Yield (transformer_2d, level): the spatial level of every Transformer2DModel, from the block structure."""
    level = 0
    for block in unet.down_blocks:
        for t in getattr(block, "attentions", None) or []:
            yield t, level
        if getattr(block, "downsamplers", None):
            level += 1
    for t in getattr(unet.mid_block, "attentions", None) or []:
        yield t, level
    for block in unet.up_blocks:
        for t in getattr(block, "attentions", None) or []:
            yield t, level
        if getattr(block, "upsamplers", None):
            level -= 1


@dataclass(frozen=True)
class BaseFingerprint:
    """Identifies a 2D UNet across dtypes and devices.

    `structure`: digest of its config and tensor names/shapes, compared exactly. `values`: per tensor,
    the mean |w| and the mean of its first 64 entries, compared with a relative tolerance, so the same
    weights in fp16 and fp32 match while another checkpoint of the same architecture does not.
    """

    structure: str
    values: tuple[float, ...]

    @classmethod
    def of(cls, unet: nn.Module) -> "BaseFingerprint":
        digest = hashlib.sha256()
        config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        values = []
        with torch.no_grad():
            for name, tensor in sorted(unet.state_dict().items()):
                digest.update(f"{name}{tuple(tensor.shape)}".encode())
                t = tensor.detach().flatten().float()
                values += [t.abs().mean().item(), t[:64].mean().item()]
        return cls(digest.hexdigest()[:16], tuple(round(v, 7) for v in values))

    def matches(self, other: "BaseFingerprint", rtol: float = 2e-3, atol: float = 1e-5) -> bool:
        return self.structure == other.structure and all(
            abs(a - b) <= atol + rtol * max(abs(a), abs(b)) for a, b in zip(self.values, other.values)
        )

    def to_dict(self) -> dict:
        return {"structure": self.structure, "values": list(self.values)}

    def __str__(self) -> str:  # a short id, e.g. for cache keys
        values = hashlib.sha256(" ".join(f"{v:.3g}" for v in self.values).encode()).hexdigest()[:8]
        return f"{self.structure}-{values}"

    @classmethod
    def from_dict(cls, data: dict) -> "BaseFingerprint":
        return cls(data["structure"], tuple(data["values"]))


class VideoUNet(ModelMixin, ConfigMixin):
    """A text-to-video UNet made from a text-to-image UNet and a `Recipe`.

    Call with `sample` (b, c, f, h, w), `timestep` (scalar or (b,)), `encoder_hidden_states` (b, L, D).

    A diffusers model (`ModelMixin`, `ConfigMixin`): `save_pretrained`/`from_pretrained` (safetensors), `.to()`,
    `.dtype`, `.device` are diffusers'. Its config holds what rebuilds it without the code that made it:
    `unet_config` (the 2D UNet's own config), `recipe` (`Recipe.to_dict()`), `base_fingerprint` (the pretrained
    2D weights it was inflated from, which adapters are checked against) and `init_seed`. The 2D UNet's config
    is `config.unet_config` (e.g. `config.unet_config["sample_size"]`), or `unet.config` of the 2D UNet itself.

        video_unet = VideoUNet.from_2d(unet2d, recipe="ei2")   # inflate a pretrained 2D UNet
        video_unet.save_pretrained("folder")                    # config.json + diffusion_pytorch_model.safetensors
        VideoUNet.from_pretrained("folder")                     # the same model, tuned tensors included

    `save_adapter`/`load_adapter` write and read the tuned tensors only (an adapter, not a model).
    """

    ignore_for_config = ["unet"]  # an existing 2D UNet to inflate (`from_2d`); its config goes to `unet_config`
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict | None = None, recipe: "str | dict | Recipe" = "ei2",
                 base_fingerprint: dict | None = None, init_seed: int = 0, unet: UNet2DConditionModel | None = None):
        """Build the 2D UNet from `unet_config` (random weights, as any diffusers model built from a config; use
        `from_2d` or `from_pretrained` for pretrained ones) or take `unet` itself, and inflate it with `recipe`.

        `base_fingerprint`: `BaseFingerprint.to_dict()` of the pretrained 2D weights (default: of the 2D UNet here).
        New temporal modules are initialised from `init_seed`, not from the global RNG.
        """
        super().__init__()
        if (unet is None) == (unet_config is None):
            raise ValueError("VideoUNet needs the 2D UNet's config (unet_config) or the 2D UNet itself (unet), one of them; "
                             "to inflate a pretrained 2D UNet use VideoUNet.from_2d(unet2d, recipe)")
        if unet is None:
            unet = UNet2DConditionModel.from_config(unet_config)
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, Mapping) else get_recipe(recipe)
        fingerprint = (BaseFingerprint.from_dict(base_fingerprint) if base_fingerprint is not None
                       else BaseFingerprint.of(unet))
        # the config as JSON reads it back (lists, no private keys), so a reloaded model's config is equal
        self.register_to_config(
            unet_config=json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")})),
            recipe=recipe.to_dict(), base_fingerprint=fingerprint.to_dict(),
        )
        self.unet = unet
        self.recipe = recipe
        self.base_fingerprint = fingerprint
        self.context = VideoContext()
        # new temporal modules are initialised from their own seed: the same inflation every time,
        # whatever the global RNG state (reproducible runs, resumable tuning)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._inflate()

    @classmethod
    def from_2d(cls, unet2d: UNet2DConditionModel, recipe: "str | Recipe" = "ei2", adapter: str | Path | None = None,
                copy_weights: bool = True, init_seed: int = 0) -> "VideoUNet":
        """Inflate `unet2d` with `recipe` (a name in `ei2.RECIPES` or a `Recipe`).

        The 2D model is deep-copied unless `copy_weights=False` (then it is modified in place, saving memory).
        With `adapter`, its tuned tensors are loaded (and its recipe is used when `recipe` is None).
        New temporal modules are initialised from `init_seed`, not from the global RNG.
        """
        if recipe is None:
            if adapter is None:
                raise ValueError("give a recipe or an adapter")
            recipe = cls.read_adapter_recipe(adapter)
        recipe = get_recipe(recipe)
        fingerprint = BaseFingerprint.of(unet2d)
        unet = copy.deepcopy(unet2d) if copy_weights else unet2d
        model = cls(recipe=recipe, base_fingerprint=fingerprint.to_dict(), init_seed=init_seed, unet=unet)
        if adapter is not None:
            model.load_adapter(adapter)
        return model

    def _inflate(self):
        recipe, context, unet = self.recipe, self.context, self.unet
        unet.set_attn_processor(AttnProcessor2_0())
        for transformer, level in list(transformer_levels(unet)):
            blocks = transformer.transformer_blocks
            for i, block in enumerate(blocks):
                heads = block.attn1.heads
                dim = block.norm1.normalized_shape[0]
                block.attn1.set_processor(
                    frame_attention_processor(recipe.frame_attention, context, level, recipe.coarse_factor)
                )
                temporal = {
                    "none": lambda: None,
                    "stam": lambda: ShiftRestrictedTemporalAttention(dim, heads, context),
                    "ta": lambda: TemporalAttention(dim, heads, context),
                }[recipe.temporal]()
                if temporal is not None:
                    temporal.to(device=block.norm1.weight.device, dtype=block.norm1.weight.dtype)
                blocks[i] = VideoTransformerBlock(block, temporal, recipe.temporal_position)
        if recipe.group_norm == "video":
            for resnet in [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]:
                resnet.norm1 = VideoGroupNorm(resnet.norm1, context)
                resnet.norm2 = VideoGroupNorm(resnet.norm2, context)
            if unet.conv_norm_out is not None:
                unet.conv_norm_out = VideoGroupNorm(unet.conv_norm_out, context)

    # ---- diffusers save/load: the model as it is, plus the pretrained values of tuned 2D tensors -----------
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        safe_serialization: bool = True, **kwargs):
        """diffusers' `save_pretrained` (config.json + diffusion_pytorch_model.safetensors), safetensors only.

        A tuned model also writes the pretrained values of its tuned 2D tensors (`pretrained_values.safetensors`,
        a few query maps), so that after `from_pretrained` `base_state_dict` still gives the pretrained 2D UNet.
        """
        if not safe_serialization:
            raise ValueError("VideoUNet writes safetensors only (no pickle); drop safe_serialization=False")
        super().save_pretrained(save_directory, is_main_process=is_main_process, safe_serialization=True, **kwargs)
        if not is_main_process:
            return
        path = Path(save_directory) / PRETRAINED_VALUES
        base = getattr(self, "_base_values", None)
        if base:
            save_tensors({k: v.contiguous() for k, v in base.items()}, str(path), metadata={"format": "pt"})
        elif path.exists():
            path.unlink()  # a stale file of an earlier save into the same folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' `from_pretrained`; a local folder's `pretrained_values.safetensors` is read back too."""
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if (folder / PRETRAINED_VALUES).is_file():
            model._base_values = load_file(str(folder / PRETRAINED_VALUES))
        return loaded

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                cross_attention_kwargs: dict | None = None, control=None,
                down_block_additional_residuals: tuple | None = None,
                mid_block_additional_residual: torch.Tensor | None = None, return_dict: bool = True):
        """`control`: a structure condition (`ei2.structure.StructureControl`), called on the folded frames for
        ControlNet residuals; `down_block_additional_residuals` / `mid_block_additional_residual`: residuals
        already computed, in the `(b f)` layout a 2D ControlNet returns for frames folded into the batch (as
        diffusers' `UNetMotionModel` takes them). Both may be given: they add."""
        if sample.ndim != 5:
            raise ValueError(f"sample must be (b, c, f, h, w), got shape {tuple(sample.shape)}")
        b, _, f, h, w = sample.shape
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"text embeddings have batch {encoder_hidden_states.shape[0]}, latents have {b}")
        self.context.set(f, h, w)
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 1 and timestep.shape[0] == b:
            timestep = timestep.repeat_interleave(f)  # (b f)
        folded = rearrange(sample, "b c f h w -> (b f) c h w")
        text = encoder_hidden_states.repeat_interleave(f, dim=0)  # (b f) L D
        down, mid = down_block_additional_residuals, mid_block_additional_residual
        residuals = control(folded, timestep, text) if control is not None else None
        if residuals is not None:
            down = residuals[0] if down is None else [a + r for a, r in zip(down, residuals[0])]
            mid = residuals[1] if mid is None else mid + residuals[1]
        out = self.unet(
            folded, timestep, text, cross_attention_kwargs=cross_attention_kwargs,
            down_block_additional_residuals=None if down is None else tuple(down),
            mid_block_additional_residual=mid, return_dict=False,
        )[0]
        out = rearrange(out, "(b f) c h w -> b c f h w", f=f)
        return VideoUNetOutput(sample=out) if return_dict else (out,)

    # ---- tuning --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every tensor the recipe tunes; names are relative to the 2D UNet."""
        return [(name, p) for name, p in self.unet.named_parameters() if self.recipe.is_trainable("unet." + name)]

    def set_trainable(self) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze the recipe's trainable tensors; returns them."""
        self._keep_base_values()
        self.requires_grad_(False)
        params = [p for _, p in self.trainable_parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def load_tune_a_video(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a Tune-A-Video UNet state dict (its `attn_temp`/`norm_temp` names) into a TA recipe.

        Tune-A-Video's 2D parts have diffusers' names; its temporal module is `attn_temp` (attention)
        and `norm_temp` (LayerNorm), here `temporal_attention.attn` and `temporal_attention.norm`.
        """
        if self.recipe.temporal != "ta":
            raise ValueError(f"Tune-A-Video weights need a recipe with TA; {self.recipe.name!r} uses {self.recipe.temporal!r}")
        renamed = {
            k.replace(".attn_temp.", ".temporal_attention.attn.").replace(".norm_temp.", ".temporal_attention.norm."): v
            for k, v in state_dict.items()
        }
        missing, unexpected = self.unet.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise ValueError(f"not a Tune-A-Video UNet of this architecture: {len(missing)} missing tensors "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")

    # ---- base weights --------------------------------------------------------------------------
    def _temporal_prefixes(self) -> list[str]:
        return [f"{n}.{m.temporal_name}." for n, m in self.unet.named_modules()
                if isinstance(m, VideoTransformerBlock) and m.temporal_name]

    def _keep_base_values(self) -> None:
        """Before pretrained 2D tensors first change (tuning, an adapter), keep their values (CPU) for `base_state_dict`."""
        if getattr(self, "_base_values", None) is None:
            prefixes = self._temporal_prefixes()
            self._base_values = {name: p.detach().to("cpu", copy=True) for name, p in self.trainable_parameters()
                                 if not any(name.startswith(q) for q in prefixes)}

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The 2D UNet's state dict with its pretrained values: no temporal tensors, tuned 2D tensors as they were
        before `set_trainable`/`load_adapter` (a base model plus an adapter rebuild this model exactly)."""
        prefixes = self._temporal_prefixes()
        state = {k: v for k, v in self.unet.state_dict().items() if not any(k.startswith(q) for q in prefixes)}
        for name, value in (getattr(self, "_base_values", None) or {}).items():
            state[name] = value.to(state[name].dtype)
        return state

    # ---- adapters ------------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter folder: tuned tensors (safetensors), recipe + base fingerprint (JSON).

        The folder appears whole: it is written as a temporary sibling and renamed into place. An existing
        adapter folder there is replaced; a folder holding anything else is refused.
        """
        directory = Path(directory)
        if directory.exists():
            other = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else [directory.name]
            if not directory.is_dir() or set(other) - {ADAPTER_WEIGHTS, ADAPTER_CONFIG}:
                raise FileExistsError(f"{directory} exists and is not an ei2 adapter folder (it holds {', '.join(other)}); "
                                      "save the adapter into a new folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.trainable_parameters()}
        meta = {
            "format": "ei2-adapter",
            "version": 1,
            "recipe": self.recipe.to_dict(),
            "base_fingerprint": self.base_fingerprint.to_dict(),
            "tensors": len(tensors),
        }
        with staged_folder(directory) as tmp:  # the folder is the old adapter or the new one, never a mix
            save_tensors(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            meta["sha256"] = file_digest(tmp / ADAPTER_WEIGHTS)  # load_adapter refuses weights that do not match
            write_json(tmp / ADAPTER_CONFIG, meta)
        return directory

    @staticmethod
    def adapter_folder(directory: str | Path) -> Path:
        """The adapter folder itself, or the `adapter/` folder of a run or saved-pipeline folder that holds one."""
        directory = Path(directory)
        if not (directory / ADAPTER_CONFIG).is_file() and (directory / ADAPTER_FOLDER / ADAPTER_CONFIG).is_file():
            return directory / ADAPTER_FOLDER
        return directory

    @classmethod
    def _read_adapter_meta(cls, directory: str | Path) -> dict:
        directory = cls.adapter_folder(directory)
        path = directory / ADAPTER_CONFIG
        if not path.is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
            raise AdapterMismatchError(
                f"{directory} is not an ei2 adapter (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); make one with `ei2 tune`"
            )
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AdapterMismatchError(f"{path} is not valid JSON ({e}); re-create the adapter with `ei2 tune`") from e
        if meta.get("format") != "ei2-adapter":
            raise AdapterMismatchError(f"{path} is not an ei2 adapter file")
        return meta

    @staticmethod
    def _read_adapter_tensors(directory: Path, meta: dict) -> dict[str, torch.Tensor]:
        """The adapter's tensors, after checking them against the digest written with them (adapters written
        before digests are read as they are); a damaged file is an `AdapterMismatchError`, never a traceback."""
        path = Path(directory) / ADAPTER_WEIGHTS
        if "sha256" in meta and check_digests(directory, {ADAPTER_WEIGHTS: meta["sha256"]}):
            raise AdapterMismatchError(f"adapter {path} is damaged (its bytes do not match the digest in "
                                       f"{ADAPTER_CONFIG}); tune it again with `ei2 tune`")
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterMismatchError(f"adapter {path} cannot be read ({e}); tune it again with `ei2 tune`") from e

    @classmethod
    def read_adapter_recipe(cls, directory: str | Path) -> Recipe:
        return Recipe.from_dict(cls._read_adapter_meta(directory)["recipe"])

    def load_adapter(self, directory: str | Path) -> None:
        """Load tuned tensors; refuses an adapter made for another base model or another recipe.

        `directory`: an adapter folder, or a run folder with an `adapter/` folder in it.
        """
        directory = self.adapter_folder(directory)
        meta = self._read_adapter_meta(directory)
        recipe = Recipe.from_dict(meta["recipe"])
        if recipe != self.recipe:
            raise AdapterMismatchError(
                f"adapter {directory} was tuned with recipe {recipe.name!r}, this model uses {self.recipe.name!r}; "
                f"pass --recipe {recipe.name} (or no --recipe) to use it"
            )
        base = BaseFingerprint.from_dict(meta["base_fingerprint"])
        if not base.matches(self.base_fingerprint):
            kind = "weights" if base.structure == self.base_fingerprint.structure else "architecture"
            raise AdapterMismatchError(
                f"adapter {directory} was tuned on another base model (its {kind} differ: adapter base "
                f"{base.structure}, this model {self.base_fingerprint.structure}); use the --model it was made "
                f"with, or tune again"
            )
        tensors = self._read_adapter_tensors(directory, meta)
        own = dict(self.trainable_parameters())
        if set(tensors) != set(own):
            raise AdapterMismatchError(f"adapter {directory} holds other tensors than recipe {recipe.name!r} tunes")
        self._keep_base_values()
        with torch.no_grad():
            for name, value in tensors.items():
                if value.shape != own[name].shape:
                    raise AdapterMismatchError(f"adapter tensor {name} has shape {tuple(value.shape)}, model has {tuple(own[name].shape)}")
                own[name].copy_(value)

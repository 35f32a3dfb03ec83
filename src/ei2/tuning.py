"""One-shot tuning of a VideoUNet on the source video (DESIGN §1.6).

Diffusion loss on the source latents `(b, c, f, h, w)` and the source prompt: x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps with the DDPM noise schedule of the pretrained model, t ~ U{0..T-1} per clip, MSE
between the model output and the scheduler's `prediction_type` target (eps, or v = sqrt(a_t) eps -
sqrt(1 - a_t) x0). Only the recipe's trainable tensors move (`VideoUNet.set_trainable`). Defaults are
Tune-A-Video's: AdamW lr 3e-5 (weight decay 1e-2), 500 steps, grad clip 1.0, gradient checkpointing,
mixed precision fp16/bf16 on GPU and fp32 on CPU (through accelerate).

Checkpoints (`checkpoint_dir/step-NNNNNN/`, written atomically, the latest kept) hold the trainable
tensors, the optimizer state, the noise generator and torch RNG states and the spectral-norm singular
vectors of STAM, so a resumed run produces the same tensors as an uninterrupted one.

Long videos (DESIGN §1.10): with `window` shorter than the video, each step tunes on one clip of `window`
consecutive frames, its first frame drawn uniformly from the same seeded generator before the noise
(`b c f h w -> b c window h w`): the same seed gives the same clips, and a resumed run continues them.
A clip is tuned as a short video of its own (no anchor frames).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import defaults
from .errors import TuningError
from .files import write_json
from .inversion import tensor_hash

MIXED_PRECISIONS = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "step-"


@dataclass
class TuningConfig:
    """Settings of one-shot tuning; the defaults are Tune-A-Video's."""

    steps: int = defaults.STEPS
    learning_rate: float = defaults.LEARNING_RATE
    max_grad_norm: float = defaults.MAX_GRAD_NORM
    adam_beta1: float = defaults.ADAM_BETA1
    adam_beta2: float = defaults.ADAM_BETA2
    adam_weight_decay: float = defaults.ADAM_WEIGHT_DECAY
    adam_epsilon: float = defaults.ADAM_EPSILON
    mixed_precision: str = "no"  # "no" (fp32), "fp16" or "bf16"
    gradient_checkpointing: bool = True
    checkpoint_every: int = 0  # 0: no checkpoints
    seed: int = 0
    window: int | None = None  # frames of the clip tuned at each step (None, or >= the video: the whole video)

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be 0 or more, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 frame, got {self.window}")


@dataclass
class TuningResult:
    losses: list[float] = field(default_factory=list)  # one per step, including steps before a resume
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0  # wall time of the steps run in this call
    seconds_per_step: float | None = None
    clip_starts: list[int] = field(default_factory=list)  # first frame of each step's clip (this call's steps)


def _accelerator(mixed_precision: str, device: torch.device):
    from accelerate import Accelerator

    # accelerate's state is a process-wide singleton; every tuning run sets its own precision
    _reset_accelerate_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _target(noise_scheduler, latents, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TuningError(f"prediction_type {kind!r} is not supported; use an epsilon or v-prediction model")


def names_hash(names: list[str]) -> str:
    """Digest of an ordered list of parameter names (the names themselves, not their lengths)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] + f":{len(names)}"


def tuning_identity(unet, latents: torch.Tensor, text_emb: torch.Tensor, names: list[str],
                    window: int | None = None) -> dict:
    """What a checkpoint must match to be resumed: recipe contents, base model, data, trainable names, clip length."""
    return {
        "recipe": unet.recipe.digest(),
        "base_fingerprint": str(unet.base_fingerprint),
        "data": tensor_hash(latents.float(), text_emb.float()),
        "trainable": names_hash(names),
        "window": window,
    }


def _spectral_modules(unet) -> dict[str, torch.nn.Module]:
    from .models.temporal import SpectralNormalization

    return {name: m for name, m in unet.named_modules() if isinstance(m, SpectralNormalization)}


def tune(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    config: TuningConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> TuningResult:
    """Tune `unet` (a VideoUNet) in place on `latents` `(b, c, f, h, w)` with text `(b, L, D)`.

    `noise_scheduler` gives the noise schedule and prediction type (any diffusers scheduler with
    `add_noise`, `get_velocity` and `config.num_train_timesteps`, e.g. the model's DDPMScheduler).
    With `resume`, continues from the latest checkpoint in `checkpoint_dir`.
    `callback(step, loss)` runs after every step (and after its checkpoint is written).
    """
    config = config or TuningConfig()
    if latents.ndim != 5:
        raise ValueError(f"latents must be (b, c, f, h, w), got {tuple(latents.shape)}")
    device = latents.device
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if config.checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")

    params = unet.set_trainable()
    names = [name for name, _ in unet.trainable_parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    accelerator = _accelerator(config.mixed_precision, device)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    generator = torch.Generator().manual_seed(config.seed)  # noise and timesteps, drawn on the CPU
    num_frames = latents.shape[2]
    window = config.window if config.window is not None and config.window < num_frames else None
    identity = tuning_identity(unet, latents, text_emb, names, window)
    result = TuningResult()
    start = 0
    if resume:
        start, result.losses = _load_checkpoint(checkpoint_dir, unet, names, optimizer, accelerator, generator, identity)
        result.resumed_from = start
        if start > config.steps:
            raise TuningError(f"the checkpoint in {checkpoint_dir} is at step {start}, past --steps {config.steps}")

    was_training = unet.training
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    bar = tqdm(total=config.steps, initial=start, desc="tuning", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, config.steps + 1):
            clip = latents
            if window is not None:  # one clip of `window` consecutive frames: b c f h w -> b c window h w
                first = int(torch.randint(0, num_frames - window + 1, (1,), generator=generator))
                clip = latents[:, :, first : first + window]
                result.clip_starts.append(first)
            noise = torch.randn(clip.shape, generator=generator).to(device, clip.dtype)
            timesteps = torch.randint(0, num_train_timesteps, (clip.shape[0],), generator=generator).to(device)
            noisy = noise_scheduler.add_noise(clip, noise, timesteps)
            with accelerator.autocast():
                prediction = unet(noisy, timesteps, text_emb).sample
            loss = F.mse_loss(prediction.float(), _target(noise_scheduler, clip, noise, timesteps).float())
            value = loss.item()
            if not math.isfinite(value):
                raise TuningError(
                    f"tuning loss became {value} at step {step} (lr {config.learning_rate:g}, "
                    f"precision {config.mixed_precision}); lower --lr"
                    + (" or use --dtype bf16/fp32" if config.mixed_precision == "fp16" else "")
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(value)
            bar.update()
            bar.set_postfix(loss=f"{value:.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                _save_checkpoint(checkpoint_dir, step, unet, names, optimizer, accelerator, generator, identity,
                                 result.losses, config)
            if callback is not None:
                callback(step, value)
    finally:
        bar.close()
        unet.train(was_training)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.requires_grad_(False)
        _reset_accelerate_state()
    result.steps = config.steps
    result.seconds = time.perf_counter() - t0
    ran = config.steps - start
    result.seconds_per_step = result.seconds / ran if ran else None
    return result


def _reset_accelerate_state():
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)


# ---------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
            and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _save_checkpoint(checkpoint_dir: Path, step, unet, names, optimizer, accelerator, generator, identity, losses,
                     config):
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = checkpoint_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    own = dict(unet.trainable_parameters())
    save_file({n: own[n].detach().cpu().contiguous() for n in names}, str(tmp / "trainable.safetensors"))

    state = optimizer.state_dict()  # accelerate's wrapper returns the torch optimizer's
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    if tensors:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"noise_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = s
    for name, module in _spectral_modules(unet).items():
        if module._u is not None:
            rng[f"spectral.{name}.u"] = module._u.detach().cpu().contiguous()
            rng[f"spectral.{name}.v"] = module._v.detach().cpu().contiguous()
    save_file(rng, str(tmp / "state.safetensors"))
    meta = {
        "format": "ei2-tuning-checkpoint",
        "step": step,
        "identity": identity,
        "losses": losses,
        "config": dataclasses.asdict(config),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
        "optimizer_scalars": scalars,
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
    }
    write_json(tmp / "checkpoint.json", meta)
    os.replace(tmp, final)
    for old in checkpoint_dir.iterdir():  # keep only the latest
        if old != final and old.name.startswith(CHECKPOINT_PREFIX) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(checkpoint_dir: Path, unet, names, optimizer, accelerator, generator, identity):
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        raise TuningError(f"--resume: no tuning checkpoint in {checkpoint_dir}; run without --resume to start over")
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        state = load_file(str(path / "state.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors")) if (path / "optimizer.safetensors").exists() else {}
    except Exception as e:
        raise TuningError(f"--resume: checkpoint {path} is damaged ({e}); delete it to resume from an earlier one") from e
    for key, label in (("recipe", "recipe"), ("base_fingerprint", "base model"), ("data", "video and prompt"),
                       ("trainable", "trainable tensors"), ("window", "--window")):
        if meta["identity"].get(key) != identity[key]:
            raise TuningError(
                f"--resume: checkpoint {path} was made with another {label}; "
                f"use the settings of the interrupted run or drop --resume"
            )
    own = dict(unet.trainable_parameters())
    with torch.no_grad():
        for n in names:
            own[n].copy_(trainable[n])
    device = next(iter(own.values())).device
    per_param: dict[int, dict] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"]):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if meta.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    generator.set_state(state["noise_generator"])
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for name, module in _spectral_modules(unet).items():
        if f"spectral.{name}.u" in state:
            # the next forward warm-starts its power iteration from these, as the uninterrupted run does
            module._u, module._v = state[f"spectral.{name}.u"].to(device), state[f"spectral.{name}.v"].to(device)
            module._key = None
    return int(meta["step"]), list(meta["losses"])

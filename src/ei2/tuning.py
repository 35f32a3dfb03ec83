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

Micro-batches and processes: an optimiser step averages the gradients of K = N x A micro-batches, A =
`gradient_accumulation` in each of the N processes of `accelerate launch --multi_gpu --num_processes N` that tune
together (torch.distributed's, when `tune(across_processes=True)` or inside `with across_processes():`, as
`ei2 tune` and `ei2 edit` call it; else N = 1: every process tunes alone, as `ei2 bench`'s processes each tune
their own jobs). Micro-batch k of a step is the k-th (clip start, noise,
timesteps) drawn from the one seeded generator, which every process runs through all K of them in order:
process r trains on micro-batches r A .. r A + A - 1 and draws the others only to stay in step (a few random
numbers of the clip's size). The gradients are summed over the micro-batches and, with one `all_reduce` of all
trainable gradients per step, over the processes, then divided by K; then one clip at `max_grad_norm` and one
AdamW step, the same in every process. So N processes give the tensors of one process with
`gradient_accumulation` N x A (up to the order of a floating-point sum; for K = 1 exactly the runs from before
micro-batches). The loss of a step is the mean over its K micro-batches. Only rank 0 writes checkpoints (the
others wait at a barrier); a resume is read by rank 0 and broadcast, and needs the same K (any N x A giving it
continues the same run).
"""
from __future__ import annotations

import contextlib
import contextvars
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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import defaults
from .distributed import barrier, broadcast_parameters, processes
from .errors import TuningError
from .files import check_digests, file_digest, save_tensors, staged_folder, write_json
from .inversion import tensor_hash

MIXED_PRECISIONS = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "step-"
_ACROSS_PROCESSES = contextvars.ContextVar("ei2_tuning_across_processes", default=False)


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
    gradient_accumulation: int = 1  # micro-batches per optimiser step in each process (their gradients averaged)

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be 0 or more, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 frame, got {self.window}")
        if self.gradient_accumulation < 1:
            raise ValueError(f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}")


@dataclass
class TuningResult:
    losses: list[float] = field(default_factory=list)  # one per step, including steps before a resume
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0  # wall time of the steps run in this call
    seconds_per_step: float | None = None
    clip_starts: list[int] = field(default_factory=list)  # first frame of each micro-batch's clip (this call's steps)
    processes: int = 1  # processes that shared the tuning
    micro_batches: int = 1  # micro-batches per step, over all processes (processes x gradient_accumulation)


def _accelerator(mixed_precision: str, device: torch.device):
    from accelerate import Accelerator

    # accelerate's state is a process-wide singleton; every tuning run sets its own precision
    _reset_accelerate_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


@contextlib.contextmanager
def across_processes(enabled: bool = True):
    """Inside this block `tune` shares its steps among the processes of torch.distributed (the default of its
    `across_processes` argument), also when called through `EI2Pipeline.tune`, as `ei2 tune` and `ei2 edit` do."""
    token = _ACROSS_PROCESSES.set(enabled)
    try:
        yield
    finally:
        _ACROSS_PROCESSES.reset(token)


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
                    window: int | None = None, micro_batches: int = 1) -> dict:
    """What a checkpoint must match to be resumed: recipe contents, base model, data, trainable names, clip length,
    micro-batches per step (processes x gradient accumulation)."""
    return {
        "recipe": unet.recipe.digest(),
        "base_fingerprint": str(unet.base_fingerprint),
        "data": tensor_hash(latents.float(), text_emb.float()),
        "trainable": names_hash(names),
        "window": window,
        "micro_batches": micro_batches,
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
    across_processes: bool | None = None,
    control=None,
) -> TuningResult:
    """Tune `unet` (a VideoUNet) in place on `latents` `(b, c, f, h, w)` with text `(b, L, D)`.

    `noise_scheduler` gives the noise schedule and prediction type (any diffusers scheduler with
    `add_noise`, `get_velocity` and `config.num_train_timesteps`, e.g. the model's DDPMScheduler).
    With `resume`, continues from the latest checkpoint in `checkpoint_dir`.
    `callback(step, loss)` runs after every step (and after its checkpoint is written).
    With `across_processes` (default: False, True inside `with across_processes():`) under torch.distributed
    (`accelerate launch --multi_gpu --num_processes N`), every process calls it with the same arguments and they
    share the micro-batches of every step (module docstring); rank 0's `resume` and `checkpoint_dir` decide, and
    only rank 0 writes checkpoints and shows a progress bar.
    `control`: a structure condition (`ei2.structure.StructureControl`, maps of the video's frames) the UNet is
    tuned under, so that the adapter learns what the controlled edit will give it; a clip gets its frames' maps.
    """
    config = config or TuningConfig()
    checkpoint_dir = _check_arguments(latents, config, checkpoint_dir, resume)
    device = latents.device
    params = unet.set_trainable()
    names = [name for name, _ in unet.trainable_parameters()]
    optimizer, accelerator = _optimizer(params, config, device)  # joins the process group of a launch, if any
    shared = _ACROSS_PROCESSES.get() if across_processes is None else across_processes
    rank, world = processes() if shared else (0, 1)
    micro_batches = world * config.gradient_accumulation
    mine = range(rank * config.gradient_accumulation, (rank + 1) * config.gradient_accumulation)  # this process's
    clips = _Clips(latents, config.window, noise_scheduler.config.num_train_timesteps, config.seed)
    identity = tuning_identity(unet, latents, text_emb, names, clips.window, micro_batches)
    if control is not None:
        identity["control"] = control.key()
    result = TuningResult(processes=world, micro_batches=micro_batches)
    if world > 1:  # every process starts from rank 0's tensors (as DDP does)
        broadcast_parameters(params)
    start = 0
    checkpoint = _read_shared_checkpoint(checkpoint_dir, resume, rank, world, device)
    if checkpoint is not None:
        start, result.losses = _apply_checkpoint(checkpoint, unet, names, optimizer, accelerator, clips.generator,
                                                  identity, config)
        result.resumed_from = start
        if start > config.steps:
            raise TuningError(f"the checkpoint in {checkpoint['path']} is at step {start}, past --steps {config.steps}")

    was_training = unet.training
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    bar = tqdm(total=config.steps, initial=start, desc="tuning", disable=not progress or rank != 0,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, config.steps + 1):
            loss_sum = 0.0
            for k in range(micro_batches):  # every process draws all of them, in order; trains on its own
                first, noise, timesteps = clips.draw(result.clip_starts)
                if k in mine:
                    loss_sum += _micro_batch(unet, noise_scheduler, accelerator, clips.clip(first), noise, timesteps,
                                             text_emb, None if control is None else control.select_frames(
                                                 slice(first, first + clips.frames)))
            value = _average_gradients(params, loss_sum, micro_batches, world, device)
            _check_finite(value, step, config)  # the same value in every process: all of them stop
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(value)
            bar.update()
            bar.set_postfix(loss=f"{value:.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                if rank == 0:
                    _save_checkpoint(checkpoint_dir, step, unet, names, optimizer, accelerator, clips.generator,
                                     identity, result.losses, config)
                barrier(world)
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


def _check_arguments(latents: torch.Tensor, config: TuningConfig, checkpoint_dir, resume: bool) -> Path | None:
    if latents.ndim != 5:
        raise ValueError(f"latents must be (b, c, f, h, w), got {tuple(latents.shape)}")
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if config.checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")
    return checkpoint_dir


def _optimizer(params, config: TuningConfig, device: torch.device):
    """AdamW on the recipe's tensors, prepared by an accelerate `Accelerator` of the config's precision."""
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    accelerator = _accelerator(config.mixed_precision, device)
    return accelerator.prepare_optimizer(optimizer, device_placement=False), accelerator


class _Clips:
    """What each micro-batch trains on, drawn from one seeded CPU generator in a fixed order (so that a resumed or
    shared tuning draws the same): the clip's first frame (with a window shorter than the video), noise, timesteps."""

    def __init__(self, latents: torch.Tensor, window: int | None, num_train_timesteps: int, seed: int):
        self.latents, self.num_train_timesteps = latents, num_train_timesteps
        num_frames = latents.shape[2]
        self.window = window if window is not None and window < num_frames else None
        self.frames = self.window or num_frames
        self.shape = (*latents.shape[:2], self.frames, *latents.shape[3:])
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, starts: list[int]):
        """(first frame, noise, timesteps) of the next micro-batch; a windowed clip's first frame joins `starts`."""
        first = 0
        if self.window is not None:  # one clip of `window` consecutive frames: b c f h w -> b c window h w
            first = int(torch.randint(0, self.latents.shape[2] - self.window + 1, (1,), generator=self.generator))
            starts.append(first)
        noise = torch.randn(self.shape, generator=self.generator)
        timesteps = torch.randint(0, self.num_train_timesteps, (self.shape[0],), generator=self.generator)
        return first, noise, timesteps

    def clip(self, first: int) -> torch.Tensor:
        return self.latents[:, :, first : first + self.frames]


def _micro_batch(unet, noise_scheduler, accelerator, clip, noise, timesteps, text_emb, control) -> float:
    """One micro-batch: the denoising loss of `clip` under `noise` at `timesteps`, its gradient added into .grad."""
    noise, timesteps = noise.to(clip.device, clip.dtype), timesteps.to(clip.device)
    noisy = noise_scheduler.add_noise(clip, noise, timesteps)
    with accelerator.autocast():
        prediction = unet(noisy, timesteps, text_emb, control=control).sample
    loss = F.mse_loss(prediction.float(), _target(noise_scheduler, clip, noise, timesteps).float())
    accelerator.backward(loss)  # summed into .grad over this process's micro-batches
    return loss.item()


def _check_finite(value: float, step: int, config: TuningConfig) -> None:
    if not math.isfinite(value):
        raise TuningError(
            f"tuning loss became {value} at step {step} (lr {config.learning_rate:g}, "
            f"precision {config.mixed_precision}); lower --lr"
            + (" or use --dtype bf16/fp32" if config.mixed_precision == "fp16" else "")
        )


def _average_gradients(params, loss_sum: float, micro_batches: int, world: int, device) -> float:
    """Turn the gradients summed over this process's micro-batches into the mean over all `micro_batches` of the
    step, and return the mean loss: the sums (gradients and losses) are added over the processes with one
    `all_reduce` each, then divided once by `micro_batches` (as a naive loop averaging the micro-batch gradients
    does; one micro-batch is left untouched).

    The losses and a has-a-gradient flag per tensor travel in float64, the gradients flattened into one float32
    tensor (a tensor without a gradient adds zeros); a tensor that no process gave a gradient keeps none, as
    AdamW then skips it."""
    if world > 1:
        loss_sum = _sum_gradients_over_processes(params, loss_sum, device)
    if micro_batches > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(micro_batches)
    return loss_sum / micro_batches


def _sum_gradients_over_processes(params, loss_sum: float, device) -> float:
    grads = [p.grad for p in params]
    stats = torch.tensor([loss_sum, *(float(g is not None) for g in grads)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(stats)
    flat = torch.cat([(torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()).reshape(-1)
                      for p, g in zip(params, grads)])
    torch.distributed.all_reduce(flat)
    for p, piece, present in zip(params, flat.split([p.numel() for p in params]), stats[1:].tolist()):
        if not present:
            p.grad = None
        elif p.grad is None:
            p.grad = piece.view_as(p).to(p.dtype)
        else:
            p.grad.copy_(piece.view_as(p))
    return float(stats[0])


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
    with staged_folder(final) as tmp:  # a checkpoint appears whole, or not at all
        own = dict(unet.trainable_parameters())
        save_tensors({n: own[n].detach().cpu().contiguous() for n in names}, str(tmp / "trainable.safetensors"))

        state = optimizer.state_dict()  # accelerate's wrapper returns the torch optimizer's
        tensors, scalars = {}, {}
        for index, entries in state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        if tensors:
            save_tensors(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"noise_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda_{i}"] = s
        for name, module in _spectral_modules(unet).items():
            vectors = module.power_vectors()
            if vectors is not None:
                rng[f"spectral.{name}.u"] = vectors[0].detach().cpu().contiguous()
                rng[f"spectral.{name}.v"] = vectors[1].detach().cpu().contiguous()
        save_tensors(rng, str(tmp / "state.safetensors"))
        meta = {
            "format": "ei2-tuning-checkpoint",
            "step": step,
            "files": {p.name: file_digest(p) for p in sorted(tmp.glob("*.safetensors"))},  # checked on resume
            "identity": identity,
            "losses": losses,
            "config": dataclasses.asdict(config),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
            "optimizer_scalars": scalars,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        write_json(tmp / "checkpoint.json", meta)
    for old in checkpoint_dir.iterdir():  # keep only the latest
        if old != final and old.name.startswith(CHECKPOINT_PREFIX) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(checkpoint_dir: Path) -> dict:
    """The files of the latest checkpoint in `checkpoint_dir`, as a dict (a `TuningError` when none or damaged)."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        raise TuningError(f"--resume: no tuning checkpoint in {checkpoint_dir}; start over with --overwrite")
    try:
        meta = json.loads((path / "checkpoint.json").read_text())
        damaged = check_digests(path, meta.get("files", {}))
        if damaged:
            raise ValueError(f"{', '.join(damaged)} do(es) not match the digest written with it")
        return {
            "path": str(path),
            "meta": meta,
            "trainable": load_file(str(path / "trainable.safetensors")),
            "state": load_file(str(path / "state.safetensors")),
            "optimizer": load_file(str(path / "optimizer.safetensors"))
            if (path / "optimizer.safetensors").exists() else {},
        }
    except Exception as e:
        raise TuningError(f"--resume: checkpoint {path} is damaged ({e}); the run folder is kept as it was: "
                          f"start over with --overwrite (only the latest checkpoint is kept)") from e


def _read_shared_checkpoint(checkpoint_dir: Path | None, resume: bool, rank: int, world: int, device) -> dict | None:
    """Rank 0 reads the checkpoint to resume from (with `resume`; else None) and sends it, or its error, to the
    other processes, which then resume from it whatever their own `resume` and `checkpoint_dir`."""
    checkpoint = None
    if rank == 0 and resume:
        try:
            checkpoint = _read_checkpoint(checkpoint_dir)
        except TuningError as e:
            if world == 1:
                raise
            checkpoint = {"error": str(e)}
    if world > 1:
        box = [checkpoint]
        torch.distributed.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        checkpoint = box[0]
    if checkpoint is not None and "error" in checkpoint:
        raise TuningError(checkpoint["error"])
    return checkpoint


def _apply_checkpoint(checkpoint: dict, unet, names, optimizer, accelerator, generator, identity, config):
    path, meta, trainable, state = checkpoint["path"], checkpoint["meta"], checkpoint["trainable"], checkpoint["state"]
    opt_tensors = checkpoint["optimizer"]
    for key, label in (("recipe", "recipe"), ("base_fingerprint", "base model"), ("data", "video and prompt"),
                       ("trainable", "trainable tensors"), ("window", "--window"), ("control", "structure condition")):
        if meta["identity"].get(key) != identity.get(key):
            raise TuningError(
                f"--resume: checkpoint {path} was made with another {label}; "
                f"use the settings of the interrupted run (or start over with --overwrite)"
            )
    saved_config, own_config = meta.get("config", {}), dataclasses.asdict(config)
    for key, label in (("learning_rate", "learning rate (--lr)"), ("seed", "seed (--seed)"),
                       ("mixed_precision", "precision (--dtype)")):
        if key in saved_config and saved_config[key] != own_config[key]:
            raise TuningError(
                f"--resume: checkpoint {path} was made with {label} {saved_config[key]}, this run asks for "
                f"{own_config[key]}; resume with the interrupted run's {label.split(' (')[0]} (or start over with "
                f"--overwrite)"
            )
    made_with = meta["identity"].get("micro_batches", 1)  # checkpoints from before micro-batches: one per step
    if made_with != identity["micro_batches"]:
        raise TuningError(
            f"--resume: checkpoint {path} was made with {made_with} micro-batch(es) per step (processes x gradient "
            f"accumulation), this run has {identity['micro_batches']}; resume on as many processes as the "
            f"interrupted run (or drop --resume)"
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
            module.warm_start(state[f"spectral.{name}.u"].to(device), state[f"spectral.{name}.v"].to(device))
    return int(meta["step"]), list(meta["losses"])

"""Pretraining of the embedded Shapes model (DESIGN §3): a small CLIP, the VAE, then the UNet.

    python -m ei2.shapes.train clip   [--device cuda|cpu] [--steps N] [--resume]
    python -m ei2.shapes.train vae    ...
    python -m ei2.shapes.train unet   ...       # needs the CLIP (text tower, frozen) and the VAE
    python -m ei2.shapes.train controlnet --condition canny   # a ControlNet for the shipped UNet (frozen)
    python -m ei2.shapes.train export           # assemble assets/shapes-sd from the trained parts
    python -m ei2.shapes.train all    ...       # clip, vae, unet, export

Every stage is seeded (the batch of step k depends only on the seed and k), logs its loss to
`work_shapes/<stage>/log.jsonl` with a progress bar, checkpoints to
`work_shapes/<stage>/checkpoint.safetensors` every few minutes and at the end, and continues from
there with `--resume`. A stage's result is `work_shapes/<stage>/final.safetensors` (weights, the
UNet's EMA) plus `final.json` (its config); `export` turns them into the diffusers/transformers
folders `assets/shapes-clip/` and `assets/shapes-sd/`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import models
from .tokenizer import check_tokenizer, load_tokenizer, write_tokenizer
from .world import BACKGROUNDS, COLORS, MOTIONS, SHAPES, all_captions, random_scenes, render

REPO = Path(__file__).resolve().parents[3]
WORK = Path("work_shapes")
ASSETS = REPO / "assets"
NUM_CLASSES = len(COLORS) * len(SHAPES) * len(BACKGROUNDS)
MOTION_OPTIONS = (None, *MOTIONS)  # a caption has no motion phrase, or one of the videos' phrases
TRAIN_SEED_BASE = 1_000_000  # training pools draw seeds from here on; evaluation uses small seeds


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 200
    pool: int = 50_000  # rendered training images, drawn from with replacement
    # UNet only (model v2, issue 19): what the UNet predicts, SD's schedule rescaled to zero terminal SNR,
    # offset noise (a per-channel constant added to the noise, std offset_noise)
    prediction_type: str = "epsilon"
    zero_snr: bool = False
    offset_noise: float = 0.0
    # ControlNet only (issue 26): the structure map it reads (ei2.structure.maps) and the share of empty prompts
    condition: str = ""
    empty_prompts: float = 0.3
    # "zero": diffusers' init (the condition embedding's last conv and the zero convs all zero: the condition's
    # gradient is zero until the zero convs grow); "random": that last conv gets PyTorch's default init, so the
    # condition reaches the zero convs from step 0 (the output is still the frozen UNet's at step 0)
    cond_embedding_init: str = "zero"
    # where the condition matters: timesteps drawn from [t_min, 1000), and the epsilon loss weighted towards x0's
    # ((1 - a) / a, the factor between eps and x0 errors, clipped to x0_weight_max; 0: the plain epsilon loss), so that
    # the object's position, which only the noisier steps do not see, carries the gradient
    t_min: int = 0
    x0_weight_max: float = 0.0


# Sized for a 2-core CPU (a few hours in all) and for one GPU (minutes).
DEFAULTS = {
    "cpu": {
        "clip": StageConfig(steps=3000, batch_size=128, lr=5e-4),
        "vae": StageConfig(steps=4000, batch_size=32, lr=1e-3),
        "unet": StageConfig(steps=15000, batch_size=64, lr=5e-4),
        "controlnet": StageConfig(steps=4000, batch_size=64, lr=3e-4, warmup=100, pool=20_000),
    },
    "cuda": {
        "clip": StageConfig(steps=3000, batch_size=1024, lr=1e-3, pool=400_000),
        "vae": StageConfig(steps=5000, batch_size=256, lr=1e-3, pool=400_000),
        "unet": StageConfig(steps=20000, batch_size=512, lr=1e-3, pool=400_000),
        "controlnet": StageConfig(steps=4000, batch_size=256, lr=3e-4, warmup=100, pool=100_000),
    },
}
CAPTION_DROPOUT = 0.1  # share of empty prompts, for classifier-free guidance
MOTION_SHARE = 0.5  # share of captions with a motion phrase ("a red circle moving right on ...")
EMA_DECAY = 0.999
KL_WEIGHT = 1e-4


# ---------------------------------------------------------------------------------------------
# data

def _render_chunk(args):
    n, seed = args
    scenes = random_scenes(n, seed=seed)
    return render(scenes), scenes.class_index()


def make_pool(n: int, seed: int, workers: int = 1, chunk: int = 10_000):
    """n training renders: (images (n, 64, 64, 3) uint8 tensor, class index (n,) long tensor)."""
    jobs = [(min(chunk, n - i), TRAIN_SEED_BASE + seed * 10_000 + k) for k, i in enumerate(range(0, n, chunk))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return images, labels


def caption_table(tokenizer) -> tuple[torch.Tensor, list[str]]:
    """Token ids of every class x motion option caption, then the empty prompt last: (72 * 9 + 1, L)."""
    captions = [c for m in MOTION_OPTIONS for c in all_captions(m)]  # index: option * 72 + class
    captions.append("")
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids, captions


def step_generator(seed: int, step: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float in [-1, 1] (also CLIP's normalisation here)."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------
# checkpoints (safetensors only)

def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckpt-tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optimizer.{idx}.{name}"] = torch.as_tensor(value)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# the training loop shared by the stages

class Stage:
    """One training stage: subclasses build the model and define `loss(step, generator)`."""

    name = ""

    def __init__(self, cfg: StageConfig, device: torch.device, seed: int, workers: int):
        self.cfg, self.device, self.seed, self.workers = cfg, device, seed, workers
        self.dir = WORK / self.name
        self.amp = device.type == "cuda"

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def final_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def final_config(self) -> dict:
        raise NotImplementedError

    def lr_at(self, step: int, elapsed: float = 0.0, max_minutes: float | None = None) -> float:
        """Linear warm-up, then cosine decay to 10% by the last step, or by --max-minutes if that comes first."""
        warm = min(1.0, (step + 1) / self.cfg.warmup)
        progress = step / max(1, self.cfg.steps)
        if max_minutes:
            progress = max(progress, elapsed / (60 * max_minutes))
        progress = min(1.0, progress)
        return self.cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, resume: bool, max_minutes: float | None, ckpt_minutes: float = 5.0, init: str | None = None,
            stop_minutes: float | None = None) -> None:
        """max_minutes: the schedule's length in time (lr decays by then, and the stage ends); stop_minutes:
        end this process after that long (checkpoint written) without touching the schedule, to --resume later."""
        from tqdm.auto import tqdm

        torch.manual_seed(self.seed)
        self.model = self.build().to(self.device)
        if init is not None and not resume:  # start from given weights (e.g. an earlier run's final), at step 0
            self.model.load_state_dict(load_file(init))
            print(f"[{self.name}] initialised from {init}", flush=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0 if self.name != "clip" else 0.05)
        self.ema = [p.detach().clone() for p in params] if self.name == "unet" else None
        start = 0
        ckpt = self.dir / "checkpoint.safetensors"
        if resume and ckpt.exists():
            tensors, meta = load_checkpoint(ckpt)
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            load_optimizer_tensors(self.opt, tensors)
            if self.ema is not None:
                for i, e in enumerate(self.ema):
                    e.copy_(tensors[f"ema.{i}"])
            start = meta["step"]
            stored = {k: meta["config"].get(k, getattr(StageConfig, k)) for k in ("prediction_type", "zero_snr")}
            if stored != {k: getattr(self.cfg, k) for k in stored}:
                raise SystemExit(f"[{self.name}] {ckpt} was trained with {stored}; resume it with the same options "
                                 f"or start another --work folder")
            print(f"[{self.name}] resumed from {ckpt} at step {start}", flush=True)
        elif resume:
            print(f"[{self.name}] no checkpoint at {ckpt}; starting from step 0", flush=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "log.jsonl", "a")
        t0 = last_ckpt = time.time()
        bar = tqdm(range(start, self.cfg.steps), desc=self.name, initial=start, total=self.cfg.steps,
                   mininterval=5.0, file=sys.stdout)
        running = None
        done = start
        for step in bar:
            lr = self.lr_at(step, time.time() - t0, max_minutes)
            for g in self.opt.param_groups:
                g["lr"] = lr
            gen = step_generator(self.seed, step, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.loss(step, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{self.name}] loss is {loss.item()} at step {step}; lower --lr or resume from the checkpoint")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            done = step + 1
            if self.ema is not None:
                decay = min(EMA_DECAY, (1 + step) / (10 + step))
                torch._foreach_lerp_(self.ema, [p.detach() for p in params], 1 - decay)
            value = loss.item() if (step % 50 == 0 or step == self.cfg.steps - 1) else None
            if value is not None:
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
                log.write(json.dumps({"step": step, "loss": value, "lr": lr, "seconds": round(time.time() - t0, 1)}) + "\n")
                log.flush()
            if time.time() - last_ckpt > 60 * ckpt_minutes:
                self.save(done)
                self.save_final(done)  # the stage's current result (EMA), to evaluate while it runs
                last_ckpt = time.time()
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                print(f"[{self.name}] --max-minutes {max_minutes} reached at step {done}", flush=True)
                break
            if stop_minutes is not None and time.time() - t0 > 60 * stop_minutes:
                print(f"[{self.name}] --stop-minutes {stop_minutes} reached at step {done}; continue with --resume", flush=True)
                break
        bar.close()
        log.close()
        self.save(done)  # the checkpoint to --resume from
        self.save_final(done)

    def save(self, step: int) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(optimizer_tensors(self.opt))
        if self.ema is not None:
            tensors.update({f"ema.{i}": e for i, e in enumerate(self.ema)})
        save_checkpoint(self.dir / "checkpoint.safetensors", tensors, {"step": step, "seed": self.seed, "config": self.cfg.__dict__})

    def save_final(self, step: int) -> None:
        tensors = self.final_tensors()
        save_checkpoint(self.dir / "final.safetensors", tensors, {"step": step})
        (self.dir / "final.json").write_text(json.dumps({"step": step, **self.final_config()}, indent=2) + "\n")
        print(f"[{self.name}] wrote {self.dir / 'final.safetensors'} after {step} steps", flush=True)


class ClipStage(Stage):
    """Contrastive pretraining of a small CLIP: each image against the 72 captions of the world
    (each with a random motion phrase or none), and each caption against the batch's images of its
    class (soft targets, since a batch holds many images per caption)."""

    name = "clip"

    def build(self):
        from transformers import CLIPModel

        tok_dir = self.dir / "tokenizer"
        write_tokenizer(tok_dir)
        self.tokenizer = load_tokenizer(tok_dir)
        check_tokenizer(self.tokenizer)
        self.config = models.clip_config(len(self.tokenizer.get_vocab()), self.tokenizer.bos_token_id,
                                         self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                         self.tokenizer.model_max_length)
        ids, _ = caption_table(self.tokenizer)
        self.ids = ids[:-1].view(len(MOTION_OPTIONS), NUM_CLASSES, -1).to(self.device)
        self.images, self.labels = make_pool(self.cfg.pool, self.seed, self.workers)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        return CLIPModel(self.config)

    def loss(self, step, gen):
        m = self.model
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), device=self.device, generator=gen)
        x = to_pixels(self.images[idx])
        x = x + torch.randn(x.shape, device=self.device, generator=gen) * torch.rand(len(x), 1, 1, 1, device=self.device, generator=gen) * 0.06
        y = self.labels[idx]
        option = torch.randint(len(MOTION_OPTIONS), (NUM_CLASSES,), device=self.device, generator=gen)
        option = torch.where(torch.rand(NUM_CLASSES, device=self.device, generator=gen) < MOTION_SHARE, option.clamp(min=1), 0)
        ids = self.ids[option, torch.arange(NUM_CLASSES, device=self.device)]
        img = F.normalize(m.visual_projection(m.vision_model(pixel_values=x).pooler_output).float(), dim=-1)
        txt = F.normalize(m.text_projection(m.text_model(input_ids=ids).pooler_output).float(), dim=-1)
        logits = m.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, 72)
        loss_i = F.cross_entropy(logits, y)
        target = F.one_hot(y, NUM_CLASSES).T.float()  # (72, B)
        present = target.sum(1) > 0
        target = target[present] / target[present].sum(1, keepdim=True)
        loss_t = -(target * F.log_softmax(logits.T[present], dim=1)).sum(1).mean()
        return (loss_i + loss_t) / 2

    def final_config(self):
        return {"clip_config": self.config.to_dict()}

    def save_final(self, step):
        super().save_final(step)
        shutil.copytree(self.dir / "tokenizer", self.dir / "final_tokenizer", dirs_exist_ok=True)


class VaeStage(Stage):
    """AutoencoderKL on renders: MSE + L1 + 1e-4 KL (per latent element)."""

    name = "vae"

    def build(self):
        self.images, _ = make_pool(self.cfg.pool, self.seed + 1, self.workers)
        self.images = self.images.to(self.device)
        return models.make_vae()

    def loss(self, step, gen):
        x = to_pixels(self.images[torch.randint(len(self.images), (self.cfg.batch_size,), device=self.device, generator=gen)])
        post = self.model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, device=self.device, generator=gen)
        rec = self.model.decode(z).sample.float()
        kl = post.kl().float().mean() / post.mean[0].numel()
        return F.mse_loss(rec, x) + F.l1_loss(rec, x) + KL_WEIGHT * kl

    def final_config(self):
        # scaling_factor = 1 / std of latents sampled from the posterior over fresh renders
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            x = to_pixels(self.images[:4096 if self.device.type == "cuda" else 512])
            zs = [self.model.encode(b).latent_dist.sample().float() for b in x.split(256)]
        std = torch.cat(zs).std().item()
        self.model.register_to_config(scaling_factor=1.0 / std)
        self.model.train()
        return {"vae_config": dict(self.model.config), "latent_std": std}  # load_vae keeps scaling_factor


def _find_part(stage: str) -> Path:
    path = WORK / stage / "final.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m ei2.shapes.train {stage}` first")
    return path


def load_clip(device="cpu"):
    """The trained CLIPModel and tokenizer from work_shapes/clip (or the shipped assets/shapes-clip)."""
    from transformers import CLIPModel

    if (WORK / "clip" / "final.safetensors").exists():
        meta = json.loads((WORK / "clip" / "final.json").read_text())
        from transformers import CLIPConfig

        model = CLIPModel(CLIPConfig.from_dict(meta["clip_config"]))
        model.load_state_dict(load_file(str(WORK / "clip" / "final.safetensors")))
        tokenizer = load_tokenizer(WORK / "clip" / "final_tokenizer")
    else:
        model = CLIPModel.from_pretrained(str(ASSETS / "shapes-clip"))
        tokenizer = load_tokenizer(ASSETS / "shapes-clip")
    return model.to(device).eval(), tokenizer


def load_vae(device="cpu"):
    from diffusers import AutoencoderKL

    if (WORK / "vae" / "final.safetensors").exists():
        meta = json.loads((WORK / "vae" / "final.json").read_text())
        # drop "_use_default_values": it lists scaling_factor, and from_config would then discard the stored 1/std
        config = {k: v for k, v in meta["vae_config"].items() if k != "_use_default_values"}
        vae = AutoencoderKL.from_config(config)
        vae.load_state_dict(load_file(str(WORK / "vae" / "final.safetensors")))
    else:
        vae = AutoencoderKL.from_pretrained(str(ASSETS / "shapes-sd"), subfolder="vae")
    return vae.to(device).eval()


class LatentStage(Stage):
    """A stage that denoises VAE latents of a render pool under the frozen text tower's caption embeddings: the
    pool's posteriors (`encode_pool`) and one seeded noisy batch of them (`noisy_batch`). Subclasses set
    `self.scale`, `self.text`, `self.empty` and `self.alphas` in `build`."""

    def encode_pool(self, vae, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The VAE posterior (mean, std) of every render, and its class index."""
        means, stds = [], []
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            for b in images.split(2048):
                d = vae.encode(to_pixels(b.to(self.device))).latent_dist
                means.append(d.mean.float())
                stds.append(d.std.float())
        self.lat_mean, self.lat_std = torch.cat(means), torch.cat(stds)
        self.labels = labels.to(self.device)

    def noisy_batch(self, gen: torch.Generator, empty_share: float, t_min: int = 0, offset_noise: float = 0.0):
        """(pool indices, z0, caption indices, t, noise, alpha_bar (b, 1, 1, 1), z_t) of one batch: z0 drawn from the
        posteriors, captions with a motion phrase for MOTION_SHARE of them and empty for `empty_share`, t from
        [t_min, T), offset noise of std `offset_noise` (0: none). The draws are in this order, from `gen` alone."""
        dev, b = self.device, self.cfg.batch_size
        idx = torch.randint(len(self.lat_mean), (b,), device=dev, generator=gen)
        z0 = (self.lat_mean[idx] + self.lat_std[idx] * torch.randn(self.lat_mean[idx].shape, device=dev, generator=gen)) * self.scale
        option = torch.randint(1, len(MOTION_OPTIONS), (b,), device=dev, generator=gen)
        option = torch.where(torch.rand(b, device=dev, generator=gen) < MOTION_SHARE, option, 0)
        cap = option * NUM_CLASSES + self.labels[idx]
        cap = torch.where(torch.rand(b, device=dev, generator=gen) < empty_share, self.empty, cap)
        t = torch.randint(t_min, len(self.alphas), (b,), device=dev, generator=gen)
        noise = torch.randn(z0.shape, device=dev, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(b, z0.shape[1], 1, 1, device=dev, generator=gen)
        a = self.alphas[t].view(b, 1, 1, 1)
        return idx, z0, cap, t, noise, a, a.sqrt() * z0 + (1 - a).sqrt() * noise


class UnetStage(LatentStage):
    """UNet2DConditionModel on VAE latents of renders, conditioned on the frozen CLIP text tower's
    last hidden states; epsilon (or v) loss on SD 1.x's DDPM schedule (or its zero-terminal-SNR
    rescaling), 10% empty captions, EMA 0.999."""

    name = "unet"

    def build(self):
        clip, tokenizer = load_clip(self.device)
        vae = load_vae(self.device)
        self.scale = vae.config.scaling_factor
        ids, _ = caption_table(tokenizer)
        with torch.no_grad():
            self.text = torch.cat([clip.text_model(input_ids=b.to(self.device)).last_hidden_state for b in ids.split(256)])
        self.empty = len(self.text) - 1
        images, labels = make_pool(self.cfg.pool, self.seed + 2, self.workers)
        self.encode_pool(vae, images, labels)
        del clip, vae
        self.sched = models.make_train_scheduler(self.cfg.prediction_type, self.cfg.zero_snr)
        self.alphas = self.sched.alphas_cumprod.to(self.device)
        return models.make_unet()

    def loss(self, step, gen):
        _, z0, cap, t, noise, a, zt = self.noisy_batch(gen, CAPTION_DROPOUT, offset_noise=self.cfg.offset_noise)
        pred = self.model(zt, t, encoder_hidden_states=self.text[cap]).sample
        target = noise if self.cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0  # v
        return F.mse_loss(pred.float(), target)

    def final_tensors(self):
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        sd = dict(self.model.state_dict())
        sd.update({n: e for n, e in zip(names, self.ema)})  # EMA weights
        return sd

    def final_config(self):
        return {"unet_config": dict(self.model.config), "prediction_type": self.cfg.prediction_type,
                "zero_snr": self.cfg.zero_snr, "offset_noise": self.cfg.offset_noise}


CONTROLNET_EMBEDDING = (16, 32, 64)  # the condition's embedding: two stride-2 convs, the Shapes VAE's factor 4


class ControlNetStage(LatentStage):
    """A diffusers ControlNetModel made from the shipped Shapes UNet (`ControlNetModel.from_unet`, zero convs at
    zero), trained with that UNet frozen: epsilon loss of UNet + ControlNet residuals on VAE latents of renders,
    conditioned on the renders' structure maps (`ei2.structure.maps`), 30% empty prompts."""

    name = "controlnet"

    def __init__(self, cfg, device, seed, workers):
        super().__init__(cfg, device, seed, workers)
        self.dir = WORK / f"controlnet-{cfg.condition}"

    def build(self):
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
        from transformers import CLIPTextModel

        from ..structure import maps

        sd = ASSETS / "shapes-sd"
        tokenizer = load_tokenizer(sd / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(str(sd), subfolder="text_encoder").to(self.device).eval()
        vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae").to(self.device).eval()
        self.unet = UNet2DConditionModel.from_pretrained(str(sd), subfolder="unet").to(self.device).eval()
        self.unet.requires_grad_(False)
        self.scale = vae.config.scaling_factor
        ids, _ = caption_table(tokenizer)
        with torch.no_grad():
            self.text = torch.cat([text_encoder(input_ids=b.to(self.device)).last_hidden_state for b in ids.split(256)])
        self.empty = len(self.text) - 1
        images, labels = make_pool(self.cfg.pool, self.seed + 3, self.workers)
        self.cond = torch.from_numpy(maps.compute(self.cfg.condition, images.numpy())[..., 0].copy())  # (n, h, w) uint8
        self.cond = self.cond.to(self.device)
        self.encode_pool(vae, images, labels)
        del text_encoder, vae
        self.alphas = models.make_train_scheduler().alphas_cumprod.to(self.device)
        net = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING)
        if self.cfg.cond_embedding_init == "random":
            net.controlnet_cond_embedding.conv_out.reset_parameters()  # from the seeded global RNG (Stage.run)
        return net

    def loss(self, step, gen):
        idx, _, cap, t, noise, a, zt = self.noisy_batch(gen, self.cfg.empty_prompts, t_min=self.cfg.t_min)
        text = self.text[cap]
        cond = self.cond[idx].float().div(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
        down, mid = self.model(zt, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = self.unet(zt, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        if not self.cfg.x0_weight_max:
            return F.mse_loss(pred.float(), noise)
        weight = ((1 - a) / a).clamp(max=self.cfg.x0_weight_max)
        return (weight * (pred.float() - noise) ** 2).mean()

    def final_config(self):
        return {"controlnet_config": dict(self.model.config), "condition": self.cfg.condition,
                "empty_prompts": self.cfg.empty_prompts, "cond_embedding_init": self.cfg.cond_embedding_init,
                "t_min": self.cfg.t_min, "x0_weight_max": self.cfg.x0_weight_max}


STAGES = {"clip": ClipStage, "vae": VaeStage, "unet": UnetStage, "controlnet": ControlNetStage}
ALL_STAGES = ("clip", "vae", "unet")  # `all`: the model itself; ControlNets are trained on the shipped model after


def export_controlnet(condition: str, assets: Path = ASSETS) -> Path:
    """Write assets/shapes-sd/controlnet-<condition>/ (a diffusers ControlNetModel folder, safetensors) from
    work_shapes/controlnet-<condition>/final.*."""
    from diffusers import ControlNetModel

    part = WORK / f"controlnet-{condition}"
    if not (part / "final.safetensors").exists():
        raise FileNotFoundError(f"{part / 'final.safetensors'} is missing; run "
                                f"`python -m ei2.shapes.train controlnet --condition {condition}` first")
    meta = json.loads((part / "final.json").read_text())
    net = ControlNetModel.from_config(meta["controlnet_config"])
    net.load_state_dict(load_file(str(part / "final.safetensors")))
    target = assets / "shapes-sd" / f"controlnet-{condition}"
    _atomic_dir(target, lambda d: net.eval().save_pretrained(str(d), safe_serialization=True))
    print(f"wrote {target} (step {meta['step']})")
    return target


# ---------------------------------------------------------------------------------------------
# export to the shipped folders

def _atomic_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export(assets: Path = ASSETS) -> None:
    """Write assets/shapes-clip (CLIPModel + tokenizer + image processor) and assets/shapes-sd
    (a StableDiffusionPipeline folder) from work_shapes/{clip,vae,unet}/final.*."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    clip, tokenizer = load_clip()
    check_tokenizer(tokenizer)
    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": models.RESOLUTION}, do_center_crop=True,
        crop_size={"height": models.RESOLUTION, "width": models.RESOLUTION}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=models.IMAGE_MEAN, image_std=models.IMAGE_STD,
        do_convert_rgb=True,
    )

    def write_clip(d: Path):
        clip.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))
        write_tokenizer(d)  # vocab.json + merges.txt beside tokenizer.json, as SD folders have them
        check_tokenizer(load_tokenizer(d))
        processor.save_pretrained(str(d))

    _atomic_dir(assets / "shapes-clip", write_clip)
    print(f"wrote {assets / 'shapes-clip'}")
    if not (WORK / "unet" / "final.safetensors").exists():
        print("no work_shapes/unet/final.safetensors yet; assets/shapes-sd left as it is")
        return
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    vae = load_vae()
    meta = json.loads((WORK / "unet" / "final.json").read_text())
    unet = UNet2DConditionModel.from_config(meta["unet_config"])
    unet.load_state_dict(load_file(str(_find_part("unet"))))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=models.make_sample_scheduler(meta.get("prediction_type", "epsilon"), meta.get("zero_snr", False)),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    def write_sd(d: Path):
        pipe.save_pretrained(str(d), safe_serialization=True)
        write_tokenizer(d / "tokenizer")
        check_tokenizer(load_tokenizer(d / "tokenizer"))

    _atomic_dir(assets / "shapes-sd", write_sd)
    print(f"wrote {assets / 'shapes-sd'}")


def main(argv: list[str] | None = None) -> int:
    global WORK
    parser = argparse.ArgumentParser(prog="python -m ei2.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "export", "export-controlnet", "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, help="training steps of the stage (default: sized for the device)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--pool", type=int, help="number of rendered training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from work_shapes/<stage>/checkpoint.safetensors")
    parser.add_argument("--max-minutes", type=float, help="stop a stage after this long (checkpoint + final written)")
    parser.add_argument("--init", help="safetensors weights to start the stage from (fresh optimiser, step 0)")
    parser.add_argument("--stop-minutes", type=float,
                        help="end this process after this long (checkpoint written, schedule unchanged); continue with --resume")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="unet: what the UNet predicts (default epsilon)")
    parser.add_argument("--zero-snr", action="store_true", help="unet: SD's schedule rescaled to zero terminal SNR (needs v_prediction)")
    parser.add_argument("--offset-noise", type=float, help="unet: std of a per-channel constant added to the noise (e.g. 0.05)")
    parser.add_argument("--condition", default="canny", help="controlnet: the structure map it learns (canny, softedge, layout)")
    parser.add_argument("--cond-embedding-init", choices=["zero", "random"], default="zero",
                        help="controlnet: init of the condition embedding's last conv (zero: diffusers')")
    parser.add_argument("--t-min", type=int, default=0, help="controlnet: draw timesteps from [T_MIN, 1000)")
    parser.add_argument("--x0-weight-max", type=float, default=0.0,
                        help="controlnet: weight the eps loss by (1 - a) / a clipped to this (0: plain eps loss)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the training images")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--work", default=str(WORK), help="folder of checkpoints and logs (default work_shapes)")
    parser.add_argument("--assets", default=str(ASSETS), help="where export writes shapes-clip/ and shapes-sd/")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; pass --device cpu")
    WORK = Path(args.work)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    stages = list(ALL_STAGES) if args.stage == "all" else [args.stage] if args.stage in STAGES else []
    for name in stages:
        cfg = DEFAULTS[args.device][name]
        overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "pool") if getattr(args, k) is not None}
        if name == "unet":
            overrides.update({k: getattr(args, k) for k in ("prediction_type", "offset_noise") if getattr(args, k) is not None})
            overrides["zero_snr"] = args.zero_snr
            try:
                models.schedule(overrides.get("prediction_type", "epsilon"), args.zero_snr)
            except ValueError as e:  # epsilon + zero SNR
                parser.error(str(e))
        if name == "controlnet":
            from ..structure.maps import KINDS

            if args.condition not in KINDS or args.condition == "depth":
                parser.error(f"--condition must be canny, softedge or layout (maps computed without weights), not {args.condition!r}")
            overrides["condition"] = args.condition
            overrides["cond_embedding_init"] = args.cond_embedding_init
            overrides["t_min"] = args.t_min
            overrides["x0_weight_max"] = args.x0_weight_max
        cfg = replace(cfg, **overrides)
        print(f"[{name}] {cfg} on {args.device}", flush=True)
        STAGES[name](cfg, torch.device(args.device), args.seed, args.workers).run(
            args.resume, args.max_minutes, init=args.init, stop_minutes=args.stop_minutes)
    if args.stage in ("export", "all"):
        export(Path(args.assets))
    if args.stage == "export-controlnet":
        export_controlnet(args.condition, Path(args.assets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

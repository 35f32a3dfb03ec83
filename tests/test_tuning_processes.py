"""Tuning shared across processes (issue 18, item 2) and gradient accumulation (`ei2.tuning`).

N processes of `accelerate launch --multi_gpu --num_processes N` (gloo on the CPU) each train on their own
micro-batches of every step, the gradients are summed with one all_reduce, and the tensors are those of one process
with `gradient_accumulation` N; one process with `gradient_accumulation` N is the naive loop that averages the N
micro-batch gradients and applies them once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from ei2.errors import TuningError
from ei2.tuning import TuningConfig, _target, latest_checkpoint, tune

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
       "HF_HUB_OFFLINE": "1"}

# The worker: the same shared tuning on every process (12 frames, clips of 5, 3 steps, a checkpoint at step 2),
# then a resume from that checkpoint, then a tuning that is not shared (each process alone, as in `ei2 bench`);
# each rank writes what it holds. Rank 1 passes its own, empty checkpoint folder and no resume flag: rank 0 decides
# and sends the checkpoint.
WORKER = '''
import dataclasses, json, os, sys
from pathlib import Path
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from ei2.models import VideoUNet
from ei2.tuning import TuningConfig, tune

model, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)

def fresh():
    torch.manual_seed(0)
    return VideoUNet.from_2d(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), recipe="ei2")

latents = torch.randn(1, 4, 12, 8, 8, generator=torch.Generator().manual_seed(1))
text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
config = TuningConfig(steps=3, learning_rate=1e-3, window=5, checkpoint_every=2, seed=3)
rank = int(os.environ["RANK"])
unet = fresh()
whole = tune(unet, scheduler, latents, text, config, checkpoint_dir=out / f"ckpt-{rank}", progress=False,
             across_processes=True)
tensors = {"whole." + n: p.detach().clone() for n, p in unet.trainable_parameters()}
unet = fresh()
resumed = tune(unet, scheduler, latents, text, config, checkpoint_dir=out / f"ckpt-{rank}", resume=rank == 0,
               progress=False, across_processes=True)
tensors.update({"resumed." + n: p.detach().clone() for n, p in unet.trainable_parameters()})
unet = fresh()
alone = tune(unet, scheduler, latents, text, dataclasses.replace(config, checkpoint_every=0), progress=False)
tensors.update({"alone." + n: p.detach().clone() for n, p in unet.trainable_parameters()})
save_file(tensors, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({
    "losses": whole.losses, "clip_starts": whole.clip_starts, "processes": whole.processes,
    "micro_batches": whole.micro_batches, "resumed_from": resumed.resumed_from, "resumed_losses": resumed.losses,
    "alone_processes": alone.processes}))
'''


def _fresh_unet(tiny_sd):
    from diffusers import UNet2DConditionModel

    from ei2.models import VideoUNet

    torch.manual_seed(0)
    return VideoUNet.from_2d(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"), recipe="ei2")


def _data():
    latents = torch.randn(1, 4, 12, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    return latents, text


def _tensors(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.trainable_parameters()}


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# ---------------------------------------------------------------------------------------------- one process
def test_gradient_accumulation_applies_the_mean_of_the_micro_batch_gradients_once(tiny_sd):
    """A naive loop: per step, draw N (clip, noise, timesteps) in order from the seeded generator, take each
    micro-batch's gradient alone, average them, clip, one AdamW step."""
    latents, text = _data()
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    n, steps, window, seed, lr = 3, 2, 5, 3, 1e-3
    config = TuningConfig(steps=steps, learning_rate=lr, window=window, seed=seed, gradient_accumulation=n,
                          gradient_checkpointing=False)
    unet = _fresh_unet(tiny_sd)
    result = tune(unet, scheduler, latents, text, config, progress=False)
    accumulated = _tensors(unet)
    assert result.micro_batches == n and result.processes == 1 and len(result.clip_starts) == n * steps

    naive = _fresh_unet(tiny_sd)
    params = naive.set_trainable()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    generator = torch.Generator().manual_seed(seed)
    naive.train()
    losses, starts = [], []
    for _ in range(steps):
        grads, step_losses = [], []
        for _ in range(n):
            first = int(torch.randint(0, latents.shape[2] - window + 1, (1,), generator=generator))
            clip = latents[:, :, first : first + window]
            noise = torch.randn(clip.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
            prediction = naive(scheduler.add_noise(clip, noise, t), t, text).sample
            loss = torch.nn.functional.mse_loss(prediction, _target(scheduler, clip, noise, t))
            grads.append(torch.autograd.grad(loss, params))
            step_losses.append(loss.item())
            starts.append(first)
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in grads) / n  # the mean of the micro-batch gradients
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / n)
    expected = _tensors(naive)
    moved = _largest_difference(expected, _tensors(_fresh_unet(tiny_sd)))
    difference = _largest_difference(accumulated, expected)
    print(f"accumulation {n} vs the naive loop: largest difference {difference:.3g} (tensors moved {moved:.3g})")
    assert result.clip_starts == starts
    np.testing.assert_allclose(result.losses, losses, rtol=1e-6)
    assert moved > 1e-3 and difference < 1e-6


def test_accumulated_tuning_resumes_exactly_and_refuses_another_number_of_micro_batches(tiny_sd, tmp_path):
    latents, text = _data()
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    config = TuningConfig(steps=3, learning_rate=1e-3, window=5, seed=3, gradient_accumulation=2,
                          checkpoint_every=2, gradient_checkpointing=False)
    whole = _fresh_unet(tiny_sd)
    full = tune(whole, scheduler, latents, text, config, checkpoint_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    resumed = _fresh_unet(tiny_sd)
    again = tune(resumed, scheduler, latents, text, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert again.resumed_from == 2 and again.losses == full.losses and again.clip_starts == full.clip_starts[4:]
    assert all(torch.equal(p, dict(whole.trainable_parameters())[n]) for n, p in resumed.trainable_parameters())
    with pytest.raises(TuningError, match="2 micro-batch"):
        tune(_fresh_unet(tiny_sd), scheduler, latents, text, replace(config, gradient_accumulation=1),
             checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="gradient_accumulation"):
        TuningConfig(gradient_accumulation=0)


# ---------------------------------------------------------------------------------------------- two processes
def test_two_processes_tune_as_one_accumulating_two_and_resume(tiny_sd, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    launched = subprocess.run([*LAUNCH, str(script), str(tiny_sd), str(out)], env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # every process holds the same tensors
    assert infos[0] == infos[1] and infos[0]["processes"] == 2 and infos[0]["micro_batches"] == 2
    assert latest_checkpoint(out / "ckpt-0").name == "step-000002" and not (out / "ckpt-1").exists()  # rank 0 only
    two = {k[len("whole."):]: v for k, v in ranks[0].items() if k.startswith("whole.")}
    resumed = {k[len("resumed."):]: v for k, v in ranks[0].items() if k.startswith("resumed.")}
    alone = {k[len("alone."):]: v for k, v in ranks[0].items() if k.startswith("alone.")}
    assert infos[0]["resumed_from"] == 2 and infos[0]["resumed_losses"] == infos[0]["losses"]
    assert all(torch.equal(resumed[k], two[k]) for k in two)  # a resume on 2 processes: the uninterrupted run

    latents, text = _data()
    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    config = TuningConfig(steps=3, learning_rate=1e-3, window=5, seed=3)
    results = {}
    for accumulation in (2, 1):
        unet = _fresh_unet(tiny_sd)
        result = tune(unet, scheduler, latents, text, replace(config, gradient_accumulation=accumulation),
                      progress=False)
        results[accumulation] = result, _tensors(unet)
    one, one_tensors = results[2]
    difference, unaccumulated = _largest_difference(two, one_tensors), _largest_difference(two, results[1][1])
    print(f"2 processes vs 1 accumulating 2: largest difference {difference:.3g} "
          f"(vs 1 without accumulation: {unaccumulated:.3g})")
    assert infos[0]["clip_starts"] == one.clip_starts and len(one.clip_starts) == 6
    np.testing.assert_allclose(infos[0]["losses"], one.losses, rtol=1e-6)
    assert difference < 1e-6 and unaccumulated > 1e-4
    # not shared (the default outside `across_processes`): each process tunes alone, as one process does
    assert infos[0]["alone_processes"] == 1 and _largest_difference(alone, results[1][1]) == 0
    # the 2-process checkpoint resumes on 1 process accumulating 2 (the same 2 micro-batches per step)
    unet = _fresh_unet(tiny_sd)
    tune(unet, scheduler, latents, text, replace(config, gradient_accumulation=2, checkpoint_every=2),
         checkpoint_dir=out / "ckpt-0", resume=True, progress=False)
    assert _largest_difference(_tensors(unet), two) < 1e-6


def test_readme_command_tunes_on_two_processes_and_rank_0_alone_writes_the_adapter(tiny_sd, tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2 -m ei2 tune ...` (README): one adapter, rank 1 writes
    nothing, and the adapter is the one of one process accumulating 2 micro-batches on the same clips."""
    from ei2 import cli, runs
    from ei2 import config as cfg
    from ei2.video import write_mp4

    from conftest import moving_square

    monkeypatch.setenv("EI2_CACHE_DIR", str(tmp_path / "cache"))
    video = tmp_path / "video" / "square.mp4"
    video.parent.mkdir()
    write_mp4(moving_square(12), video, fps=8)
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    args = ["tune", str(video), "--model", str(tiny_sd), "--source-prompt", "a red square", "--frames", "12",
            "--window", "6", "--steps", "2", "--lr", "1e-3", "--device", "cpu", "--quiet"]
    launched = subprocess.run([*LAUNCH, "-m", "ei2", *args, "--out", "two"], env={**ENV, "TMPDIR": str(scratch)},
                              cwd=work, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["two"]
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("ei2-")]  # rank 1 wrote nothing that is left
    assert sorted(p.name for p in (work / "two").iterdir()) == ["adapter", "run.json"]
    run = json.loads((work / "two" / "run.json").read_text())
    assert run["tuning"]["processes"] == 2 and run["tuning"]["micro_batches"] == 2
    two = load_file(str(work / "two" / "adapter" / "adapter.safetensors"))

    # one process, as `ei2 tune` loads and encodes, accumulating 2 micro-batches
    s = cfg.resolve(cfg.TUNE, cli.build_parser().parse_args(args), None)
    pipe, frames, _ = runs._prepare(s, cfg.TUNE, {})
    latents = pipe.encode_frames(frames.frames)
    text = pipe.encode_prompt(s.source_prompt).expand(latents.shape[0], -1, -1)
    result = tune(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), latents, text,
                  TuningConfig(steps=2, learning_rate=1e-3, seed=s.seed, window=6, gradient_accumulation=2),
                  progress=False)
    one = {n: p.detach() for n, p in pipe.unet.trainable_parameters()}
    difference = _largest_difference(two, one)
    print(f"`ei2 tune` on 2 processes vs 1 accumulating 2: largest difference {difference:.3g}")
    assert difference < 1e-6
    np.testing.assert_allclose(run["tuning"]["losses"], [round(v, 6) for v in result.losses], atol=2e-6)

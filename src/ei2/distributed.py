"""Processes of one run under `accelerate launch --multi_gpu --num_processes N` (torch.distributed): the one home
of joining the group, asking who we are, waiting for each other and sharing rank 0's tensors. Tuning shares its
micro-batches (`ei2.tuning`), long-video edits their windows (`ei2.windows`); a single process sees (0, 1) and
every call here does nothing."""
from __future__ import annotations

import os

import torch


def processes() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int, str]:
    """Under `accelerate launch --multi_gpu --num_processes N`: join the process group (gloo on the CPU, nccl on
    GPUs) and return (rank, world size, this process's device); a single process returns (0, 1, device) unchanged.

    `--multi_gpu` starts N processes (torchrun's) on CPU machines too; without it accelerate starts one process
    unless it finds several GPUs, and `--cpu` alone starts one (several need MPI)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if device == "auto" or (not cpu and str(device) == "cuda"):
        device = str(state.device)
    rank, world = processes()
    return rank, world, device


def barrier(world: int) -> None:
    """Wait for every process (after rank 0 has written something the others must not get ahead of)."""
    if world > 1:
        torch.distributed.barrier()


def broadcast_parameters(parameters) -> None:
    """Make every process hold rank 0's values (the tuned tensors before windows are shared out, or the tensors
    every process starts tuning from, as DDP does)."""
    if processes()[1] > 1:
        for p in parameters:
            torch.distributed.broadcast(p.data, 0)

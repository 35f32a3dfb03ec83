"""CPU thread defaults of the `ei2` command: one torch thread per free core.

torch's OpenMP pool starts with one thread per core and its threads meet at a barrier after every parallel
loop. On a machine where another process keeps a core busy, one of them waits for its turn on that core at
every barrier, so a run slows down by far more than the share of the machine it lost (README, "Set up": the
demo's tuning step with one of two cores busy). `ei2` therefore counts the cores that are free when it starts
(the cores this process may run on, less the ones other processes keep busy) and uses that many threads.
`OMP_NUM_THREADS` in the environment, or a command's own setting (`ei2 bench --threads`), wins.
"""
from __future__ import annotations

import os
import time

SAMPLE_S = 0.1  # how long the busy cores are counted for at start


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest time is counted in user)
    return total - idle, total


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """How many cores other processes keep busy now: measured over `sample_s` seconds from /proc/stat (this
    process sleeps meanwhile), else the 1-minute load average."""
    first = _busy_jiffies()
    if first is not None:
        time.sleep(sample_s)
        second = _busy_jiffies()
        if second is not None and second[1] > first[1]:
            machine = os.cpu_count() or 1
            return machine * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def free_cores() -> int:
    """The cores of this process's affinity that no other process keeps busy (at least 1)."""
    cores = _cores()
    return max(1, min(cores, cores - int(busy_cores() + 0.5)))


def use_free_cores(recount: bool = False) -> int | None:
    """Set torch's threads (of this thread and the ones it starts) to `free_cores()`; returns the number set.
    Leaves them (None) where `OMP_NUM_THREADS` is set, or where this process already chose another number than
    torch's default of one per core, unless `recount` (the app, at each job: the cores free now)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    import torch

    if not recount and torch.get_num_threads() != _cores():
        return None
    threads = free_cores()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads

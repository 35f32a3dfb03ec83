"""Running a benchmark: jobs sharded across processes with accelerate, resumable, one folder per job.

    OUT/jobs/<video>--<recipe>--s<seed>/job.json   the job's config, timings and metrics per edit
                                        source.gif, edits/NN-<kind>.gif, frames.npz (uint8 edits)
    OUT/logs/process-<rank>.jsonl                   start/done events of every job, per process
    OUT/results.csv, report.md, report.html, plots/ (written by whichever process finishes last)

A job is built in `jobs/<id>.partial/` and renamed when complete, so a job folder with its job.json
is the job's done marker: a resumed run (the same command again) skips it. Every process lists the
unfinished jobs, all wait for each other, then `PartialState.split_between_processes` hands each
process its share; `accelerate launch --multi_gpu --num_processes N -m ei2 bench SPEC` runs the same spec
on N CPU processes (`--multi_gpu` starts them on a machine without GPUs too), GPUs or machines.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..files import replace_folder, write_json
from .spec import BENCH_ONLY, BenchSpec, Job

JOB_FILE = "job.json"


def job_dir(out: Path, job: Job) -> Path:
    return out / "jobs" / job.id


def is_done(out: Path, job: Job, spec: BenchSpec) -> bool:
    """True when the job finished with the same config; a finished job with another config is an error."""
    path = job_dir(out, job) / JOB_FILE
    if not path.is_file():
        return False
    stored = json.loads(path.read_text()).get("config")
    if json.loads(json.dumps(job.config(spec), default=str)) != stored:
        raise ConfigError(f"{path.parent} was made with other settings than this spec's; "
                          "pass another --out, or --overwrite to redo such jobs")
    return True


class Log:
    """Append-only JSON lines of one process (small lines; one file per process, so no interleaving)."""

    def __init__(self, out: Path, rank: int):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.path = out / "logs" / f"process-{rank}.jsonl"
        self.rank = rank

    def __call__(self, event: str, **data) -> None:
        line = json.dumps({"event": event, "rank": self.rank, "pid": os.getpid(), "time": round(time.time(), 3),
                           **data})
        with open(self.path, "a") as f:
            f.write(line + "\n")


def job_settings(job: Job, prompts: list[str]):
    """The `ei2 edit` settings of a benchmark job: every value resolved by the spec (a setting the spec leaves out
    is `ei2 edit`'s default for the model, `spec.edit_defaults`), all given, so no model default applies twice."""
    from .. import config as cfg

    values = {k: v for k, v in job.settings.items() if k not in BENCH_ONLY}
    values["cross_replace"] = [] if values.get("cross_replace") is None else [str(values["cross_replace"])]
    kind = values.get("control")
    values["control"] = [] if kind is None else [kind]
    values["control_scale"] = [] if kind is None else [str(values.get("control_scale", 1.0))]
    values.update(source_prompt=job.video.source_prompt, target_prompt=list(prompts), seed=job.seed, quiet=True)
    settings = cfg.Settings(**values)
    settings.explicit = frozenset(values)
    return settings


def edit_frames(settings, pipe, latents, edits_dir: Path, control=None) -> list:
    """Every target prompt edited with `ei2.runs.edit_one`, the function `ei2 edit` uses (with the settings'
    Prompt-to-Prompt control, checked against the prompts as `ei2 edit` checks it, and the structure condition
    `control`, on during inversion as `ei2 edit` has it); the inversion is made once, as `ei2 edit` makes it."""
    from .. import runs

    p2p = runs.check_control(settings, pipe)
    inverted = None
    if not settings.null_text:
        inverted = pipe.invert(latents=latents, prompt=settings.source_prompt,
                               num_inference_steps=settings.inference_steps, strength=settings.strength,
                               control=control if settings.control_inversion else None)
    return [runs.edit_one(settings, pipe, latents, prompt, p2p, edits_dir / f"{i:02d}", control, inverted)[0]
            for i, prompt in enumerate(settings.target_prompt, 1)]


class Runner:
    """Runs jobs in one process: a model per job (tuning changes it), one CLIP scorer for all."""

    def __init__(self, spec: BenchSpec, out: Path, device: str, quiet: bool = True):
        self.spec, self.out, self.device, self.quiet = spec, out, device, quiet
        self._scorer = None

    @property
    def scorer(self):
        if self._scorer is None and "clip" in self.spec.metrics:
            from ..metrics.clip import ClipScorer

            self._scorer = ClipScorer(self.spec.clip_model, device=self.device)
        return self._scorer

    def run(self, job: Job) -> dict:
        import torch

        from .. import runs
        from ..metrics.evaluate import evaluate_edits
        from ..pipeline import EI2Pipeline
        from ..video import write_gif

        s = job.settings
        final = job_dir(self.out, job)
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "edits").mkdir(parents=True)
        timings = {}
        t0, cpu0 = time.perf_counter(), time.process_time()
        pipe = EI2Pipeline.from_pretrained(self.spec.model, recipe=job.recipe.recipe, device=self.device,
                                           dtype=s["dtype"])
        pipe.set_progress_bar_config(disable=self.quiet)
        settings = job_settings(job, [e.prompt for e in job.video.edits])
        settings.model = self.spec.model  # whose bundled ControlNets `--control KIND` takes
        runs.configure(pipe, settings)
        frames, centres, fps = job.video.load(s, s["size"] or pipe.default_size)
        torch.manual_seed(job.seed)
        latents = pipe.encode_frames(frames)
        timings["load_s"] = time.perf_counter() - t0
        control, _ = runs.structure_control(settings, pipe, frames)
        losses = []
        if s["steps"]:
            t = time.perf_counter()
            result = runs.tune_on(settings, pipe, latents, control)  # as `ei2 edit` tunes
            losses = result.losses
            timings["tune_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prompts = settings.target_prompt
        edited = edit_frames(settings, pipe, latents, partial / "edits", control)  # as `ei2 edit` does
        timings["edit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rows = evaluate_edits(list(zip(prompts, edited)), frames, job.video.source_prompt, self.spec.metrics,
                              self.scorer, source_centres=centres)
        timings["metrics_s"] = time.perf_counter() - t
        write_gif(frames, partial / "source.gif", fps)
        edits = []
        for i, (edit, video, row) in enumerate(zip(job.video.edits, edited, rows), 1):
            gif = f"edits/{i:02d}-{edit.kind}.gif"
            write_gif(video, partial / gif, fps)
            edits.append({"index": i, "kind": edit.kind, "prompt": edit.prompt, "gif": gif, "metrics": row})
        np.savez_compressed(partial / "frames.npz", source=frames, edits=np.asarray(edited))
        timings["total_s"] = time.perf_counter() - t0
        timings["cpu_s"] = time.process_time() - cpu0  # CPU time of this process (all its threads)
        record = {
            "id": job.id, "video": job.video.name, "recipe": job.recipe.name, "seed": job.seed,
            "config": json.loads(json.dumps(job.config(self.spec), default=str)),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "tuning": {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                       "mean_last_10": float(np.mean(losses[-10:])) if losses else None},
            "edits": edits,
        }
        write_json(partial / JOB_FILE, record)
        replace_folder(partial, final)  # a finished job (--overwrite) is replaced in one rename
        return record


    def rescore(self, job: Job) -> None:
        """Recompute the metrics of a finished job from its frames.npz (e.g. after changing `metrics`)."""
        from ..metrics.evaluate import evaluate_edits

        folder = job_dir(self.out, job)
        record = json.loads((folder / JOB_FILE).read_text())
        with np.load(folder / "frames.npz") as data:
            source, edited = data["source"], data["edits"]
        _, centres, _ = job.video.load(job.settings, source.shape[1])
        rows = evaluate_edits([(e.prompt, f) for e, f in zip(job.video.edits, edited)], source,
                              job.video.source_prompt, self.spec.metrics, self.scorer, source_centres=centres)
        for edit, row in zip(record["edits"], rows):
            edit["metrics"] = row
        write_json(folder / JOB_FILE, record)


def _device(requested: str, state) -> str:
    if requested == "auto":
        return str(state.device)
    return requested


def run_bench(spec: BenchSpec, out: str | Path, device: str = "auto", threads: int | None = None,
              overwrite: bool = False, quiet: bool = True) -> bool:
    """Run the spec's unfinished jobs in this process's share. Returns True when this process wrote the report."""
    import torch
    from accelerate import PartialState

    out = Path(out)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if threads is None and cpu:
        threads = max(1, (os.cpu_count() or 1) // state.num_processes)
    if threads:
        torch.set_num_threads(threads)
    jobs = spec.jobs()
    if overwrite and state.is_main_process:
        for job in jobs:
            shutil.rmtree(job_dir(out, job), ignore_errors=True)
    state.wait_for_everyone()
    pending = [j for j in jobs if not is_done(out, j, spec)]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "spec.json", {"name": spec.name, "spec": str(spec.path), "quick": spec.quick,
                                       "digest": spec.digest(), "jobs": [j.id for j in jobs],
                                       "processes": state.num_processes})
        _say(quiet, f"{len(jobs)} jobs, {len(jobs) - len(pending)} already done, {len(pending)} to run "
                    f"on {state.num_processes} process(es)")
    state.wait_for_everyone()  # every process has listed `pending` before any job starts
    rank, device = state.process_index, _device(device, state)
    with state.split_between_processes(pending) as share:
        mine = list(share)
    # tuning resets accelerate's process-wide state (ei2.tuning): use only the plain values taken above
    log = Log(out, rank)
    runner = Runner(spec, out, device, quiet=True)
    for k, job in enumerate(mine, 1):
        log("start", job=job.id)
        record = runner.run(job)
        log("done", job=job.id, seconds=record["timings"]["total_s"])
        _say(quiet, f"[{rank}] {k}/{len(mine)} {job.id} ({record['timings']['total_s']:.1f} s)")
    # No barrier at the end (a long share would time the others out): the last to finish writes the report.
    if all((job_dir(out, j) / JOB_FILE).is_file() for j in jobs):
        from .report import write_report

        write_report(spec, out, jobs)
        _say(quiet, f"wrote {out / 'results.csv'}, {out / 'report.md'}, {out / 'report.html'}")
        return True
    return False


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"ei2 bench: {message}", file=sys.stderr, flush=True)

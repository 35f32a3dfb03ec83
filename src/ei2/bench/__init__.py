"""`ei2 bench SPEC.yaml`: run a benchmark spec (videos × recipes × seeds), sharded across processes.

    ei2 bench benchmarks/shapes/spec.yaml --quick                     # one process
    accelerate launch --multi_gpu --num_processes 2 -m ei2 bench benchmarks/shapes/spec.yaml
                                                                       # 2 processes (on CPU too)

Writes `results.csv`, `report.md` and `report.html` in `--out`; an interrupted run continues where
it stopped when the same command is run again. `ei2.bench.spec` reads the spec, `ei2.bench.run`
runs the jobs, `ei2.bench.report` writes the reports. This module imports nothing heavy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark spec (videos x recipes x seeds) and write results.csv, report.md/html",
        description="Tune every (video, recipe, seed) of SPEC once, edit it with every target prompt, measure the "
                    "edits, and write results.csv, report.md (mean ± 95% interval per recipe) and report.html. "
                    "Finished jobs are skipped when the command is run again. Under `accelerate launch` the jobs "
                    "are shared between the processes.",
    )
    parser.add_argument("spec", metavar="SPEC", help="benchmark spec YAML (e.g. benchmarks/shapes/spec.yaml)")
    parser.add_argument("--out", metavar="DIR", help="results folder (default: outputs/bench-<name>[-quick])")
    parser.add_argument("--quick", action="store_true", help="the spec's quick subset (a smoke test)")
    parser.add_argument("--recipes", nargs="+", metavar="NAME",
                        help="run only these recipe entries of the spec (names as in its `recipes:`)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="N",
                        help="run only these seeds of the spec's `seeds:` (e.g. --seeds 0 for a first pass)")
    parser.add_argument("--device", default="auto",
                        help="auto (each process's accelerate device: cuda:N, else cpu), cpu, cuda (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: cores / processes)")
    parser.add_argument("--overwrite", action="store_true", help="redo jobs that already finished in --out")
    parser.add_argument("--metrics", nargs="+", choices=("clip", "oracle", "flow"),
                        help="measure these instead of the spec's metrics (e.g. without OpenCV: clip oracle)")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the metrics of finished jobs from their saved frames, then rewrite the reports")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports of finished jobs, run nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.set_defaults(handler=run_command)
    return parser


def run_command(args, argv=None) -> int:
    from ..errors import ConfigError
    from .spec import load_spec

    spec = load_spec(args.spec, quick=args.quick)
    out = Path(args.out) if args.out else Path("outputs") / f"bench-{spec.name}"
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.metrics:
        spec.metrics = tuple(args.metrics)
    if args.recipes:
        by_name = {r.name: r for r in spec.recipes}
        unknown = [name for name in args.recipes if name not in by_name]
        if unknown:
            raise ConfigError(f"--recipes {' '.join(unknown)}: not in the spec; its recipes are {', '.join(by_name)}")
        spec.recipes = [by_name[name] for name in args.recipes]
    if args.seeds:
        unknown = [str(s) for s in args.seeds if s not in spec.seeds]
        if unknown:
            raise ConfigError(f"--seeds {' '.join(unknown)}: not in the spec; its seeds are "
                              f"{', '.join(map(str, spec.seeds))}")
        spec.seeds = [s for s in spec.seeds if s in args.seeds]
    if args.report_only or args.rescore:
        from .report import write_report
        from .run import JOB_FILE, Runner, job_dir

        jobs = spec.jobs()
        missing = [j.id for j in jobs if not (job_dir(out, j) / JOB_FILE).is_file()]
        if len(missing) == len(jobs):
            raise ConfigError(f"no job of this spec has finished in {out}; run without --report-only/--rescore")
        if args.rescore:
            runner = Runner(spec, out, "cpu" if args.device == "auto" else args.device)
            for job in jobs:
                if job.id not in missing:
                    runner.rescore(job)
        write_report(spec, out, jobs)
        print(f"ei2 bench: wrote {out / 'report.md'} ({len(jobs) - len(missing)} of {len(jobs)} jobs finished)",
              file=sys.stderr)
        return 0
    from .run import run_bench

    run_bench(spec, out, device=args.device, threads=args.threads, overwrite=args.overwrite, quiet=args.quiet)
    return 0

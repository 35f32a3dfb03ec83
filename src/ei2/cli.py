"""The `ei2` command: a thin layer over `EI2Pipeline`.

    ei2 edit VIDEO --source-prompt "a man is skiing" --target-prompt "a panda is skiing"
    ei2 tune VIDEO --source-prompt "a man is skiing" --out adapters/ski
    ei2 edit VIDEO --adapter adapters/ski --source-prompt "a man is skiing" --target-prompt "..."
    ei2 edit --config run.yaml

A run is built in `<out>.partial/` and renamed to `<out>` when complete, so a run folder is either
whole or absent. Bad input (a missing video, an empty prompt, a bad YAML key, NaN loss, ...) prints
one line `ei2: error: ...`, exits with code 2 and leaves no run folder. An interrupted tuning keeps
its checkpoints in `<out>.partial/` for `--resume`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import config as cfg
from . import runs
from .errors import EI2Error


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ei2", description="Edit videos from text with EI² (NeurIPS 2023) and Tune-A-Video.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ei2 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    edit = commands.add_parser("edit", help="tune on a video (or reuse an adapter), invert it and edit it",
                               description="Tune on the source video (or reuse --adapter), invert it with DDIM "
                                           "and sample it again under each --target-prompt.")
    edit.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    cfg.add_arguments(edit, cfg.EDIT)
    edit.set_defaults(handler=run_edit)
    tune = commands.add_parser("tune", help="tune on a video and keep the adapter",
                               description="One-shot tuning on the source video; --out is the adapter folder.")
    tune.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    cfg.add_arguments(tune, cfg.TUNE)
    tune.set_defaults(handler=run_tune)
    from . import bench, demo
    from .metrics import evaluate, shift_cli

    demo.add_parser(commands, edit_parser=edit)  # demo runs `ei2 edit` through this parser, without importing cli
    shift_cli.add_parser(commands)
    bench.add_parser(commands)
    evaluate.add_parser(commands)
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="the web app: upload a video, type prompts, watch the edit (gradio)",
                                description="A gradio web app over the same jobs as `ei2 edit`; every job writes an "
                                            "ordinary run folder under --out. Needs the app extra: "
                                            'pip install -e ".[app]"')
    serve.add_argument("--model", metavar="PATH_OR_ID", help="diffusers model folder or hub id (default: the embedded "
                                                             "Shapes model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                           "only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--out", default="outputs/app", metavar="DIR",
                       help="folder of the app's run folders and uploads (default: outputs/app); the app serves "
                            "only the files of each finished job, under a random name")
    serve.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted (default: 50 MB)")
    serve.add_argument("--max-frames", type=_positive, default=32, metavar="N",
                       help="most frames a job may edit (default: 32)")
    serve.add_argument("--max-steps", type=_positive, default=500, metavar="N",
                       help="most tuning steps a job may ask for (default: 500)")
    serve.add_argument("--max-inference-steps", type=_positive, default=100, metavar="N",
                       help="most inference (DDIM) steps a job may ask for (default: 100)")
    serve.add_argument("--max-prompts", type=_positive, default=4, metavar="N",
                       help="most target prompts in one job (default: 4)")
    serve.add_argument("--keep-runs", type=_positive, default=None, metavar="N",
                       help="keep the newest N run folders, uploads and inversion-cache entries and remove older "
                            "ones (at start and after every job; the log says what went; default: keep all)")
    serve.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, cuda:N, mps or cpu")
    serve.set_defaults(handler=run_serve)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_serve(args, argv) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise EI2Error('`ei2 serve` needs gradio, which is not installed; install the app extra: pip install -e ".[app]"')
    from .app import serve

    serve(model=args.model, host=args.host, port=args.port, out=args.out, device=args.device, keep_runs=args.keep_runs,
          max_upload_mb=args.max_upload_mb, max_frames=args.max_frames, max_steps=args.max_steps,
          max_inference_steps=args.max_inference_steps, max_prompts=args.max_prompts)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    _quiet_libraries()
    from .cpu import use_free_cores
    from .models import AdapterMismatchError

    use_free_cores()  # one torch thread per free core (ei2.cpu), unless OMP_NUM_THREADS says otherwise

    try:
        return args.handler(args, argv if argv is not None else sys.argv[1:])
    except (EI2Error, AdapterMismatchError) as e:
        print(f"ei2: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ei2: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub(\..*)?")
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def _say(settings, message: str) -> None:
    if not settings.quiet or message.startswith(runs.WARNING):  # --quiet keeps the warnings
        print(f"ei2: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- jobs
# The jobs themselves (staging, tuning, inversion, edits, run.json) live in `ei2.runs`, shared with the
# web app; the CLI parses, validates, prints and maps errors to exit codes.
_validate = runs.validate


def run_tune(args, argv) -> int:
    s = cfg.resolve(cfg.TUNE, args, args.config)
    _validate(s, cfg.TUNE)
    runs.tune(s, argv, say=lambda message: _say(s, message))
    return 0


def run_edit(args, argv) -> int:
    s = cfg.resolve(cfg.EDIT, args, args.config)
    _validate(s, cfg.EDIT)
    runs.edit(s, argv, say=lambda message: _say(s, message))
    return 0


if __name__ == "__main__":
    sys.exit(main())

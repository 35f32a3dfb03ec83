"""`ei2 analyze-shift`: covariate shift of the temporal modules and frame attention, per layer (seed A.2–A.5).

    ei2 analyze-shift VIDEO --recipe ei2 --recipe tune-a-video [--adapter DIR ...] [--timesteps 100 500 900]
                      [--out DIR] [--model PATH]

Encodes the video with the model's VAE, noises it at each timestep (the same noise for every recipe),
runs each recipe's inflated UNet with hooks (`ei2.metrics.shift.ShiftProbe`) and writes, in the out
folder: `shift.csv` (every number), `shift.md` (summary and per-layer table) and `shift_by_layer.png`
(recipes side by side). An adapter is analysed beside its recipe's untuned model, with the Prop. 2
columns for every query map it tuned. Until the `ei2` command wires it in:
`python -m ei2.metrics.shift_cli analyze-shift VIDEO ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..files import atomic_path

DEFAULT_TIMESTEPS = (100, 500, 900)
OUTPUTS = ("shift.csv", "shift.md", "shift_by_layer.png")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..models.recipes import RECIPES

    parser = subparsers.add_parser(
        "analyze-shift",
        help="measure the covariate shift each temporal module and frame attention adds (seed A.2-A.5)",
        description=(
            "Per layer: mean shift |mu'-mu|, covariance shift |Sigma'-Sigma| (spectral, Frobenius) beside "
            "|Sigma(z)|, omega = |M^i|^2, the bound of seed Prop. 3 and, with an adapter, Prop. 2 for every "
            "tuned query map. Writes shift.csv, shift.md and shift_by_layer.png to --out."
        ),
    )
    parser.add_argument("video", help="video file (mp4, gif, ...) or folder of frames")
    parser.add_argument("--recipe", action="append", choices=list(RECIPES), default=None,
                        help="recipe to analyse; repeat to compare (default: the adapters' recipes, "
                             "else ei2 and tune-a-video)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="tuned adapter (from `ei2 tune`); analysed beside its untuned recipe; repeatable")
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS),
                        help=f"noise levels to analyse at (default: {' '.join(map(str, DEFAULT_TIMESTEPS))})")
    parser.add_argument("--out", default=None, help="output folder (default: ./shift-<video name>)")
    parser.add_argument("--model", default=None, help="diffusers Stable Diffusion folder or id (default: Shapes)")
    parser.add_argument("--prompt", default="", help="text the UNet is conditioned on (default: empty prompt)")
    parser.add_argument("--frames", type=int, default=8, help="frames read from the video (default: 8)")
    parser.add_argument("--height", type=int, default=None, help="frame height (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="frame width (default: the model's size)")
    parser.add_argument("--modules", default="temporal,frame,cross",
                        help="module kinds to measure, comma-separated: temporal, frame, cross (default: all)")
    parser.add_argument("--max-queries", type=int, default=1024,
                        help="query rows per group used to recompute attention (default: 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.set_defaults(handler=handler)
    return parser


def handler(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The `ei2` command's handler signature: (parsed args, raw argv)."""
    return run(args, argv)


def _fail(message: str) -> int:
    print(f"ei2: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run `ei2 analyze-shift`; exit code 2 on bad input. `argv` (the line after `ei2`) is echoed in shift.md."""
    from ..errors import EI2Error
    from ..models.video_unet import AdapterMismatchError

    try:
        return _run(args, argv)
    except (EI2Error, AdapterMismatchError) as e:
        return _fail(str(e))


def _check_args(args) -> tuple[list[str], dict[str, list[Path]], list[str], Path]:
    from ..errors import ConfigError
    from ..metrics.shift import KINDS
    from ..models.video_unet import VideoUNet

    kinds = [k.strip() for k in args.modules.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"--modules {args.modules!r}: use a comma-separated subset of {', '.join(KINDS)}")
    if args.max_queries < 1:
        raise ConfigError(f"--max-queries must be at least 1, got {args.max_queries}")
    if args.frames < 2:
        raise ConfigError(f"--frames {args.frames}: temporal modules need at least 2 frames")
    adapters: dict[str, list[Path]] = {}
    for directory in args.adapter:
        recipe = VideoUNet.read_adapter_recipe(directory)  # AdapterMismatchError if it is not an adapter
        adapters.setdefault(recipe.name, []).append(Path(directory))
    recipes = list(dict.fromkeys(args.recipe or list(adapters) or ["ei2", "tune-a-video"]))
    stray = [name for name in adapters if name not in recipes]
    if stray:
        raise ConfigError(
            f"adapter(s) {', '.join(str(d) for n in stray for d in adapters[n])} were tuned with recipe "
            f"{', '.join(stray)}; add --recipe {' --recipe '.join(stray)} (or drop --recipe)"
        )
    out = Path(args.out) if args.out else Path(f"shift-{Path(args.video).stem}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)} from an earlier run; pass --overwrite or "
                          "another --out")
    return recipes, adapters, kinds, out


def _run(args, argv) -> int:
    from ..errors import ConfigError
    from ..pipeline import EI2Pipeline
    from ..video import read_video

    recipes, adapters, kinds, out = _check_args(args)
    if not Path(args.video).exists():
        raise ConfigError(f"video not found: {args.video}")
    pipe = EI2Pipeline.from_pretrained(args.model, recipe=recipes[0], device=args.device, dtype="fp32")
    limit = pipe.scheduler.config.num_train_timesteps
    bad = [t for t in args.timesteps if not 0 <= t < limit]
    if bad:
        raise ConfigError(f"--timesteps {' '.join(map(str, bad))}: the model has timesteps 0 to {limit - 1}")
    size = pipe.default_size
    height, width = args.height or size, args.width or size
    pipe.check_size(height, width)
    video = read_video(args.video, num_frames=args.frames, size=(height, width))
    timesteps = list(dict.fromkeys(args.timesteps))
    records = _analyse(args, pipe, video.frames, recipes, adapters, kinds, timesteps)
    header = (f"Model `{pipe.model_source}`, {video.num_frames} frames at {height}x{width}, prompt {args.prompt!r}, "
              f"timesteps {', '.join(map(str, timesteps))}, noise seed {args.seed}.")
    _write_report(args, argv, out, recipes, records, header)
    return 0


def _analyse(args, pipe, frames, recipes, adapters, kinds, timesteps) -> list[dict]:
    """The shift records of every recipe, untuned and with each of its adapters."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..models.video_unet import VideoUNet
    from .shift import analyze_shift, base_query_weights

    latents = pipe.encode_frames(frames)
    text = pipe.encode_prompt(args.prompt)
    device = pipe.unet.device
    # a pristine 2D UNet: the pipeline's own was inflated in place
    unet2d = UNet2DConditionModel.from_pretrained(pipe.model_source, subfolder="unet", use_safetensors=True)
    records = []
    for recipe in recipes:
        model = VideoUNet.from_2d(unet2d, recipe).to(device)
        base = base_query_weights(model)
        print(f"ei2: analysing {recipe} (untuned) at t = {', '.join(map(str, timesteps))}", file=sys.stderr)
        records += analyze_shift(model, latents, text, timesteps, pipe.scheduler, seed=args.seed, kinds=tuple(kinds),
                                 max_queries=args.max_queries, tags={"recipe": recipe, "state": "init"})
        names = adapters.get(recipe, [])
        for directory in names:
            model.load_adapter(directory)
            state = "tuned" if len(names) == 1 else f"tuned:{directory.name}"
            print(f"ei2: analysing {recipe} with adapter {directory}", file=sys.stderr)
            records += analyze_shift(model, latents, text, timesteps, pipe.scheduler, seed=args.seed,
                                     kinds=tuple(kinds), base_query_weights=base, max_queries=args.max_queries,
                                     tags={"recipe": recipe, "state": state})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def _write_report(args, argv, out: Path, recipes, records: list[dict], header: str) -> None:
    """shift.csv, shift.md (with the command that made it) and shift_by_layer.png in `out`; the tables printed."""
    from .shift import format_summary, format_table, plot_shift, summarize, to_csv

    summary = summarize(records)
    command = "ei2 " + " ".join(_quote(str(a)) for a in argv) if argv else ""
    temporal = [r for r in records if r["kind"] == "temporal"]
    print(format_summary(summary))
    print()
    print(format_table(temporal or records))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "shift.csv") as tmp:
        tmp.write_text(to_csv(records))
    markdown = [
        f"# Covariate shift: {', '.join(recipes)} on {args.video}",
        "",
        header,
        "",
        "## Summary (mean over layers and timesteps)",
        "",
        format_summary(summary, markdown=True),
        "",
        "## Per layer",
        "",
        format_table(records, markdown=True),
        "",
    ]
    if command:
        markdown[1:1] = ["", f"`{command}`"]
    with atomic_path(out / "shift.md") as tmp:
        tmp.write_text("\n".join(markdown))
    written = [out / "shift.csv", out / "shift.md"]
    try:
        plot_shift(records, out / "shift_by_layer.png", title=f"covariate shift on {Path(args.video).name}")
        written.append(out / "shift_by_layer.png")
    except ImportError:
        print("ei2: matplotlib is not installed, so no plot was drawn; `pip install matplotlib` for "
              "shift_by_layer.png", file=sys.stderr)
    print(f"\nei2: wrote {', '.join(map(str, written))}", file=sys.stderr)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ei2")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())

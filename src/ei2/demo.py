"""`ei2 demo`: the one-command first run. Edits a bundled Shapes video with the bundled Shapes model.

    ei2 demo            # "a red circle moving right ..." -> "a blue square moving right ...", CPU, ~1 min

It is `ei2 edit` with the bundled sample and prompts filled in; the run folder, outputs and errors are
those of `ei2 edit`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SAMPLE = "red_circle_right"
# The edit `ei2 demo --sample NAME` makes when no --target-prompt is given: colour and shape swapped, the
# sample's motion and background kept. The default sample's edit is the one the demo test checks.
TARGETS = {
    "blue_square_down": "a red circle moving down on a black background",
    "red_circle_right": "a blue square moving right on a gray background",
    "green_triangle_circling": "a purple square circling on a white background",
    "yellow_diamond_bouncing": "a green circle bouncing on a gray background",
    "purple_circle_diagonal": "a green square moving diagonally on a black background",
    "orange_square_growing": "a blue circle growing on a white background",
    # a background edit: where the edit must keep the object's path while everything around it changes
    "green_square_left_background": "a green square moving left on a white background",
}
TARGET = TARGETS[SAMPLE]


def samples_dir() -> Path:
    from .loading import default_model_path

    return default_model_path().parent / "samples"


def add_parser(commands, edit_parser: argparse.ArgumentParser) -> None:
    """Register `ei2 demo`; `edit_parser` is the `ei2 edit` parser, through which the demo's edit runs."""
    demo = commands.add_parser(
        "demo", help="edit a bundled sample video with the bundled Shapes model (the first thing to run)",
        description="Edit the bundled video 'a red circle moving right on a gray background' into "
                    f"'{TARGET}' with the bundled Shapes model (its calibrated structure-preserving injection on), "
                    "on the CPU in about a minute.",
    )
    demo.add_argument("--sample", default=SAMPLE, help="name of a bundled sample (assets/samples/index.json)")
    demo.add_argument("--target-prompt", action="append", help="edit prompt, repeatable (default: the sample's colour and shape swapped, "
                                                                   f"for the default sample {TARGET!r})")
    demo.add_argument("--control", help="a structure condition from the source through the model's bundled "
                                        "ControlNet (e.g. canny; `ei2 edit --control`)")
    demo.add_argument("--recipe", default="ei2")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--out", help="run folder (default: a new folder under ./outputs/)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=run_demo, edit_parser=edit_parser)


def demo_edit_argv(args) -> list[str]:
    from .errors import ConfigError

    index_path = samples_dir() / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"the bundled samples are missing ({index_path}); reinstall ei2 from its repository")
    index = json.loads(index_path.read_text())
    if args.sample not in index:
        raise ConfigError(f"no bundled sample {args.sample!r}; choose one of: {', '.join(sorted(index))}")
    sample = index[args.sample]
    argv = ["edit", str(samples_dir() / sample["video"]), "--source-prompt", sample["caption"],
            "--recipe", args.recipe, "--seed", str(args.seed), "--device", args.device,
            "--frames", str(sample["frames"])]
    prompts = args.target_prompt or ([TARGETS[args.sample]] if args.sample in TARGETS else None)
    if not prompts:
        raise ConfigError(f"sample {args.sample!r} has no default edit; pass --target-prompt \"...\"")
    for prompt in prompts:
        argv += ["--target-prompt", prompt]
    if args.control:
        argv += ["--control", args.control]
    if args.out:
        argv += ["--out", args.out]
    argv += ["--overwrite"] * args.overwrite + ["--quiet"] * args.quiet
    return argv


def run_demo(args, argv) -> int:
    import datetime

    if not args.out:
        args.out = str(Path("outputs") / datetime.datetime.now().strftime("demo-%Y%m%d-%H%M%S"))
    edit_argv = demo_edit_argv(args)
    edit_args = args.edit_parser.parse_args(edit_argv[1:])  # edit_argv[0] is the command, "edit"
    code = edit_args.handler(edit_args, edit_argv)
    if code == 0:
        out = Path(args.out)
        print(f"ei2 demo: edited video in {out}/edits/, side by side in {out}/grid.gif and {out}/grid.mp4")
        for path in sorted(out.rglob("*")):
            if path.suffix in (".gif", ".mp4"):
                print(f"  {path}")
    return code

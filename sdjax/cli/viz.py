"""`sdjax viz` and `sdjax demo`: the one-step completion pictures (sdjax.viz) from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import SdjaxError
from ..io import check_output_dir, record_output
from ..viz import COMPLETION_STEPS
from .args import positive_int, unit_interval
from .generate import add_model_args, add_out_args, load_pipeline
# Captions of the toy model's training set ("a {color} {shape} on a {background} background").
DEMO_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a gray background",
    "a green circle on a black background",
)
DEMO_OUT = "sdjax-demo"
VIZ_FILES = ("grid.png", "convergence.json")  # what a viz folder written before output markers holds


def _add_viz_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--columns", type=positive_int, default=8,
                   help="steps shown in the grid, evenly spaced, always the first and the last (default: 8)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated words of the prompt for the attention maps (default: its content words)")
    p.add_argument("--completion-steps", type=int, choices=(0,) + COMPLETION_STEPS, default=4,
                   help="K: also complete each shown step with K separate DDIM steps (extra grid row; 0: skip; "
                        "default: 4)")


def add_commands(subparsers) -> None:
    v = subparsers.add_parser(
        "viz", help="one-step completions of a trajectory: grid.png, completions.gif, convergence.png/.json, "
                    "attention.png")
    add_model_args(v)
    v.add_argument("--prompt", action="append", default=None,
                   help="text prompt (repeat for several samples; sample i uses seed + i)")
    v.add_argument("--image", default=None, help="show an edit: image-to-image from this image (with --mask: inpainting)")
    v.add_argument("--mask", default=None, help="with --image: inpaint the white region of this mask")
    v.add_argument("--strength", type=unit_interval, default=None,
                   help="with --image: how far the image is noised, in (0, 1] (default: 0.8; inpainting 1.0)")
    v.add_argument("--shard", default=None, metavar="FILE",
                   help="draw from a shard written by `sdjax trajectories` instead of running the model "
                        "(no attention maps)")
    _add_viz_options(v)
    add_out_args(v)
    v.set_defaults(func=cmd_viz)

    d = subparsers.add_parser("demo", help="`sdjax viz` on the shipped toy model with a few shape prompts, offline")
    add_model_args(d)
    _add_viz_options(d)
    add_out_args(d, f"output folder (default: ./{DEMO_OUT})", required=False, default=DEMO_OUT)
    d.set_defaults(func=cmd_demo)


def _tokens(args) -> list[str] | None:
    return [t for t in args.tokens.split(",") if t.strip()] if args.tokens else None


def _report(files: dict, out: Path, seconds: float, previous, command: str) -> None:
    record_output(out, command, [Path(f).name for f in files.values()], previous)
    print(f"wrote to {out.resolve()} in {seconds:.1f} s:")
    for path in files.values():
        print(f"  {Path(path).resolve()}")


def _live(args, prompts: list[str], command: str) -> None:
    from ..viz import render, run_live
    from ..viz.attention import select_words

    t0 = time.perf_counter()
    previous = check_output_dir(args.out, command, overwrite=args.overwrite, own_files=VIZ_FILES)
    pipe, params, model, steps, guidance = load_pipeline(args)
    tokens = _tokens(args)
    select_words(pipe.tokenizer, prompts, tokens)  # a wrong --tokens fails before the model runs
    print(f"sampling {len(prompts)} prompt(s), {steps} steps ...", file=sys.stderr)
    image = mask = None
    if getattr(args, "image", None):
        from ..images import load_image

        image = load_image(args.image)
        mask = load_image(args.mask, "L") if args.mask else None
    elif getattr(args, "mask", None) or getattr(args, "strength", None) is not None:
        raise SdjaxError("--mask and --strength need --image")
    data = run_live(pipe, params, prompts, seed=args.seed, steps=steps, guidance=guidance, height=args.height,
                    width=args.width, attentions=True, settings_extra={"model": model}, image=image, mask=mask,
                    strength=getattr(args, "strength", None))
    print("rendering ...", file=sys.stderr)
    files = render(pipe, params, data, args.out, columns=args.columns, completion_steps=args.completion_steps,
                   tokens=tokens)
    _report(files, Path(args.out), time.perf_counter() - t0, previous, command)


def cmd_viz(args) -> None:
    if args.shard is None:
        if not args.prompt:
            raise SdjaxError("--prompt TEXT is required (or --shard FILE to draw a saved trajectory)")
        return _live(args, args.prompt, "sdjax viz")

    from ..viz import from_shard, render

    t0 = time.perf_counter()
    if args.prompt:
        raise SdjaxError("--prompt and --shard cannot be combined: the shard holds its own prompts")
    if args.image or args.mask or args.strength is not None:
        raise SdjaxError("--image/--mask/--strength and --shard cannot be combined: the shard holds its run")
    previous = check_output_dir(args.out, "sdjax viz", overwrite=args.overwrite, own_files=VIZ_FILES)
    data = from_shard(args.shard)
    ignored = [f"--{k}" for k in ("steps", "guidance", "scheduler", "height", "width") if getattr(args, k) is not None]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: the shard's settings are used", file=sys.stderr)
    if args.tokens:
        print("note: --tokens ignored", file=sys.stderr)
    args.scheduler = data.settings.get("scheduler")  # the completions use this sampler's schedule and clipping
    if args.model is None and data.settings.get("model"):
        args.model = data.settings["model"]
    pipe, params, *_ = load_pipeline(args)
    files = render(pipe, params, data, args.out, columns=args.columns, completion_steps=args.completion_steps)
    print("note: attention.png needs a live run (a shard holds no attention maps): run `sdjax viz --prompt ...` "
          "without --shard", file=sys.stderr)
    _report(files, Path(args.out), time.perf_counter() - t0, previous, "sdjax viz")


def cmd_demo(args) -> None:
    _live(args, list(DEMO_PROMPTS), "sdjax demo")

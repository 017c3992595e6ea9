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
from .generate import (add_controlnet_args, add_model_args, add_out_args, add_upscaler_args, check_control_args,
                       control_inputs, load_pipeline, load_upscaler)
# Captions of the toy model's training set ("a {color} {shape} on a {background} background").
DEMO_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a black background",
    "a yellow triangle on a gray background",
    "a green circle on a black background",
)
# The ControlNet panel: the silhouette of shapes image (data seed, index), a triangle off-centre (held out: the toy
# ControlNet trained on seed 0), and prompts that agree with its shape.
DEMO_SILHOUETTE = (1, 10_000_006)
DEMO_CONTROL_PROMPTS = ("a red triangle on a white background", "a cyan triangle on a black background")
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
    add_controlnet_args(v)  # a controlled run: the grid shows the control image(s)
    add_upscaler_args(v)  # a cascade: stage 2's pictures go to OUT/stage2/
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


def _live(args, prompts: list[str], command: str, extra_panels=None) -> None:
    """A live run's pictures into --out. extra_panels(pipe, params, data, out) -> {name: path}: more pictures made
    with the loaded model and the run's settings, before the report (`sdjax demo`'s ControlNet panel)."""
    from ..viz import render, run_live
    from ..viz.attention import select_words

    t0 = time.perf_counter()
    control = check_control_args(args) if hasattr(args, "controlnet") else {}
    if control and (getattr(args, "image", None) or getattr(args, "mask", None)
                    or getattr(args, "strength", None) is not None):
        raise SdjaxError("--controlnet and --image/--mask/--strength cannot be combined: sdjax viz shows ControlNet "
                         "text-to-image runs")
    if control and (getattr(args, "upscaler", None) or getattr(args, "cascade", False)):
        raise SdjaxError("--controlnet and --upscaler/--cascade cannot be combined")
    previous = check_output_dir(args.out, command, overwrite=args.overwrite, own_files=VIZ_FILES)
    upscaler = load_upscaler(args, args.dtype) if hasattr(args, "upscaler") else None
    if control:
        from ..pipelines import FlaxStableDiffusionControlNetPipeline

        pipe, params, model, steps, guidance = load_pipeline(args, pipeline_cls=FlaxStableDiffusionControlNetPipeline,
                                                             controlnet=list(args.controlnet))
    else:
        pipe, params, model, steps, guidance = load_pipeline(args)
    tokens = _tokens(args)
    select_words(pipe.tokenizer, prompts, tokens)  # a wrong --tokens fails before the model runs
    if upscaler is not None:
        if getattr(args, "image", None) or getattr(args, "mask", None) or getattr(args, "strength", None) is not None:
            raise SdjaxError("--image/--mask/--strength and --upscaler/--cascade cannot be combined")
        return _live_cascade(args, prompts, command, t0, previous, pipe, params, model, steps, guidance, upscaler,
                             tokens)
    print(f"sampling {len(prompts)} prompt(s), {steps} steps ...", file=sys.stderr)
    image = mask = control_images = None
    settings_extra = {"model": model}
    if control:  # float [H, W, 3] each, at the output's size (--height/--width resize them, as sdjax generate)
        control_images = [c[0].transpose(1, 2, 0) for c in control_inputs(pipe, args)]
        settings_extra |= {"controlnet": list(args.controlnet), "control_image": list(args.control_image)}
    if getattr(args, "image", None):
        from ..images import load_image

        image = load_image(args.image)
        mask = load_image(args.mask, "L") if args.mask else None
    elif getattr(args, "mask", None) or getattr(args, "strength", None) is not None:
        raise SdjaxError("--mask and --strength need --image")
    data = run_live(pipe, params, prompts, seed=args.seed, steps=steps, guidance=guidance, height=args.height,
                    width=args.width, attentions=True, settings_extra=settings_extra, image=image, mask=mask,
                    strength=getattr(args, "strength", None), control_image=control_images,
                    control_scale=control.get("controlnet_conditioning_scale", 1.0))
    print("rendering ...", file=sys.stderr)
    files = render(pipe, params, data, args.out, columns=args.columns, completion_steps=args.completion_steps,
                   tokens=tokens)
    if extra_panels is not None:
        files |= extra_panels(pipe, params, data, Path(args.out))
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
    if args.upscaler or args.cascade:
        raise SdjaxError("--upscaler/--cascade need a live run (--prompt TEXT), not --shard")
    if args.image or args.mask or args.strength is not None:
        raise SdjaxError("--image/--mask/--strength and --shard cannot be combined: the shard holds its run")
    if args.controlnet or args.control_image or args.control_scale:
        raise SdjaxError("--controlnet/--control-image/--control-scale need a live run (--prompt TEXT), not --shard")
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
    _live(args, list(DEMO_PROMPTS), "sdjax demo", extra_panels=lambda pipe, params, data, out: _demo_controlnet(
        args, pipe, params, data, out))


def _demo_controlnet(args, pipe, params, data, out: Path) -> dict:
    """The ControlNet panel: the shipped toy ControlNet steering the demo's model with a triangle's silhouette from
    the shapes generator (held-out data, off-centre), for two prompts; its grid (x_t and x̂0 per step) shows the
    control image.
    Only with the toy model (the toy ControlNet fits no other), else a note."""
    import numpy as np

    from ..assets import toy_controlnet_path
    from ..pipelines import FlaxStableDiffusionControlNetPipeline
    from ..pipelines.controlnet import load_controlnets
    from ..train import data as shapes
    from ..viz import run_live
    from ..viz.pictures import describe, render_grid_only

    if args.model is not None:
        print("note: no ControlNet panel: the shipped toy ControlNet is for the toy model (run without --model)",
              file=sys.stderr)
        return {}
    modules, cn_params = load_controlnets([toy_controlnet_path()], dtype=pipe.dtype)
    control_pipe = FlaxStableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=modules)
    g = shapes.shape_geometry(DEMO_SILHOUETTE[0], DEMO_SILHOUETTE[1], control_pipe.default_size)
    silhouette = shapes.render_silhouette(g.shape, g.center, g.radius, control_pipe.default_size)
    control = np.repeat(silhouette[..., None], 3, axis=-1).astype(np.float32) / 255.0
    print(f"sampling the ControlNet panel ({len(DEMO_CONTROL_PROMPTS)} prompts) ...", file=sys.stderr)
    params = {**params, "controlnet": cn_params}
    controlled = run_live(control_pipe, params, list(DEMO_CONTROL_PROMPTS), seed=args.seed,
                          steps=data.settings["steps"], guidance=data.settings["guidance_scale"], control_image=control,
                          settings_extra={"model": data.settings.get("model")})
    # no K-step completion row here (it would compile the ControlNet's DDIM completions too: the demo stays under a
    # minute); `sdjax viz --controlnet PATH --control-image IMG` draws it
    path = render_grid_only(control_pipe, params, controlled, out / "controlnet.png", columns=args.columns,
                            completion_steps=0,
                            title=rf"ControlNet: the toy model steered by a silhouette  ({describe(controlled)})")
    return {"controlnet": path}


def _live_cascade(args, prompts, command, t0, previous, pipe, params, model, steps, guidance, upscaler, tokens):
    """Both stages of a cascade: stage 1's pictures in OUT/ (as `sdjax viz` without an upscaler), the upscaler's
    in OUT/stage2/ (its completions see the same noised low-resolution image and noise level as its run)."""
    from ..viz import render, run_live_cascade

    up, up_params, up_path, up_steps, up_guidance, level = upscaler
    if args.height is not None or args.width is not None:
        print("note: --height/--width ignored in a cascade: stage 1 runs at its model's size", file=sys.stderr)
    print(f"sampling {len(prompts)} prompt(s): {steps} steps, then {up_steps} upscaler steps ...", file=sys.stderr)
    first, second = run_live_cascade(pipe, params, up, up_params, prompts, seed=args.seed, steps=steps,
                                     guidance=guidance, upscaler_steps=up_steps, upscaler_guidance=up_guidance,
                                     noise_level=level, attentions=True, settings_extra={"model": model})
    second.settings["model"] = up_path
    print("rendering ...", file=sys.stderr)
    out = Path(args.out)
    files = render(pipe, params, first, out, columns=args.columns, completion_steps=args.completion_steps,
                   tokens=tokens,
                   title=rf"Stage 1, {first.settings['height']}x{first.settings['width']}: $\hat{{x}}_0$ per step "
                         rf"({pipe.scheduler.name}, {steps} steps, g {guidance:g})")
    stage2 = render(up, up_params, second, out / "stage2", columns=args.columns,
                    completion_steps=args.completion_steps,
                    title=rf"Stage 2, {second.settings['height']}x{second.settings['width']}: $\hat{{x}}_0$ per step "
                          rf"({up.scheduler.name}, {up_steps} steps, g {up_guidance:g}, noise level {level})")
    files |= {f"stage2_{k}": v for k, v in stage2.items()}
    names = [str(Path(f).relative_to(out)) for f in files.values()]
    record_output(out, command, names, previous)
    print(f"wrote to {out.resolve()} in {time.perf_counter() - t0:.1f} s:")
    for path in files.values():
        print(f"  {Path(path).resolve()}")

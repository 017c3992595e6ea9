"""The `sdjax` command: generate, trajectories, viz, demo.

User errors (bad paths, bad arguments, unreadable weights) print one line and exit with status 2;
a traceback means a bug in sdjax.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import SdjaxError, exit_code

SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "lms", "dpm_solver_pp_2m", "heun")


def default_model() -> str:
    from .assets import toy_model_path

    return str(toy_model_path())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-format Stable Diffusion folder or hub repo id (default: the shipped toy model)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling method (default: the model folder's own scheduler)")
    p.add_argument("--steps", type=int, default=None, help="number of inference steps (default: 50; 25 for the toy model)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 7.5; 5 for the toy model)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute and parameter dtype (default: float32)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent compilation cache folder (or set SDJAX_COMPILE_CACHE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="text -> images (PNG) and a JSON of the settings")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt (default: 1)")
    g.add_argument("--out", required=True, help="output folder")
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("trajectories", help="batch-generate denoising trajectories for many prompts (resumable)")
    _add_model_args(t)
    t.add_argument("--prompts", required=True, help="text file, one prompt per line")
    t.add_argument("--batch-size", type=int, default=4, help="prompts per compiled call and per shard (default: 4)")
    t.add_argument("--save-images", action="store_true", help="also write each final image as PNG")
    t.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    t.set_defaults(func=cmd_trajectories)

    try:
        from viz.cli import add_viz_commands
    except ImportError:
        add_viz_commands = None
    if add_viz_commands is not None:
        add_viz_commands(sub, _add_model_args)
    return parser


def load_pipeline(args):
    import jax.numpy as jnp

    from .pipeline_stable_diffusion import FlaxStableDiffusionPipeline

    model = args.model or default_model()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    print(f"loading {model} ...", file=sys.stderr)
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(model, dtype=dtype, scheduler=args.scheduler,
                                                               compile_cache_dir=args.compile_cache)
    toy = args.model is None
    steps = args.steps if args.steps is not None else (25 if toy else 50)
    guidance = args.guidance if args.guidance is not None else (5.0 if toy else 7.5)
    return pipe, params, model, steps, guidance


def cmd_generate(args) -> None:
    import jax
    import numpy as np
    from PIL import Image

    from .models.modeling_utils import atomic_write, write_json

    if args.num_images < 1:
        raise SdjaxError(f"--num-images must be >= 1, got {args.num_images}")
    pipe, params, model, steps, guidance = load_pipeline(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = pipe.prepare_inputs([args.prompt] * args.num_images)
    neg = pipe.prepare_inputs([args.negative_prompt] * args.num_images)
    t0 = time.perf_counter()
    result = pipe(ids, params, jax.random.PRNGKey(args.seed), num_inference_steps=steps, guidance_scale=guidance,
                  height=args.height, width=args.width, neg_prompt_ids=neg, return_trajectory=False)
    images = np.asarray(result.images)
    seconds = time.perf_counter() - t0
    files = []
    for i, img in enumerate(images):
        path = out / f"image-{i:03d}.png"
        atomic_write(path, lambda f, img=img: Image.fromarray(np.round(img * 255).astype(np.uint8)).save(f, format="PNG"))
        files.append(path.name)
    write_json(out / "settings.json", {
        "model": model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": steps,
        "guidance_scale": guidance, "seed": args.seed, "height": images.shape[1], "width": images.shape[2],
        "scheduler": pipe.scheduler.name, "dtype": args.dtype, "num_images": args.num_images, "images": files,
        "seconds_including_compile": round(seconds, 3),
    })
    print(f"wrote {len(files)} image(s) and settings.json to {out}")


def cmd_trajectories(args) -> None:
    from .trajectories import read_prompts, run_trajectories

    prompts = read_prompts(args.prompts)
    pipe, params, model, steps, guidance = load_pipeline(args)
    manifest = run_trajectories(pipe, params, prompts, args.out, batch_size=args.batch_size, steps=steps,
                                guidance_scale=guidance, seed=args.seed, height=args.height, width=args.width,
                                save_images=args.save_images, settings_extra={"model": model, "dtype": args.dtype})
    print(f"{len(manifest['shards'])} shard(s) for {len(prompts)} prompts in {args.out} (manifest.json)")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return exit_code(lambda: args.func(args), f"sdjax {args.command}")


if __name__ == "__main__":
    sys.exit(main())

"""`sdjax generate` and `sdjax trajectories`, and the model options every sampling command shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import SdjaxError
from .args import add_distributed_args, finite_float, init_distributed, positive_int, seed

SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "lms", "dpm_solver_pp_2m", "heun")
DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-format Stable Diffusion folder or hub repo id (default: the shipped toy model)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling method (default: the model folder's own scheduler)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="number of inference steps (default: 50; 25 for the toy model)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: 7.5; 5 for the toy model)")
    p.add_argument("--seed", type=seed, default=0, help="random seed; sample i uses seed + i (default: 0)")
    p.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and parameter dtype (default: float32)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache folder (or set JAX_COMPILATION_CACHE_DIR)")


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="text -> images (PNG) and a JSON of the settings")
    add_model_args(g)
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    g.add_argument("--num-images", type=positive_int, default=1, help="images to generate for the prompt (default: 1)")
    add_upscaler_args(g)
    add_out_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("trajectories", help="batch-generate denoising trajectories for many prompts (resumable)")
    add_model_args(t)
    t.add_argument("--prompts", required=True, help="text file, one prompt per line")
    t.add_argument("--batch-size", type=positive_int, default=4,
                   help="prompts per compiled call and per shard (default: 4)")
    t.add_argument("--save-images", action="store_true", help="also write each final image as PNG")
    add_out_args(t, "output folder (rerun the same command to resume)")
    add_distributed_args(t)
    t.set_defaults(func=cmd_trajectories)


def add_upscaler_args(p: argparse.ArgumentParser) -> None:
    """A second stage: an upscaler run on the model's images (a cascade, each stage its own compiled program)."""
    u = p.add_mutually_exclusive_group()
    u.add_argument("--upscaler", default=None, metavar="PATH",
                   help="diffusers-format upscaler folder or hub repo id (StableDiffusionUpscalePipeline): upscale "
                        "the images with it, writing both stages' images (default: none)")
    u.add_argument("--cascade", action="store_true",
                   help="the shipped toy upscaler (32x32 -> 64x64), for the toy model: text -> 32x32 -> 64x64")
    p.add_argument("--upscaler-steps", type=positive_int, default=None,
                   help="the upscaler's inference steps (default: 25 for the toy upscaler, 75 otherwise)")
    p.add_argument("--upscaler-guidance", type=finite_float, default=None,
                   help="the upscaler's guidance scale (default: 1 for the toy upscaler, 9 otherwise)")
    p.add_argument("--noise-level", type=int, default=None,
                   help="noise added to the low-resolution images before upscaling, 0 .. the upscaler's "
                        "max_noise_level (default: 100 for the toy upscaler, 20 otherwise, as diffusers)")


def load_upscaler(args, dtype_name: str):
    """(upscaler pipeline, params, path, steps, guidance, noise level) of --upscaler / --cascade, or None."""
    if not (args.upscaler or args.cascade):
        for flag in ("upscaler_steps", "upscaler_guidance", "noise_level"):
            if getattr(args, flag) is not None:
                raise SdjaxError(f"--{flag.replace('_', '-')} needs --upscaler PATH or --cascade")
        return None
    import jax.numpy as jnp

    from ..assets import TOY_UPSCALER, TOY_UPSCALER_SETTINGS, toy_upscaler_path
    from ..pipelines import FlaxStableDiffusionUpscalePipeline

    path = str(toy_upscaler_path()) if args.cascade else args.upscaler
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype_name]
    print(f"loading {path} ...", file=sys.stderr)
    up, params = FlaxStableDiffusionUpscalePipeline.from_pretrained(path, dtype=dtype)
    toy = args.cascade or Path(path).resolve() == TOY_UPSCALER.resolve()
    steps = args.upscaler_steps if args.upscaler_steps is not None else (TOY_UPSCALER_SETTINGS["steps"] if toy else 75)
    guidance = args.upscaler_guidance if args.upscaler_guidance is not None else (
        TOY_UPSCALER_SETTINGS["guidance"] if toy else 9.0)
    level = args.noise_level if args.noise_level is not None else (TOY_UPSCALER_SETTINGS["noise_level"] if toy else 20)
    up.check_noise_level(level, (1,))
    up.check_steps(steps)
    return up, params, path, steps, guidance, level


def add_out_args(p: argparse.ArgumentParser, help: str = "output folder", required: bool = True, default=None) -> None:
    p.add_argument("--out", required=required, default=default, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it is a non-empty folder that sdjax did not write")


def default_model() -> str:
    from ..assets import toy_model_path

    return str(toy_model_path())


def load_pipeline(args, pipeline_cls=None):
    """(pipeline, params, model name, steps, guidance) from the shared model options."""
    import jax.numpy as jnp

    from ..compilation import enable_compile_cache
    from ..pipelines import FlaxStableDiffusionPipeline

    pipeline_cls = pipeline_cls or FlaxStableDiffusionPipeline
    if args.compile_cache:
        enable_compile_cache(args.compile_cache)
    model = args.model or default_model()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    print(f"loading {model} ...", file=sys.stderr)
    pipe, params = pipeline_cls.from_pretrained(model, dtype=dtype, scheduler=args.scheduler)
    toy = args.model is None
    steps = args.steps if args.steps is not None else (25 if toy else 50)
    guidance = args.guidance if args.guidance is not None else (5.0 if toy else 7.5)
    return pipe, params, model, steps, guidance


def cmd_generate(args) -> None:
    import numpy as np

    from ..io import check_output_dir, record_output, write_json, write_png
    from ..seeds import initial_noise, loop_key, sample_seeds

    previous = check_output_dir(args.out, "sdjax generate", overwrite=args.overwrite)
    upscaler = load_upscaler(args, args.dtype)
    pipe, params, model, steps, guidance = load_pipeline(args)
    if upscaler is not None:
        return _generate_cascade(args, previous, pipe, params, model, steps, guidance, upscaler)
    out = Path(args.out)
    ids = pipe.prepare_inputs([args.prompt] * args.num_images)
    neg = pipe.prepare_inputs([args.negative_prompt] * args.num_images)
    height = pipe.default_size if args.height is None else args.height
    width = pipe.default_size if args.width is None else args.width
    pipe.check_inputs(height, width, steps, args.num_images)
    # image i starts from the noise of seed + i: the same image as `sdjax viz` / `sdjax trajectories` give
    latents = initial_noise(sample_seeds(args.seed, range(args.num_images)), pipe.latent_shape(1, height, width)[1:])
    t0 = time.perf_counter()
    result = pipe(ids, params, loop_key(args.seed), num_inference_steps=steps, guidance_scale=guidance,
                  height=height, width=width, latents=latents, neg_prompt_ids=neg, return_trajectory=False)
    images = np.asarray(result.images)
    seconds = time.perf_counter() - t0
    files = []
    for i, img in enumerate(images):
        path = out / f"image-{i:03d}.png"
        write_png(path, img)
        files.append(path.name)
    write_json(out / "settings.json", {
        "model": model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": steps,
        "guidance_scale": guidance, "seed": args.seed, "height": images.shape[1], "width": images.shape[2],
        "scheduler": pipe.scheduler.name, "dtype": args.dtype, "num_images": args.num_images, "images": files,
        "seconds_including_compile": round(seconds, 3),
    })
    record_output(out, "sdjax generate", files + ["settings.json"], previous)
    print(f"wrote {len(files)} image(s) and settings.json to {out}")


def cmd_trajectories(args) -> None:
    from ..io import check_output_dir
    from ..trajectories import LOCK, MANIFEST, read_prompts, run_trajectories

    import jax

    from ..distributed import local_mesh

    init_distributed(args)
    prompts, lines = read_prompts(args.prompts)
    check_output_dir(args.out, "sdjax trajectories", overwrite=args.overwrite, own_files=(MANIFEST, LOCK))
    pipe, params, model, steps, guidance = load_pipeline(args)
    # each batch split over this process's devices when it divides evenly
    n_local = jax.local_device_count()
    mesh = local_mesh() if n_local > 1 and args.batch_size % n_local == 0 else None
    manifest = run_trajectories(pipe, params, prompts, args.out, batch_size=args.batch_size, steps=steps,
                                guidance_scale=guidance, seed=args.seed, height=args.height, width=args.width,
                                save_images=args.save_images, settings_extra={"model": model, "dtype": args.dtype},
                                prompt_lines=lines, overwrite=args.overwrite, mesh=mesh)
    if jax.process_index() != 0:
        return
    n_batches = -(-len(prompts) // args.batch_size)
    if manifest.get("stopped"):
        print(f"stopped (SIGTERM) with {len(manifest['shards'])} of {n_batches} shard(s) complete in {args.out}; "
              "rerun the same command to resume")
    else:
        print(f"{len(manifest['shards'])} shard(s) for {len(prompts)} prompts in {args.out} (manifest.json)")


def _generate_cascade(args, previous, pipe, params, model, steps, guidance, upscaler) -> None:
    """text -> the model's images (stage1-NNN.png) -> the upscaler's (image-NNN.png): two compiled programs."""
    import numpy as np

    from ..io import record_output, write_json, write_png
    from ..pipelines.cascade import run_cascade

    up, up_params, up_path, up_steps, up_guidance, level = upscaler
    out = Path(args.out)
    height = pipe.default_size if args.height is None else args.height
    width = pipe.default_size if args.width is None else args.width
    t0 = time.perf_counter()
    result = run_cascade(pipe, params, up, up_params, [args.prompt] * args.num_images,
                         negative_prompt=args.negative_prompt, seed=args.seed, steps=steps, guidance=guidance,
                         upscaler_steps=up_steps, upscaler_guidance=up_guidance, noise_level=level, height=height,
                         width=width)
    low, images = np.asarray(result.low_res), np.asarray(result.images)
    seconds = time.perf_counter() - t0
    files = []
    for i, (a, b) in enumerate(zip(low, images)):
        for name, img in ((f"stage1-{i:03d}.png", a), (f"image-{i:03d}.png", b)):
            write_png(out / name, img)
            files.append(name)
    write_json(out / "settings.json", {
        "model": model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": steps,
        "guidance_scale": guidance, "seed": args.seed, "height": images.shape[1], "width": images.shape[2],
        "scheduler": pipe.scheduler.name, "dtype": args.dtype, "num_images": args.num_images,
        "images": [f for f in files if f.startswith("image-")],
        "stage1": {"height": low.shape[1], "width": low.shape[2], "images": [f for f in files if f.startswith("stage1-")]},
        "upscaler": {"model": up_path, "steps": up_steps, "guidance_scale": up_guidance, "noise_level": level,
                     "scheduler": up.scheduler.name},
        "seconds_including_compile": round(seconds, 3),
    })
    record_output(out, "sdjax generate", files + ["settings.json"], previous)
    print(f"wrote {args.num_images} stage-1 image(s) ({low.shape[1]}x{low.shape[2]}, stage1-*.png), their upscaled "
          f"version(s) ({images.shape[1]}x{images.shape[2]}, image-*.png) and settings.json to {out}")

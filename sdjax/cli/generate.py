"""`sdjax generate` and `sdjax trajectories`, and the model options every sampling command shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import add_distributed_args, finite_float, init_distributed, positive_int, seed

SCHEDULER_NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "lms", "dpm_solver_pp_2m", "heun")
DTYPES = ("float32", "bfloat16", "float16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-format Stable Diffusion 1.x/2.x or SDXL folder, or hub repo id; the pipeline is picked "
                        "from its model_index.json (default: the shipped toy model)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling method (default: the model folder's own scheduler)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="number of inference steps (default: 50; 25 for the toy model)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: 7.5; 5.0 for SDXL and the toy model)")
    p.add_argument("--seed", type=seed, default=0, help="random seed; sample i uses seed + i (default: 0)")
    p.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's: 512 for SD 1.x, 1024 for SDXL)")
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


def add_out_args(p: argparse.ArgumentParser, help: str = "output folder", required: bool = True, default=None) -> None:
    p.add_argument("--out", required=required, default=default, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it is a non-empty folder that sdjax did not write")


def default_model() -> str:
    from ..assets import toy_model_path

    return str(toy_model_path())


def load_pipeline(args, task: str = "text2img"):
    """(pipeline, params, model name, steps, guidance) from the shared model options. The class is the one of the
    folder's family (model_index.json: Stable Diffusion 1.x/2.x or SDXL) for `task` ("text2img", "img2img",
    "inpaint", "merge"); a task the family lacks is a ConfigError naming what it has."""
    import jax.numpy as jnp

    from ..compilation import enable_compile_cache
    from ..pipelines.auto import pipeline_class

    if args.compile_cache:
        enable_compile_cache(args.compile_cache)
    model = args.model or default_model()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    pipeline_cls = pipeline_class(model, task=task)
    print(f"loading {model} ...", file=sys.stderr)
    pipe, params = pipeline_cls.from_pretrained(model, dtype=dtype, scheduler=args.scheduler)
    toy = args.model is None
    steps = args.steps if args.steps is not None else (25 if toy else 50)
    # diffusers' defaults: 7.5 for Stable Diffusion, 5.0 for SDXL
    default_guidance = 5.0 if toy else getattr(pipe, "default_guidance_scale", 7.5)
    guidance = args.guidance if args.guidance is not None else default_guidance
    return pipe, params, model, steps, guidance


def negative_ids(pipe, negative_prompt: str, n: int):
    """The negative prompt's ids, or None for an empty one: the pipeline's own unconditional embeddings (the empty
    prompt's; SDXL with force_zeros_for_empty_prompt: zeros, as diffusers without a negative prompt)."""
    return pipe.prepare_inputs([negative_prompt] * n) if negative_prompt else None


def cmd_generate(args) -> None:
    import numpy as np

    from ..io import check_output_dir, record_output, write_json, write_png
    from ..seeds import initial_noise, loop_key, sample_seeds

    previous = check_output_dir(args.out, "sdjax generate", overwrite=args.overwrite)
    pipe, params, model, steps, guidance = load_pipeline(args)
    out = Path(args.out)
    ids = pipe.prepare_inputs([args.prompt] * args.num_images)
    neg = negative_ids(pipe, args.negative_prompt, args.num_images)
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

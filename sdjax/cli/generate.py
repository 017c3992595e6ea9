"""`sdjax generate` and `sdjax trajectories`, and the model options every sampling command shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import finite_float, positive_int, seed

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
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", type=lora_arg,
                   help="a LoRA to apply (diffusers/PEFT or Kohya/A1111 .safetensors, a folder holding "
                        "pytorch_lora_weights.safetensors, or a hub repo id), at SCALE (default 1.0); repeat "
                        "for several at once")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]", type=embedding_arg,
                   help="a textual-inversion embedding (diffusers learned_embeds.safetensors, A1111 or SDXL "
                        ".safetensors): its token (default: the file's own, else the file name as <name>) can "
                        "then be used in prompts; repeat for several")


def lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale). A PATH that exists (or has no `:NUMBER` suffix) is taken whole."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path or Path(text).exists():
        return text, 1.0
    try:
        value = finite_float(scale)
    except argparse.ArgumentTypeError:
        return text, 1.0  # a path with a colon in it; the loader says if it does not exist
    return path, value


def embedding_arg(text: str) -> tuple[str, str | None]:
    """`PATH[:TOKEN]` -> (path, token or None). A PATH that exists is taken whole."""
    path, sep, token = text.rpartition(":")
    if not sep or not path or not token or Path(text).exists() or "/" in token:
        return text, None
    return path, token


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
    t.set_defaults(func=cmd_trajectories)


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
    pipe, params = load_adapters(pipe, params, getattr(args, "lora", []), getattr(args, "embedding", []))
    toy = args.model is None
    steps = args.steps if args.steps is not None else (25 if toy else 50)
    guidance = args.guidance if args.guidance is not None else (5.0 if toy else 7.5)
    return pipe, params, model, steps, guidance


def load_adapters(pipe, params, loras, embeddings):
    """--lora and --embedding: (pipe, params) with the LoRAs (adapter names lora_0, lora_1, ..., at their scales,
    traced) and the embeddings' tokens loaded."""
    for i, (path, scale) in enumerate(loras):
        print(f"loading LoRA {path} (scale {scale:g}) ...", file=sys.stderr)
        params = pipe.load_lora_weights(path, params, adapter_name=f"lora_{i}")
        params = pipe.set_lora_scale(params, {f"lora_{i}": scale})
    for path, token in embeddings:
        print(f"loading embedding {path} ...", file=sys.stderr)
        pipe, params = pipe.load_textual_inversion(path, params, token=token)
    return pipe, params


def adapter_settings(args) -> dict:
    """What settings.json records of --lora / --embedding (nothing when neither is given)."""
    out = {}
    if getattr(args, "lora", None):
        out["loras"] = [{"path": p, "scale": s} for p, s in args.lora]
    if getattr(args, "embedding", None):
        out["embeddings"] = [{"path": p, "token": t} for p, t in args.embedding]
    return out


def cmd_generate(args) -> None:
    import numpy as np

    from ..io import check_output_dir, record_output, write_json, write_png
    from ..seeds import initial_noise, loop_key, sample_seeds

    previous = check_output_dir(args.out, "sdjax generate", overwrite=args.overwrite)
    pipe, params, model, steps, guidance = load_pipeline(args)
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
        "seconds_including_compile": round(seconds, 3), **adapter_settings(args),
    })
    record_output(out, "sdjax generate", files + ["settings.json"], previous)
    print(f"wrote {len(files)} image(s) and settings.json to {out}")


def cmd_trajectories(args) -> None:
    from ..io import check_output_dir
    from ..trajectories import LOCK, MANIFEST, read_prompts, run_trajectories

    prompts, lines = read_prompts(args.prompts)
    check_output_dir(args.out, "sdjax trajectories", overwrite=args.overwrite, own_files=(MANIFEST, LOCK))
    pipe, params, model, steps, guidance = load_pipeline(args)
    manifest = run_trajectories(pipe, params, prompts, args.out, batch_size=args.batch_size, steps=steps,
                                guidance_scale=guidance, seed=args.seed, height=args.height, width=args.width,
                                save_images=args.save_images, settings_extra={"model": model, "dtype": args.dtype,
                                                                **adapter_settings(args)},
                                prompt_lines=lines, overwrite=args.overwrite)
    print(f"{len(manifest['shards'])} shard(s) for {len(prompts)} prompts in {args.out} (manifest.json)")

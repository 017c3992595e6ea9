"""`sdjax generate` and `sdjax trajectories`, and the model options every sampling command shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import add_distributed_args, finite_float, init_distributed, labels, positive_int, seed

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
    g.add_argument("--labels", type=labels, default=None, metavar="HEAD=LABEL,...",
                   help="classifier guidance toward these labels, e.g. color=red,shape=square (with --prompt \"\": "
                        "classifier guidance alone)")
    g.add_argument("--classifier", default=None, metavar="PATH",
                   help="the noise-conditional classifier for --labels (default for the toy model: the shipped "
                        "sdjax/assets/toy-shapes-classifier)")
    g.add_argument("--classifier-scale", type=finite_float, default=None,
                   help="classifier guidance scale s (default: 6)")
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


def load_classifier(args):
    """(path, classifier, its params, label indices [num_images, heads]) for --labels, or None; checked before
    anything is written (an unknown head or label is one line naming it)."""
    from ..errors import SdjaxError

    if args.labels is None:
        for given, option in ((args.classifier, "--classifier"), (args.classifier_scale, "--classifier-scale")):
            if given is not None:
                raise SdjaxError(f"{option} needs --labels HEAD=LABEL,... (e.g. --labels color=red)")
        return None
    from ..assets import toy_classifier_path
    from ..models.noise_classifier import NoiseClassifier

    if args.classifier is None and args.model is not None:
        raise SdjaxError("--labels needs --classifier PATH (a noise-conditional classifier trained for this model)")
    path = args.classifier or str(toy_classifier_path())
    classifier, clf_params = NoiseClassifier.from_pretrained(path)
    return path, classifier, clf_params, classifier.label_indices(args.labels, batch=args.num_images)


def cmd_generate(args) -> None:
    import numpy as np

    from ..io import check_output_dir, record_output, write_json, write_png
    from ..seeds import initial_noise, loop_key, sample_seeds

    guide = load_classifier(args)
    previous = check_output_dir(args.out, "sdjax generate", overwrite=args.overwrite)
    pipe, params, model, steps, guidance = load_pipeline(args)
    call_extra, settings_extra = {}, {}
    if guide is not None:
        from ..pipelines.classifier_guidance import DEFAULT_CLASSIFIER_SCALE
        from ..pipelines.classifier_guidance import FlaxStableDiffusionClassifierGuidedPipeline as Guided

        path, classifier, clf_params, label_ids = guide
        pipe, params = Guided.from_pipe(pipe, classifier=classifier), {**params, "classifier": clf_params}
        scale = DEFAULT_CLASSIFIER_SCALE if args.classifier_scale is None else args.classifier_scale
        call_extra = {"labels": label_ids, "classifier_scale": scale}
        settings_extra = {"classifier": path, "labels": classifier.label_dict(label_ids[0]), "classifier_scale": scale}
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
                  height=height, width=width, latents=latents, neg_prompt_ids=neg, return_trajectory=False, **call_extra)
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
        "seconds_including_compile": round(seconds, 3), **settings_extra,
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

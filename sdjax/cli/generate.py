"""`sdjax generate` and `sdjax trajectories`, and the model options every sampling command shares."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError, SdjaxError
from .args import add_distributed_args, finite_float, init_distributed, labels, positive_int, seed

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


def add_controlnet_args(p: argparse.ArgumentParser):
    """--controlnet, --control-image, --control-scale (repeatable); returns their argument group."""
    c = p.add_argument_group("ControlNet (repeat --controlnet/--control-image for several ControlNets, in order)")
    c.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a diffusers ControlNet folder or hub repo id (e.g. sdjax/assets/toy-shapes-controlnet)")
    c.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="its control image (PNG/JPEG, e.g. a white silhouette on black); the output has its size, "
                        "or --height/--width (it is then resized with Lanczos, as diffusers does)")
    c.add_argument("--control-scale", action="append", type=finite_float, default=[], metavar="S",
                   help="controlnet_conditioning_scale: one for all, or one per ControlNet (default: 1)")
    return c


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="text -> images (PNG) and a JSON of the settings")
    add_model_args(g)
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    g.add_argument("--num-images", type=positive_int, default=1, help="images to generate for the prompt (default: 1)")
    c = add_controlnet_args(g)
    c.add_argument("--control-start", action="append", type=finite_float, default=[], metavar="F",
                   help="control_guidance_start: the fraction of the steps before the ControlNet acts (default: 0)")
    c.add_argument("--control-end", action="append", type=finite_float, default=[], metavar="F",
                   help="control_guidance_end: the fraction of the steps after which it stops (default: 1)")
    c.add_argument("--guess-mode", action="store_true",
                   help="the ControlNets steer only the prompt's half of classifier-free guidance (diffusers' guess mode)")
    add_upscaler_args(g)
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
    up, params = FlaxStableDiffusionUpscalePipeline.from_pretrained(path, dtype=dtype, vae_encoder=False)
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


def load_pipeline(args, task: str = "text2img", pipeline_cls=None, abstract: bool = False, **load):
    """(pipeline, params, model name, steps, guidance) from the shared model options. The class is the one of the
    folder's family (model_index.json: Stable Diffusion 1.x/2.x or SDXL) for `task` ("text2img", "img2img",
    "inpaint", "merge"), or `pipeline_cls`; a task the family lacks is a ConfigError naming what it has.
    `load`: more from_pretrained arguments (e.g. controlnet=). abstract: configs only, params as shapes (to
    compile before loading: `pipe.lower`); no adapters then."""
    import jax.numpy as jnp

    from ..compilation import enable_compile_cache
    from ..pipelines.auto import pipeline_class

    if args.compile_cache:
        enable_compile_cache(args.compile_cache)
    model = args.model or default_model()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    pipeline_cls = pipeline_cls or pipeline_class(model, task=task)
    print(f"{'reading the configs of' if abstract else 'loading'} {model} ...", file=sys.stderr)
    # Only what the calls read: a pipeline that never encodes images leaves the VAE's encoder unread.
    pipe, params = pipeline_cls.from_pretrained(model, dtype=dtype, scheduler=args.scheduler, abstract=abstract,
                                                vae_encoder=pipeline_cls.encodes_images, **load)
    if not abstract:
        pipe, params = load_adapters(pipe, params, getattr(args, "lora", []), getattr(args, "embedding", []))
    return pipe, params, model, *call_defaults(args, pipe)


def call_defaults(args, pipe) -> tuple[int, float]:
    """(steps, guidance): the options', or the defaults (the toy model's 25 / 5.0, else 50 / the family's)."""
    toy = args.model is None
    steps = args.steps if args.steps is not None else (25 if toy else 50)
    # diffusers' defaults: 7.5 for Stable Diffusion, 5.0 for SDXL
    default_guidance = 5.0 if toy else getattr(pipe, "default_guidance_scale", 7.5)
    guidance = args.guidance if args.guidance is not None else default_guidance
    return steps, guidance


def negative_ids(pipe, negative_prompt: str, n: int):
    """The negative prompt's ids, or None for an empty one: the pipeline's own unconditional embeddings (the empty
    prompt's; SDXL with force_zeros_for_empty_prompt: zeros, as diffusers without a negative prompt)."""
    return pipe.prepare_inputs([negative_prompt] * n) if negative_prompt else None


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


def load_adapters(pipe, params, loras, embeddings):
    """--lora and --embedding: (pipe, params) with the LoRAs (adapter names lora_0, lora_1, ..., at their scales,
    traced) and the embeddings' tokens loaded."""
    for i, (path, scale) in enumerate(loras):
        print(f"loading LoRA {path} (scale {scale:g}) ...", file=sys.stderr)
        params = pipe.load_lora_weights(path, params, adapter_name=f"lora_{i}")
    if loras:  # all of them active, each at its own scale (loading makes only the last one active)
        params = pipe.set_adapters(params, [f"lora_{i}" for i in range(len(loras))], [s for _, s in loras])
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

    from ..io import check_output_dir, record_output, release_free_host_memory, write_json, write_png

    control = check_control_args(args)
    guide = load_classifier(args)
    if control and guide is not None:
        raise InputError("--controlnet with --labels (classifier guidance) is not supported")
    previous = check_output_dir(args.out, "sdjax generate", overwrite=args.overwrite)
    upscaler = load_upscaler(args, args.dtype)
    if (control or guide is not None) and upscaler is not None:
        raise InputError("--controlnet or --labels with --upscaler/--cascade is not supported: run sdjax upscale "
                         "on the images")
    load = {}
    if control:
        from ..pipelines import FlaxStableDiffusionControlNetPipeline

        load = dict(pipeline_cls=FlaxStableDiffusionControlNetPipeline, controlnet=list(args.controlnet))
    if upscaler is not None:
        pipe, params, model, steps, guidance = load_pipeline(args, **load)
        return _generate_cascade(args, previous, pipe, params, model, steps, guidance, upscaler)
    # The program is compiled from the configs before the weights are read, so that XLA's compile working memory
    # and the weights are never in host memory together (BENCHMARKS.md). LoRAs and embeddings change the params
    # (and the tokenizer): with them, the weights come first.
    compile_first = not (getattr(args, "lora", None) or getattr(args, "embedding", None))
    pipe, params, model, steps, guidance = load_pipeline(args, abstract=compile_first, **load)
    if compile_first:
        print("compiling ...", file=sys.stderr)
        _generate_call(args, pipe, params, steps, guidance, guide, control, lower=True)[0].compile()
        release_free_host_memory()  # LLVM's working memory, before the weights arrive
        pipe, params, model, steps, guidance = load_pipeline(args, **load)
    t0 = time.perf_counter()
    result, settings_extra = _generate_call(args, pipe, params, steps, guidance, guide, control)
    images = np.asarray(result.images)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    files = []
    for i, img in enumerate(images):
        path = out / f"image-{i:03d}.png"
        write_png(path, img)
        files.append(path.name)
    write_json(out / "settings.json", {
        "model": model, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": steps,
        "guidance_scale": guidance, "seed": args.seed, "height": images.shape[1], "width": images.shape[2],
        "scheduler": pipe.scheduler.name, "dtype": args.dtype, "num_images": args.num_images, "images": files,
        "seconds_including_compile": round(seconds, 3), **settings_extra, **adapter_settings(args),
    } | ({"controlnet": list(args.controlnet), "control_image": list(args.control_image), **control} if control
         else {}))
    record_output(out, "sdjax generate", files + ["settings.json"], previous)
    print(f"wrote {len(files)} image(s) and settings.json to {out}")


def _generate_call(args, pipe, params, steps, guidance, guide, control, lower: bool = False):
    """`sdjax generate`'s pipeline call: (the output, what settings.json adds), or with lower=True (the call's
    program lowered, `pipe.lower`; params may be abstract, None)."""
    from ..seeds import initial_noise, loop_key, sample_seeds

    call_extra, settings_extra = {}, {}
    if guide is not None:
        from ..pipelines.classifier_guidance import DEFAULT_CLASSIFIER_SCALE
        from ..pipelines.classifier_guidance import FlaxStableDiffusionClassifierGuidedPipeline as Guided

        path, classifier, clf_params, label_ids = guide
        pipe, params = Guided.from_pipe(pipe, classifier=classifier), {**params, "classifier": clf_params}
        scale = DEFAULT_CLASSIFIER_SCALE if args.classifier_scale is None else args.classifier_scale
        call_extra = {"labels": label_ids, "classifier_scale": scale}
        settings_extra = {"classifier": path, "labels": classifier.label_dict(label_ids[0]), "classifier_scale": scale}
    ids = pipe.prepare_inputs([args.prompt] * args.num_images)
    neg = negative_ids(pipe, args.negative_prompt, args.num_images)
    if control:  # the output has the control image's size (--height/--width resize it)
        control_images = control_inputs(pipe, args)
        height, width = control_images[0].shape[-2:]
        call_extra = {**control}
        ids = (ids, control_images)
    else:
        height = pipe.default_size if args.height is None else args.height
        width = pipe.default_size if args.width is None else args.width
        ids = (ids,)
    pipe.check_inputs(height, width, steps, args.num_images)
    # image i starts from the noise of seed + i: the same image as `sdjax viz` / `sdjax trajectories` give
    latents = initial_noise(sample_seeds(args.seed, range(args.num_images)), pipe.latent_shape(1, height, width)[1:])
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, latents=latents,
              neg_prompt_ids=neg, return_trajectory=False, **call_extra)
    return (pipe.lower if lower else pipe)(*ids, params, loop_key(args.seed), **kw), settings_extra


def check_control_args(args) -> dict:
    """The ControlNet options, checked before anything loads: {} without --controlnet, else the call's
    controlnet_conditioning_scale / control_guidance_start / control_guidance_end / guess_mode."""
    from ..errors import InputError

    k = len(args.controlnet)
    # sdjax viz takes --controlnet, --control-image and --control-scale only
    starts, ends = getattr(args, "control_start", []), getattr(args, "control_end", [])
    guess_mode = getattr(args, "guess_mode", False)
    if not k:
        given = [f for f, v in (("--control-image", args.control_image), ("--control-scale", args.control_scale),
                                ("--control-start", starts), ("--control-end", ends), ("--guess-mode", guess_mode))
                 if v]
        if given:
            raise InputError(f"{given[0]} needs --controlnet PATH (a diffusers ControlNet folder)")
        return {}
    if len(args.control_image) != k:
        raise InputError(f"{len(args.control_image)} --control-image for {k} --controlnet: give one control image per "
                         "ControlNet, in the same order")
    call = {"guess_mode": bool(guess_mode)}
    for flag, values, key, default in (("--control-scale", args.control_scale, "controlnet_conditioning_scale", 1.0),
                                       ("--control-start", starts, "control_guidance_start", 0.0),
                                       ("--control-end", ends, "control_guidance_end", 1.0)):
        if len(values) not in (0, 1, k):
            raise InputError(f"{len(values)} {flag} for {k} --controlnet: give one for all, or one per ControlNet")
        values = values or [default]
        call[key] = values[0] if len(values) == 1 else list(values)
    return call


def control_inputs(pipe, args) -> list:
    """The control images as the pipeline takes them: [1, 3, H, W] each (one for all images), of one size."""
    from ..errors import InputError
    from ..images import load_image

    images = [load_image(path, "RGB") for path in args.control_image]
    if args.height is None and args.width is None:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise InputError(f"the control images have different sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})"
                             ": give --width/--height to resize them to one")
        multiple = pipe.size_multiple()
        w, h = images[0].size
        if w % multiple or h % multiple:
            raise InputError(f"--control-image {args.control_image[0]} is {w}x{h}; this model needs sizes that are "
                             f"multiples of {multiple}: give --width/--height to resize it")
    height = args.height or images[0].size[1]
    width = args.width or images[0].size[0]
    return [pipe.prepare_image_inputs(im, height=height, width=width) for im in images]


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
                                save_images=args.save_images, settings_extra={"model": model, "dtype": args.dtype,
                                                                **adapter_settings(args)},
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

"""`sdjax img2img`, `sdjax inpaint`, `sdjax merge`, `sdjax upscale`: image-conditioned generation from the command
line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import SdjaxError
from .args import finite_float, positive_int, seed, unit_interval
from .generate import DTYPES, SCHEDULER_NAMES, add_model_args, add_out_args, load_pipeline, negative_ids

EXAMPLES = {
    "img2img": "example:\n  sdjax img2img --image photo.png --prompt \"a blue square on a black background\" "
               "--strength 0.6 --out edited/",
    "inpaint": "example:\n  sdjax inpaint --image photo.png --mask mask.png --prompt \"a red circle\" --out inpainted/\n"
               "(white in the mask = repaint, black = keep)",
    "merge": "examples:\n  sdjax merge --image a.png --image b.png --weights 0.3,0.7 --out merged/\n"
             "  sdjax merge --image a.png --image b.png --series 8 --prompt \"\" --out series/   "
             "# weights 0 .. 1: strip.png, merge.gif",
    "upscale": "examples:\n  sdjax upscale --image small.png --prompt \"a red circle on a white background\" --out big/   "
               "# the toy upscaler, 32x32 -> 64x64 (not shipped yet: docs/cascade.md)\n"
               "  sdjax upscale --model stabilityai/stable-diffusion-x4-upscaler --image cat.png --prompt \"a cat\" "
               "--out big/\n(sample i uses seed + i, as stage 2 of `sdjax generate --cascade`: upscaling its "
               "stage1-000.png with the same seed redoes its image-000.png)",
}


def add_commands(sub) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    i = sub.add_parser("img2img", help="image + text -> image: denoise the image from a strength",
                       epilog=EXAMPLES["img2img"], formatter_class=formatter)
    add_model_args(i)
    i.add_argument("--image", required=True, help="the image to start from (PNG/JPEG; resized to --height/--width if given)")
    _add_common(i, strength_default=0.8)
    i.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="repaint the white region of a mask, keep the rest",
                       epilog=EXAMPLES["inpaint"], formatter_class=formatter)
    add_model_args(p)
    p.add_argument("--image", required=True, help="the image (PNG/JPEG)")
    p.add_argument("--mask", required=True, help="the mask, same size: white = repaint, black = keep")
    _add_common(p, strength_default=1.0)
    p.set_defaults(func=cmd_inpaint)

    m = sub.add_parser("merge", help="merge two or more images (their latents) and denoise the mix",
                       epilog=EXAMPLES["merge"], formatter_class=formatter)
    add_model_args(m)
    m.add_argument("--image", action="append", required=True, help="an image to merge (give two or more)")
    m.add_argument("--weights", default=None, help="comma-separated weights, one per image (default: equal)")
    m.add_argument("--interpolation", choices=("slerp", "linear"), default="slerp",
                   help="how latents combine (default: slerp; linear shrinks their norm, see docs/merging.md)")
    m.add_argument("--series", type=positive_int, default=None, metavar="N",
                   help="two images: N merges with the weight of the second going 0 .. 1 (strip.png, merge.gif)")
    _add_common(m, strength_default=0.8, prompt_required=False)
    m.set_defaults(func=cmd_merge)

    u = sub.add_parser("upscale", help="low-resolution image + text -> an image the upscaler's factor larger",
                       epilog=EXAMPLES["upscale"], formatter_class=formatter)
    u.add_argument("--model", default=None,
                   help="diffusers-format upscaler folder or hub repo id (StableDiffusionUpscalePipeline; default: "
                        "the shipped toy upscaler, 32x32 -> 64x64)")
    u.add_argument("--image", required=True, help="the low-resolution image (PNG/JPEG); its size x the factor is "
                                                  "the output's")
    u.add_argument("--prompt", default="", help="what the image shows (default: none)")
    u.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    u.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampling method (default: the folder's own scheduler)")
    u.add_argument("--steps", type=positive_int, default=None,
                   help="inference steps (default: 25 for the toy upscaler, 75 otherwise)")
    u.add_argument("--guidance", type=finite_float, default=None,
                   help="guidance scale (default: 1 for the toy upscaler, 9 otherwise)")
    u.add_argument("--noise-level", type=int, default=None,
                   help="noise added to the image first, 0 .. the folder's max_noise_level (default: 100 for the toy "
                        "upscaler, 20 otherwise); more: more invented detail, less fidelity to the input")
    u.add_argument("--num-images", type=positive_int, default=1, help="images (default: 1; image i: seed + i)")
    u.add_argument("--seed", type=seed, default=0, help="random seed; sample i uses seed + i (default: 0)")
    u.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and parameter dtype (default: float32)")
    add_out_args(u)
    u.set_defaults(func=cmd_upscale)


def _add_common(p, strength_default: float, prompt_required: bool = True) -> None:
    p.add_argument("--prompt", required=prompt_required, default="", help="the text prompt" +
                   ("" if prompt_required else " (default: none)"))
    p.add_argument("--negative-prompt", default="", help="what the image should not show (default: none)")
    p.add_argument("--strength", type=unit_interval, default=strength_default,
                   help=f"how much of the schedule to run, in (0, 1] (default: {strength_default})")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per input (default: 1; image i: seed + i)")
    add_out_args(p)


def _read_images(args, paths: list[str], mode: str = "RGB"):
    from ..images import load_image

    images = [load_image(path, mode) for path in paths]
    sizes = {im.size for im in images}
    if args.width or args.height:  # resize to the asked size (Lanczos), as diffusers' image processor does
        from PIL import Image

        size = (args.width or images[0].size[0], args.height or images[0].size[1])
        images = [im.resize(size, Image.NEAREST if mode == "L" else Image.LANCZOS) for im in images]
    elif len(sizes) > 1:
        raise SdjaxError(f"the images have different sizes ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}): "
                         "give --width/--height to resize them to one")
    return images


def _check_size(pipe, args, images, what: str = "--image") -> None:
    """The input's size must suit the model (before anything runs); --width/--height resize it."""
    width, height = images[0].size
    multiple = pipe.size_multiple()
    if width % multiple or height % multiple:
        raise SdjaxError(f"{what} is {width}x{height}; this model needs sizes that are multiples of {multiple}: "
                         f"give --width/--height (e.g. {max(multiple, width // multiple * multiple)}) to resize it")


def _start(args, task: str):
    from ..io import check_output_dir

    previous = check_output_dir(args.out, f"sdjax {args.command}", overwrite=args.overwrite)
    pipe, params, model, steps, guidance = load_pipeline(args, task)
    return previous, pipe, params, model, steps, guidance


def _noise(pipe, seed: int, n: int, height: int, width: int):
    from ..seeds import initial_noise, sample_seeds

    return initial_noise(sample_seeds(seed, range(n)), pipe.latent_shape(1, height, width)[1:])


def _finish(args, pipe, images, files_prefix, settings: dict, previous, t0, extra_files=()):
    import numpy as np

    from ..io import record_output, write_json, write_png

    out = Path(args.out)
    files = []
    for i, img in enumerate(np.asarray(images)):
        name = f"{files_prefix}-{i:03d}.png"
        write_png(out / name, img)
        files.append(name)
    write_json(out / "settings.json", settings | {"scheduler": pipe.scheduler.name, "dtype": args.dtype,
                                                  "images": files,
                                                  "seconds_including_compile": round(time.perf_counter() - t0, 3)})
    record_output(out, f"sdjax {args.command}", files + list(extra_files) + ["settings.json"], previous)
    print(f"wrote {len(files)} image(s) and settings.json to {out}")


def cmd_img2img(args) -> None:
    from ..seeds import loop_key

    images = _read_images(args, [args.image])
    previous, pipe, params, model, steps, guidance = _start(args, "img2img")
    _check_size(pipe, args, images)
    n = args.num_images
    ids, image = pipe.prepare_inputs([args.prompt] * n, images)
    height, width = image.shape[-2:]
    pipe.check_inputs(height, width, steps, n)
    t0 = time.perf_counter()
    out = pipe(ids, image, params, loop_key(args.seed), strength=args.strength, num_inference_steps=steps,
               guidance_scale=guidance, neg_prompt_ids=negative_ids(pipe, args.negative_prompt, n),
               noise=_noise(pipe, args.seed, n, height, width), return_trajectory=False)
    _finish(args, pipe, out.images, "image", {
        "model": model, "image": str(args.image), "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "strength": args.strength, "steps": steps, "guidance_scale": guidance, "seed": args.seed,
        "height": int(height), "width": int(width), "num_images": n}, previous, t0)


def cmd_inpaint(args) -> None:
    from ..seeds import loop_key

    images = _read_images(args, [args.image])
    masks = _read_images(args, [args.mask], mode="L")
    if masks[0].size != images[0].size:
        raise SdjaxError(f"--mask is {masks[0].size[0]}x{masks[0].size[1]}, --image {images[0].size[0]}x"
                         f"{images[0].size[1]}: they must have one size")
    previous, pipe, params, model, steps, guidance = _start(args, "inpaint")
    _check_size(pipe, args, images)
    n = args.num_images
    ids, masked, mask = pipe.prepare_inputs([args.prompt] * n, images * n, masks * n)
    height, width = masked.shape[-2:]
    pipe.check_inputs(height, width, steps, n)
    t0 = time.perf_counter()
    out = pipe(ids, mask, masked, params, loop_key(args.seed), num_inference_steps=steps, guidance_scale=guidance,
               neg_prompt_ids=negative_ids(pipe, args.negative_prompt, n), strength=args.strength,
               image=pipe.prepare_images(images * n), noise=_noise(pipe, args.seed, n, height, width),
               return_trajectory=False)
    _finish(args, pipe, out.images, "image", {
        "model": model, "image": str(args.image), "mask": str(args.mask), "prompt": args.prompt,
        "negative_prompt": args.negative_prompt, "strength": args.strength, "steps": steps,
        "guidance_scale": guidance, "seed": args.seed, "height": int(height), "width": int(width),
        "num_images": n, "unet_in_channels": pipe.unet.in_channels}, previous, t0)


def _weights(args, k: int) -> list[list[float]]:
    """The weight vectors to run: one (--weights), or a series from image 1 to image 2."""
    if args.series is not None:
        if k != 2:
            raise SdjaxError(f"--series merges two images, {k} were given")
        if args.weights is not None:
            raise SdjaxError("--series and --weights cannot be combined: the series sets the weights")
        n = args.series
        return [[1 - j / max(n - 1, 1), j / max(n - 1, 1)] for j in range(n)]
    if args.weights is None:
        return [[1.0 / k] * k]
    try:
        weights = [finite_float(w) for w in args.weights.split(",")]
    except argparse.ArgumentTypeError as e:
        raise SdjaxError(f"--weights: {e}") from None
    if len(weights) != k:
        raise SdjaxError(f"--weights has {len(weights)} numbers for {k} images")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SdjaxError(f"--weights must be >= 0 and not all 0, got {args.weights}")
    return [weights]


def cmd_merge(args) -> None:
    import numpy as np

    from ..seeds import loop_key

    if len(args.image) < 2:
        raise SdjaxError("--image: give two or more images to merge")
    weight_sets = _weights(args, len(args.image))
    images = _read_images(args, args.image)
    previous, pipe, params, model, steps, guidance = _start(args, "merge")
    _check_size(pipe, args, images)
    n = args.num_images
    ids, stack = pipe.prepare_inputs([args.prompt] * n, images)
    height, width = stack.shape[-2:]
    pipe.check_inputs(height, width, steps, n)
    neg = negative_ids(pipe, args.negative_prompt, n)
    noise = _noise(pipe, args.seed, n, height, width)
    t0 = time.perf_counter()
    results = []
    for weights in weight_sets:  # every weight vector: the same compiled program
        out = pipe(ids, stack, weights, params, loop_key(args.seed), strength=args.strength,
                   interpolation=args.interpolation, num_inference_steps=steps, guidance_scale=guidance,
                   neg_prompt_ids=neg, noise=noise, return_trajectory=False)
        results.append(np.asarray(out.images))
    settings = {"model": model, "images_merged": [str(p) for p in args.image], "weights": weight_sets,
                "interpolation": args.interpolation, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
                "strength": args.strength, "steps": steps, "guidance_scale": guidance, "seed": args.seed,
                "height": int(height), "width": int(width), "num_images": n}
    if args.series is None:
        return _finish(args, pipe, results[0], "image", settings, previous, t0)
    series = np.stack(results)  # [S, n, H, W, 3]
    extra = _write_series(Path(args.out), series, [np.asarray(im, np.float32) / 255.0 for im in images])
    _finish(args, pipe, series.reshape((-1,) + series.shape[2:]), "series", settings, previous, t0, extra)


def _write_series(out: Path, series, originals) -> list[str]:
    """strip.png (the inputs at both ends, the merges between) and merge.gif (there and back)."""
    import numpy as np

    from ..io import atomic_write, to_uint8, write_png

    rows = []
    for k in range(series.shape[1]):
        cells = [originals[0]] + list(series[:, k]) + [originals[1]]
        gap = np.ones((cells[0].shape[0], 4, 3), np.float32)
        rows.append(np.concatenate(sum(([c, gap] for c in cells), [])[:-1], axis=1))
    write_png(out / "strip.png", np.concatenate(rows, axis=0))
    frames = [to_uint8(f) for f in list(series[:, 0]) + list(series[::-1, 0])]
    from PIL import Image

    pil = [Image.fromarray(f).resize((f.shape[1] * 4, f.shape[0] * 4), Image.NEAREST) for f in frames]
    atomic_write(out / "merge.gif", lambda f: pil[0].save(f, format="GIF", save_all=True, append_images=pil[1:],
                                                          duration=200, loop=0))
    return ["strip.png", "merge.gif"]


def cmd_upscale(args) -> None:
    import jax.numpy as jnp
    import numpy as np

    from ..assets import TOY_UPSCALER_SETTINGS, toy_upscaler_path
    from ..io import check_output_dir
    from ..pipelines import FlaxStableDiffusionUpscalePipeline
    from ..pipelines.cascade import upscale
    from ..seeds import sample_seeds

    from ..images import load_image

    image = np.asarray(load_image(args.image), np.float32) / 255.0
    previous = check_output_dir(args.out, "sdjax upscale", overwrite=args.overwrite)
    toy = args.model is None
    model = str(toy_upscaler_path()) if toy else args.model
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    print(f"loading {model} ...", file=sys.stderr)
    pipe, params = FlaxStableDiffusionUpscalePipeline.from_pretrained(model, dtype=dtype, scheduler=args.scheduler,
                                                                      vae_encoder=False)
    steps = pipe.check_steps(args.steps if args.steps is not None else (TOY_UPSCALER_SETTINGS["steps"] if toy else 75))
    guidance = args.guidance if args.guidance is not None else (TOY_UPSCALER_SETTINGS["guidance"] if toy else 9.0)
    level = args.noise_level if args.noise_level is not None else (TOY_UPSCALER_SETTINGS["noise_level"] if toy else 20)
    pipe.check_noise_level(level, (1,))
    h, w = image.shape[:2]
    pipe._low_res_size(np.zeros((1, 3, h, w)), jit=False)  # the image's size suits the UNet, before anything runs
    n = args.num_images
    t0 = time.perf_counter()
    out, _ = upscale(pipe, params, [args.prompt] * n, np.repeat(image[None], n, axis=0), sample_seeds(args.seed, range(n)),
                     negative_prompt=args.negative_prompt, seed=args.seed, steps=steps, guidance=guidance,
                     noise_level=level)
    f = pipe.vae_scale_factor
    _finish(args, pipe, out.images, "image", {
        "model": model, "image": str(args.image), "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "noise_level": level, "steps": steps, "guidance_scale": guidance, "seed": args.seed, "height": h * f,
        "width": w * f, "num_images": n}, previous, t0)

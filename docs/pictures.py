"""Regenerate the README's pictures of image-conditioned generation from the shipped toy model:

    python docs/pictures.py --out docs/images

edits.png     the input, `sdjax img2img` (strength 0.6) and `sdjax inpaint` with the mask, as README.md shows them
merging.png   `sdjax merge --series 7`: linear and slerp at strength 0.5 and 0.7, two seeds each (docs/merging.md)
merging_norms.json   docs/merging.md's table: norm of the mix / weighted mean of the norms, linear and slerp

Every call is the one the documented command makes (sdjax/cli/edit.py): the toy model's defaults (its own DDIM
scheduler, 25 steps, guidance 5), sample i starting from the noise of seed 0 + i, the sampler's key loop_key(0),
no negative prompt. Weights, strength, noise and keys are traced, so one compiled program serves a whole series.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import sdjax
from sdjax.assets import toy_model_path
from sdjax.compilation import tune_cpu_compiler
from sdjax.errors import SdjaxError
from sdjax.images import load_image
from sdjax.io import atomic_write, check_output_dir, to_uint8, write_json
from sdjax.pipelines.image_to_image import combine_latents
from sdjax.seeds import initial_noise, loop_key, sample_seeds

REPO = Path(__file__).resolve().parent.parent
INPUTS = REPO / "docs" / "images" / "inputs"
STEPS, GUIDANCE, SEED = 25, 5.0, 0  # `sdjax img2img/inpaint/merge` with the toy model and no --steps/--guidance/--seed
NUM_IMAGES = 2  # --num-images 2: seeds 0 and 1

IMG2IMG = {"prompt": "a blue square on a black background", "strength": 0.6}
INPAINT = {"prompt": "a red square on a gray background", "strength": 1.0}  # `sdjax inpaint`'s default strength
MERGE_ROWS = [("linear", 0.5), ("linear", 0.7), ("slerp", 0.5), ("slerp", 0.7)]  # (interpolation, strength)
SERIES = 7  # --series 7: weight of image B 0, 1/6, ..., 1
NORM_WEIGHTS = (0.25, 0.5)
OUTPUTS = ("edits.png", "merging.png", "merging_norms.json")  # what --out receives


# ---------------------------------------------------------------------------------------------- running the model
def noise(pipe, height: int, width: int) -> np.ndarray:
    """The noise the CLI adds for --num-images 2 --seed 0: sample i from seed 0 + i."""
    return initial_noise(sample_seeds(SEED, range(NUM_IMAGES)), pipe.latent_shape(1, height, width)[1:])


def run_edits(img2img, inpaint, params, image, mask, bar) -> dict[str, np.ndarray]:
    """`sdjax img2img ... --strength 0.6 --num-images 2` and `sdjax inpaint ... --num-images 2`: [2, H, W, 3] each."""
    ids, start = img2img.prepare_inputs([IMG2IMG["prompt"]] * NUM_IMAGES, [image])
    height, width = start.shape[-2:]
    out = img2img(ids, start, params, loop_key(SEED), strength=IMG2IMG["strength"], num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, noise=noise(img2img, height, width), return_trajectory=False)
    edited = np.asarray(out.images)
    bar.update()

    ids, masked, masks = inpaint.prepare_inputs([INPAINT["prompt"]] * NUM_IMAGES, [image] * NUM_IMAGES,
                                                [mask] * NUM_IMAGES)
    out = inpaint(ids, masks, masked, params, loop_key(SEED), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  strength=INPAINT["strength"], image=inpaint.prepare_images([image] * NUM_IMAGES),
                  noise=noise(inpaint, height, width), return_trajectory=False)
    bar.update()
    return {"img2img": edited, "inpaint": np.asarray(out.images)}


def series_weights() -> list[list[float]]:
    """--series 7 over two images: [1 - j/6, j/6] for j = 0 .. 6 (sdjax/cli/edit.py's _weights)."""
    return [[1 - j / (SERIES - 1), j / (SERIES - 1)] for j in range(SERIES)]


def run_merges(merge, params, image_a, image_b, bar) -> dict[tuple[str, float], np.ndarray]:
    """`sdjax merge --image A --image B --series 7 --strength S --interpolation I --prompt "" --num-images 2`:
    (I, S) -> [7 weights, 2 seeds, H, W, 3]. One compiled program per interpolation (a static setting);
    strengths and weights are traced."""
    ids, stack = merge.prepare_inputs([""] * NUM_IMAGES, [image_a, image_b])
    height, width = stack.shape[-2:]
    eps = noise(merge, height, width)
    results = {}
    for interpolation, strength in MERGE_ROWS:
        row = []
        for weights in series_weights():
            out = merge(ids, stack, weights, params, loop_key(SEED), strength=strength, interpolation=interpolation,
                        num_inference_steps=STEPS, guidance_scale=GUIDANCE, noise=eps, return_trajectory=False)
            row.append(np.asarray(out.images))
            bar.update()
        results[interpolation, strength] = np.stack(row)
    return results


# ---------------------------------------------------------------------------------------------- the norms table
def norm_ratios(a, b) -> dict:
    """|mix| / ((1 - w)|a| + w|b|) for linear and slerp at each weight w of b, and cos(a, b); a, b: [1, C, h, w]."""
    na, nb = float(jnp.linalg.norm(a)), float(jnp.linalg.norm(b))
    rows = []
    for w in NORM_WEIGHTS:
        weights = jnp.asarray([[1.0 - w, w]])
        row = {"weight_of_b": w}
        for interpolation in ("linear", "slerp"):
            mix = combine_latents([a, b], weights, interpolation)  # the merge pipeline's own mix
            row[interpolation] = round(float(jnp.linalg.norm(mix)) / ((1 - w) * na + w * nb), 4)
        rows.append(row)
    cos = float(jnp.vdot(a.ravel(), b.ravel())) / (na * nb)
    return {"cos": round(cos, 4), "norm_a": round(na, 4), "norm_b": round(nb, 4), "ratios": rows}


def norms_table(merge, params, image_a, image_b) -> dict:
    """(a) the two example images' latents: the VAE posterior means, scaled as the pipeline scales them
    (merge.encode_images with sample_posterior=False; the pipeline itself draws from the posterior by default);
    (b) two standard normal latents of the same shape (seeds 0 and 1)."""
    _, stack = merge.prepare_inputs([""], [image_a, image_b])
    encode = jax.jit(lambda p, x: merge.encode_images(p, x, jax.random.PRNGKey(0), sample_posterior=False))
    z = encode(params, jnp.asarray(stack))  # [2, C, h, w]
    noise_ab = jnp.asarray(initial_noise([0, 1], z.shape[1:]))
    return {"model": shown(toy_model_path()), "measure": "norm of the mix / weighted mean of the norms",
            "latent_shape": list(z.shape[1:]),
            "image_latents": {"images": [shown(INPUTS / "triangle.png"), shown(INPUTS / "circle.png")],
                              "latents": "VAE posterior means x scaling_factor",
                              **norm_ratios(z[:1], z[1:])},
            "noise_latents": {"seeds": [0, 1], **norm_ratios(noise_ab[:1], noise_ab[1:])}}


def shown(path) -> str:
    """A path as the JSON records it: relative to the checkout when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---------------------------------------------------------------------------------------------- drawing
def show(ax, image, cmap=None) -> None:
    ax.imshow(image, cmap=cmap, vmin=0, vmax=255 if cmap else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save(fig, path: Path) -> None:
    """The figure as a PNG, written to a temp file beside `path` and renamed over it (sdjax.io.atomic_write)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, facecolor="white"))
    print(f"wrote {path}")


def draw_edits(image, mask, edits, path: Path) -> None:
    img2img, inpaint = to_uint8(edits["img2img"]), to_uint8(edits["inpaint"])
    panels = [(np.asarray(image), None, "input"),
              (img2img[0], None, f"img2img {IMG2IMG['strength']}:\n'{IMG2IMG['prompt']}'"),
              (img2img[1], None, ""),
              (np.asarray(mask), "gray", "mask (white = repaint)"),
              (inpaint[0], None, f"inpaint:\n'{INPAINT['prompt']}'"),
              (inpaint[1], None, "")]
    fig = Figure(figsize=(1.4 * len(panels), 1.9))
    axes = fig.subplots(1, len(panels))
    for ax, (picture, cmap, title) in zip(axes, panels):
        show(ax, picture, cmap)
        ax.set_title(title, loc="left", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.75, wspace=0.08)
    save(fig, path)


def draw_merging(image_a, image_b, merges, path: Path) -> None:
    """4 groups (interpolation, strength) of 2 rows (seeds); columns: image A, the 7 merges, image B."""
    columns = ["image A", "0"] + [f"{j}/{SERIES - 1}" for j in range(1, SERIES - 1)] + ["1", "image B"]
    rows_per_group, groups = NUM_IMAGES, len(MERGE_ROWS)
    heights = []  # image rows, with a thin spacer between groups
    for g in range(groups):
        heights += [1.0] * rows_per_group + ([0.18] if g < groups - 1 else [])
    fig = Figure(figsize=(1.1 * len(columns) + 1.6, 1.1 * sum(heights) + 0.7))
    grid = fig.add_gridspec(len(heights), len(columns), height_ratios=heights, left=0.15, right=0.99, bottom=0.01,
                            top=0.92, wspace=0.05, hspace=0.05)
    for g, (interpolation, strength) in enumerate(MERGE_ROWS):
        series = merges[interpolation, strength]  # [weights, seeds, H, W, 3]
        for k in range(rows_per_group):
            r = g * (rows_per_group + 1) + k
            cells = [np.asarray(image_a)] + [to_uint8(series[j, k]) for j in range(SERIES)] + [np.asarray(image_b)]
            for c, cell in enumerate(cells):
                ax = fig.add_subplot(grid[r, c])
                show(ax, cell)
                if r == 0:
                    ax.set_title(columns[c], fontsize=9)
                if c == 0:
                    ax.set_ylabel(f"seed {SEED + k}", fontsize=8)
        top = grid[g * (rows_per_group + 1), 0].get_position(fig)
        bottom = grid[g * (rows_per_group + 1) + rows_per_group - 1, 0].get_position(fig)
        fig.text(0.01, (top.y1 + bottom.y0) / 2, f"{interpolation},\nstrength {strength}", fontsize=10,
                 va="center", ha="left")
    fig.suptitle("merging image A and image B: weight of image B (empty prompt, DDIM 25 steps, guidance 5)",
                 fontsize=10, x=0.57, y=0.985)
    save(fig, path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example, the table only:\n  python docs/pictures.py --out /tmp/pics --only norms")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for edits.png, merging.png and merging_norms.json (created if missing; a "
                             "non-empty folder must already hold them, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder anyway")
    parser.add_argument("--only", choices=("edits", "merging", "norms"), action="append",
                        help="make only this (repeatable; default: all three)")
    args = parser.parse_args(argv)
    try:  # the CLI's own output check: a file, an unwritable folder, or someone else's non-empty folder is refused
        check_output_dir(args.out, "docs/pictures.py", overwrite=args.overwrite, own_files=OUTPUTS)
    except SdjaxError as e:
        parser.error(f"--out: {e}")
    for name in ("triangle.png", "circle.png", "mask.png"):
        if not (INPUTS / name).is_file():
            parser.error(f"the input picture {INPUTS / name} is missing (run from a checkout of sdjax)")
    args.only = set(args.only or ("edits", "merging", "norms"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_cpu_compiler()  # the XLA:CPU flags the `sdjax` command sets, before JAX starts: the CLI's numbers
    t0 = time.perf_counter()
    triangle, circle = load_image(INPUTS / "triangle.png"), load_image(INPUTS / "circle.png")
    mask = load_image(INPUTS / "mask.png", mode="L")

    print(f"loading {toy_model_path()} ...", file=sys.stderr)
    img2img, params = sdjax.FlaxStableDiffusionImg2ImgPipeline.from_pretrained(toy_model_path())
    inpaint = sdjax.FlaxStableDiffusionInpaintPipeline.from_pipe(img2img)  # the same modules and params
    merge = sdjax.FlaxStableDiffusionMergePipeline.from_pipe(img2img)

    if "norms" in args.only:
        table = norms_table(merge, params, triangle, circle)
        write_json(args.out / "merging_norms.json", table)
        for what in ("image_latents", "noise_latents"):
            t = table[what]
            print(f"{what} (cos {t['cos']:.2f}): " + ", ".join(
                f"w={r['weight_of_b']}: linear {r['linear']:.2f}, slerp {r['slerp']:.2f}" for r in t["ratios"]))
        print(f"wrote {args.out / 'merging_norms.json'}")

    calls = 2 * ("edits" in args.only) + len(MERGE_ROWS) * SERIES * ("merging" in args.only)
    with sdjax.show_progress(), tqdm(total=calls, desc="pipeline calls", unit="call") as bar:
        edits = run_edits(img2img, inpaint, params, triangle, mask, bar) if "edits" in args.only else None
        merges = run_merges(merge, params, triangle, circle, bar) if "merging" in args.only else None
    if edits is not None:
        draw_edits(triangle, mask, edits, args.out / "edits.png")
    if merges is not None:
        draw_merging(triangle, circle, merges, args.out / "merging.png")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

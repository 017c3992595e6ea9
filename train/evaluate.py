"""Score a text-to-image model (or a cascade: the model, then an upscaler; or the model steered by a silhouette
ControlNet) on "shapes" with a classifier trained on real images.

    sdjax train evaluate --model sdjax/assets/toy-shapes --guidance 5 --out runs/eval
    sdjax train evaluate --cascade --noise-level 0 100 250 --out runs/eval_cascade   # text -> 32x32 -> 64x64
    sdjax train evaluate --controlnet --per-caption 2 --out runs/eval_controlnet   # the toy ControlNet, with/without

1. A small Flax CNN learns (color, shape, background) from real "shapes" images (trained once, saved in
   --classifier-dir); its held-out accuracy is reported: it should be >= 98% before its scores are trusted.
2. The model generates `per_caption` images for each of the 54 captions (6 colors x 3 shapes x 3 backgrounds).
3. Color / shape / background accuracy: how often the classifier reads back what the caption asked for.
   FD: the Frechet distance between the classifier's penultimate features of generated and real images
   (an FID with a domain-specific feature extractor); FD between two real sets is given as the floor.
A ControlNet (`evaluate_controlnet`) is also scored by how well the generated shape covers its held-out control
silhouette (IoU), with and without it.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from sdjax.io import atomic_write, write_json, write_png
from sdjax.pipelines import FlaxStableDiffusionPipeline, FlaxStableDiffusionUpscalePipeline

from . import data as data_lib

logger = logging.getLogger(__name__)
HEADS = (("color", len(data_lib.COLORS)), ("shape", len(data_lib.SHAPES)), ("background", len(data_lib.BACKGROUNDS)))


def heads(num_shapes: int = len(data_lib.SHAPES), num_colors: int = len(data_lib.COLORS)):
    """The classifier's heads; the shape / color head has one class per ALL_SHAPES / ALL_COLOR_NAMES entry it was
    trained on."""
    sizes = {"shape": num_shapes, "color": num_colors}
    return tuple((name, sizes.get(name, n)) for name, n in HEADS)


class ShapesClassifier(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> (features [B, 128], {head: logits}).

    num_shapes, num_colors: 3 and 6 (SHAPES, COLORS: the shipped evaluation), or more when extended with
    NEW_SHAPES or NEW_COLORS (`extra`)."""

    num_shapes: int = len(data_lib.SHAPES)
    num_colors: int = len(data_lib.COLORS)

    @nn.compact
    def __call__(self, x):
        for c, s in ((32, 1), (64, 2), (128, 2)):
            x = nn.relu(nn.Conv(c, (3, 3), strides=s)(x))
        x = nn.relu(nn.Conv(128, (3, 3))(x))
        feats = nn.relu(nn.Dense(128)(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], -1)))
        return feats, {name: nn.Dense(n, name=name)(feats) for name, n in heads(self.num_shapes, self.num_colors)}


def _float(images_uint8):
    return jnp.asarray(images_uint8, jnp.float32) / 255.0


def _classifier_optimizer(steps: int):
    return optax.adam(optax.cosine_decay_schedule(2e-3, steps))


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _classifier_step(steps: int, params, opt, x, y, key, num_shapes: int = len(data_lib.SHAPES),
                     num_colors: int = len(data_lib.COLORS)):
    # a little pixel noise, so generated images' small artifacts do not confuse it
    x = x + 0.03 * jax.random.normal(key, x.shape)

    def loss_fn(p):
        _, logits = ShapesClassifier(num_shapes, num_colors).apply({"params": p}, x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[name], y[:, i]).mean()
                   for i, (name, _) in enumerate(HEADS))

    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = _classifier_optimizer(steps).update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss


# concept_dataset indices for the extended classifier's new-concept images (apart from the shapes images it trains on)
EXTRA_CONCEPTS_START = 1_000_000


def class_counts(extra=()) -> tuple[int, int]:
    """(num_shapes, num_colors) of the classifier that also tells the `extra` concepts (CONCEPTS names) apart."""
    shapes = [len(data_lib.SHAPES) - 1] + [data_lib.ALL_SHAPES.index(n) for n in extra if n in data_lib.ALL_SHAPES]
    colors = [len(data_lib.COLORS) - 1] + [data_lib.ALL_COLOR_NAMES.index(n) for n in extra
                                           if n in data_lib.ALL_COLORS]
    return 1 + max(shapes), 1 + max(colors)


def train_classifier(image_size=32, n_train=12000, steps=600, batch_size=128, seed=0, extra=()):
    """Train on shapes (data seed 1: images the LDM never saw). Returns params.

    extra: CONCEPTS names (new shapes, new colours) to recognise too (their labels follow the old ones in
    ALL_SHAPES' / ALL_COLOR_NAMES' order): as many images of each as of each old shape (n_train / 3) or colour
    (n_train / 6) join the training set, and the steps grow in proportion. Without them the classifier is the
    shipped evaluation's, trained exactly as before."""
    ds = data_lib.shapes_dataset(n_train, seed=1, image_size=image_size)
    images, labels = ds.images, ds.labels
    if extra:
        sets = [data_lib.concept_dataset(
            name, n_train // len(data_lib.SHAPES if name in data_lib.ALL_SHAPES else data_lib.COLORS), seed=1,
            image_size=image_size, start=EXTRA_CONCEPTS_START) for name in extra]
        images = np.concatenate([images] + [e.images for e in sets])
        labels = np.concatenate([labels] + [e.labels for e in sets])
        steps = steps * len(images) // len(ds)
    num_shapes, num_colors = class_counts(extra)
    params = ShapesClassifier(num_shapes, num_colors).init(jax.random.PRNGKey(seed),
                                                           jnp.zeros((1, image_size, image_size, 3)))["params"]
    opt = _classifier_optimizer(steps).init(params)
    for s in range(steps):
        idx = data_lib.batch_indices(len(images), batch_size, 1, s)
        params, opt, loss = _classifier_step(steps, params, opt, _float(images[idx]), jnp.asarray(labels[idx]),
                                             jax.random.PRNGKey(s), num_shapes, num_colors)
    return params


def num_shapes_of(params) -> int:
    return int(params["shape"]["kernel"].shape[-1])


def num_colors_of(params) -> int:
    return int(params["color"]["kernel"].shape[-1])


@jax.jit
def _classify(params, x):
    return ShapesClassifier(num_shapes_of(params), num_colors_of(params)).apply({"params": params}, x)


def predict(params, images_uint8, batch_size=256):
    """(features [N, 128], {head: predicted index [N]})."""
    feats, preds = [], {name: [] for name, _ in HEADS}
    for i in range(0, len(images_uint8), batch_size):
        f, logits = _classify(params, _float(images_uint8[i:i + batch_size]))
        feats.append(np.asarray(f))
        for name in preds:
            preds[name].append(np.asarray(jnp.argmax(logits[name], -1)))
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


def accuracies(preds, labels) -> dict:
    return {name: float(np.mean(preds[name] == labels[:, i])) for i, (name, _) in enumerate(HEADS)}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as FID computes it."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular when features outnumber images; FID ignores that too
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = np.real(linalg.sqrtm(sa @ sb))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def load_or_train_classifier(folder, image_size=32, extra=()):
    """The cached classifier in `folder` (trained there on first use). extra: the extended one, which also tells
    these CONCEPTS apart (its own file, e.g. classifier_32+orange.msgpack; the shipped evaluation's is untouched)."""
    folder = Path(folder)
    extra = tuple(extra)
    unknown = [n for n in extra if n not in data_lib.CONCEPTS]
    if unknown:
        raise data_lib.DataError(f"extra {unknown}: not new concepts (new shapes and colours: "
                                 f"{', '.join(data_lib.CONCEPTS)})")
    suffix = "".join(f"+{n}" for n in extra)
    path = folder / f"classifier_{image_size}{suffix}.msgpack"
    template = ShapesClassifier(*class_counts(extra)).init(jax.random.PRNGKey(0),
                                                           jnp.zeros((1, image_size, image_size, 3)))["params"]
    if path.is_file():
        return serialization.from_bytes(template, path.read_bytes())
    params = train_classifier(image_size, extra=extra)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(serialization.to_bytes(params)))  # never half a cached classifier
    return params


def generate(pipe, params, captions, seed=0, guidance=5.0, steps=25, batch_size=54):
    images = []
    for i in range(0, len(captions), batch_size):
        ids = pipe.prepare_inputs(list(captions[i:i + batch_size]))
        out = pipe(ids, params, jax.random.PRNGKey(seed + i), num_inference_steps=steps, guidance_scale=guidance,
                   jit=False)
        images.append(np.round(np.asarray(out.images) * 255).astype(np.uint8))
    return np.concatenate(images)


def save_grid(images, path, cols=18):
    """Full rows of `cols` images (one row of all of them when fewer)."""
    if not len(images):
        raise ValueError(f"no images to save in {path}")
    cols = min(cols, len(images))
    n = len(images) // cols * cols
    rows = [np.concatenate(list(images[r * cols:(r + 1) * cols]), axis=1) for r in range(n // cols)]
    write_png(path, np.concatenate(rows, axis=0))


def evaluate(model_path, classifier_dir="runs/shapes_classifier", guidance=5.0, steps=25, per_caption=4,
             seed=0, n_real=1000, out_dir=None, scheduler=None) -> dict:
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(model_path, scheduler=scheduler)
    size = pipe.default_size
    clf = load_or_train_classifier(classifier_dir, size)
    real = data_lib.shapes_dataset(n_real, seed=0, image_size=size, start=data_lib.HELD_OUT_START)
    real2 = data_lib.shapes_dataset(per_caption * 54, seed=2, image_size=size, start=data_lib.HELD_OUT_START)
    real_feats, real_preds = predict(clf, real.images)
    result = {"classifier_held_out_accuracy": accuracies(real_preds, real.labels)}

    combos = [combo for combo, _ in data_lib.all_shape_captions()] * per_caption
    labels = np.array(combos)
    captions = [data_lib.caption_for(*c) for c in combos]
    t0 = time.time()
    gen = generate(pipe, params, captions, seed=seed, guidance=guidance, steps=steps)
    result["generation_seconds"] = time.time() - t0
    gen_feats, gen_preds = predict(clf, gen)
    result["adherence"] = accuracies(gen_preds, labels)
    result["fd_generated_vs_real"] = frechet_distance(gen_feats, real_feats)
    result["fd_real_vs_real"] = frechet_distance(predict(clf, real2.images)[0], real_feats)
    result |= {"model": str(model_path), "guidance": guidance, "steps": steps, "images": len(gen),
               "scheduler": type(pipe.scheduler).__name__}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(gen[:54 * min(per_caption, 2)], out / f"samples_g{guidance:g}.png")
        write_json(out / f"eval_g{guidance:g}.json", result)
    return result


# ------------------------------------------------------------------------------------------------ cascades
def bicubic(images_uint8: np.ndarray, size: int) -> np.ndarray:
    """Plain bicubic upsampling (PIL) of [N, h, w, 3] uint8 to [N, size, size, 3]: the baseline of an upscaler."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images_uint8])


def _scores(clf, images, labels, real_feats) -> dict:
    feats, preds = predict(clf, images)
    return {"adherence": accuracies(preds, labels), "fd_vs_real": frechet_distance(feats, real_feats)}


def evaluate_cascade(model_path, upscaler_path, classifier_dir="runs/shapes_classifier", guidance=5.0, steps=25,
                     per_caption=4, seed=0, upscaler_steps=25, upscaler_guidance=1.0, noise_levels=(100,),
                     n_real=1000, out_dir=None) -> dict:
    """Stage 1 at its own size, plain bicubic upsampling of its images, and the cascade at each noise level: color /
    shape / background adherence read by the classifier of each size and FD against real images of that size.

    Stage 1 is `evaluate`'s run (same seeds); its uint8 images are the upscaler's input (as PNGs would be)."""
    from sdjax.pipelines.cascade import upscale

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(model_path)
    up, up_params = FlaxStableDiffusionUpscalePipeline.from_pretrained(upscaler_path)
    low, high = pipe.default_size, pipe.default_size * up.vae_scale_factor
    clf_low = load_or_train_classifier(classifier_dir, low)
    clf_high = load_or_train_classifier(classifier_dir, high)
    real = {s: data_lib.shapes_dataset(n_real, seed=0, image_size=s, start=data_lib.HELD_OUT_START) for s in (low, high)}
    real2 = {s: data_lib.shapes_dataset(per_caption * 54, seed=2, image_size=s, start=data_lib.HELD_OUT_START)
             for s in (low, high)}
    feats = {}
    result = {"classifier_held_out_accuracy": {}, "fd_real_vs_real": {}}
    for s, clf in ((low, clf_low), (high, clf_high)):
        feats[s], preds = predict(clf, real[s].images)
        result["classifier_held_out_accuracy"][str(s)] = accuracies(preds, real[s].labels)
        result["fd_real_vs_real"][str(s)] = frechet_distance(predict(clf, real2[s].images)[0], feats[s])

    combos = [combo for combo, _ in data_lib.all_shape_captions()] * per_caption
    labels = np.array(combos)
    captions = [data_lib.caption_for(*c) for c in combos]
    t0 = time.time()
    stage1 = generate(pipe, params, captions, seed=seed, guidance=guidance, steps=steps)
    result["stage1_seconds"] = time.time() - t0
    rows = {f"stage 1 ({low}x{low})": _scores(clf_low, stage1, labels, feats[low])}
    upsampled = bicubic(stage1, high)
    rows[f"bicubic ({high}x{high})"] = _scores(clf_high, upsampled, labels, feats[high])
    cascades = {}
    for level in noise_levels:
        t0 = time.time()
        images = []
        for i in range(0, len(captions), 54):
            batch = captions[i:i + 54]
            out, _ = upscale(up, up_params, batch, stage1[i:i + 54].astype(np.float32) / 255.0,
                             [seed + j for j in range(i, i + len(batch))], seed=seed + i, steps=upscaler_steps,
                             guidance=upscaler_guidance, noise_level=level)
            images.append(np.round(np.asarray(out.images) * 255).astype(np.uint8))
        cascades[level] = np.concatenate(images)
        name = f"cascade ({high}x{high}), noise level {level}"
        rows[name] = _scores(clf_high, cascades[level], labels, feats[high]) | {"seconds": time.time() - t0}
    result |= {"rows": rows, "model": str(model_path), "upscaler": str(upscaler_path), "guidance": guidance,
               "steps": steps, "upscaler_steps": upscaler_steps, "upscaler_guidance": upscaler_guidance,
               "noise_levels": list(noise_levels), "images": len(captions),
               "upscaler_scheduler": type(up.scheduler).__name__}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"g{guidance:g}_ug{upscaler_guidance:g}"
        write_json(out / f"eval_cascade_{tag}.json", result)
        n = 54 * min(per_caption, 2)
        save_grid(upsampled[:n], out / f"bicubic_{tag}.png")
        for level, images in cascades.items():
            save_grid(images[:n], out / f"cascade_{tag}_nl{level}.png")
        save_comparison(stage1, upsampled, cascades, out / f"comparison_{tag}.png")
    return result


def save_comparison(stage1, upsampled, cascades: dict, path, columns: int = 9, scale: int = 2):
    """Rows: stage 1 (nearest-neighbour enlarged), its bicubic upsampling, the cascade at each noise level; `columns`
    captions (the first image of each), each shown `scale` x."""
    # caption c * 9 + s * 3 + b: every color, shape and background among the first 9 columns
    idx = [(k % 6) * 9 + (k % 3) * 3 + (k // 3) % 3 for k in range(columns)]
    size = upsampled.shape[1] * scale
    nearest = lambda im: im.repeat(size // im.shape[0], 0).repeat(size // im.shape[1], 1)  # noqa: E731
    rows = [stage1, upsampled, *cascades.values()]
    gap = np.full((size, 4, 3), 255, np.uint8)
    lines = []
    for images in rows:
        cells = []
        for i in idx:
            cells += [nearest(images[i]), gap]
        lines += [np.concatenate(cells[:-1], axis=1), np.full((4, len(idx) * (size + 4) - 4, 3), 255, np.uint8)]
    write_png(path, np.concatenate(lines[:-1], axis=0))


# ------------------------------------------------------------------------------------------------ ControlNet
# held-out silhouettes: a data seed no training run uses (the LDM and the toy ControlNet train on seed 0, the
# evaluation classifier on seed 1 from index 0), from the evaluation indices on
CONTROLNET_DATA_SEED = 1


def held_out_silhouettes(per_caption: int, data_seed: int = CONTROLNET_DATA_SEED, image_size: int = 32):
    """`per_caption` held-out shapes images of each of the 54 captions, in caption order repeated (caption k's j-th
    image at j * 54 + k): (real images [N, H, W, 3] uint8, silhouettes [N, H, W] uint8, labels [N, 3]), the first
    images of each caption from index HELD_OUT_START on, so every color, shape and background is equally present."""
    found = {combo: [] for combo, _ in data_lib.all_shape_captions()}
    index = data_lib.HELD_OUT_START
    while any(len(v) < per_caption for v in found.values()):
        labels = data_lib.shape_geometry(data_seed, index, image_size).labels
        if len(found[labels]) < per_caption:
            found[labels].append(index)
        index += 1
    order = [(combo, j) for j in range(per_caption) for combo in found]
    examples = [data_lib.shapes_silhouette_example(data_seed, found[combo][j], image_size) for combo, j in order]
    images, silhouettes, labels = (np.stack(x) for x in zip(*examples))
    return images, silhouettes, labels


def shape_masks(images_uint8: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The generated shape of each image: pixels nearer (RGB distance) the caption's color than its background's.
    images [N, H, W, 3] uint8, labels [N, 3] -> bool [N, H, W]."""
    x = images_uint8.astype(np.float32) / 255.0
    fg = np.array([data_lib.ALL_COLORS[data_lib.ALL_COLOR_NAMES[c]] for c in labels[:, 0]], np.float32)[:, None, None]
    bg = np.array([data_lib.BACKGROUNDS[data_lib.BACKGROUND_NAMES[b]] for b in labels[:, 2]], np.float32)[:, None, None]
    return ((x - fg) ** 2).sum(-1) < ((x - bg) ** 2).sum(-1)


def mask_iou(masks: np.ndarray, silhouettes: np.ndarray) -> np.ndarray:
    """Intersection over union of each generated mask [N, H, W] and its silhouette (inside: >= half covered)."""
    target = silhouettes >= 128
    inter = (masks & target).sum(axis=(1, 2))
    union = (masks | target).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


def generate_controlled(pipe, params, captions, control, scale: float, seed=0, guidance=5.0, steps=25, batch_size=54):
    """Images [N, H, W, 3] uint8 for captions and their control images [N, 3, H, W] in [0, 1], in batches of
    `batch_size` (one compiled program: the scale is traced). Image i starts from the noise of seed + i."""
    from sdjax.seeds import initial_noise, loop_key, sample_seeds

    h, w = control.shape[-2:]
    images = []
    for i in range(0, len(captions), batch_size):
        n = len(captions[i:i + batch_size])
        latents = initial_noise(sample_seeds(seed, range(i, i + n)), pipe.latent_shape(1, h, w)[1:])
        out = pipe(pipe.prepare_text_inputs(list(captions[i:i + batch_size])), control[i:i + n], params,
                   loop_key(seed, i // batch_size), num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                   controlnet_conditioning_scale=scale, return_trajectory=False)
        images.append(np.round(np.asarray(out.images) * 255).astype(np.uint8))
    return np.concatenate(images)


def evaluate_controlnet(model_path, controlnet_path, classifier_dir="runs/shapes_classifier", guidance=5.0, steps=25,
                        per_caption=2, seed=0, data_seed=CONTROLNET_DATA_SEED, scale=1.0, n_real=1000,
                        out_dir=None) -> dict:
    """A silhouette ControlNet on held-out silhouettes, prompt = the image's own caption (prompt and silhouette
    agree), with the ControlNet (at `scale`) and without it (scale 0: the text-to-image model alone, from the same
    noise): median IoU of the generated shape's mask (`shape_masks`) with the silhouette, overall and per shape;
    color / shape / background adherence read by the evaluation classifier; FD against real images."""
    from sdjax.pipelines import FlaxStableDiffusionControlNetPipeline

    t_load = time.time()
    pipe, params = FlaxStableDiffusionControlNetPipeline.from_pretrained(model_path, controlnet=str(controlnet_path))
    size = pipe.default_size
    clf = load_or_train_classifier(classifier_dir, size)
    real, silhouettes, labels = held_out_silhouettes(per_caption, data_seed, size)
    captions = [data_lib.caption_for(*combo) for combo in labels]
    control = np.repeat(silhouettes[:, None].astype(np.float32) / 255.0, 3, axis=1)
    reference = data_lib.shapes_dataset(n_real, seed=0, image_size=size, start=data_lib.HELD_OUT_START)
    real_feats, real_preds = predict(clf, reference.images)
    result = {"classifier_held_out_accuracy": accuracies(real_preds, reference.labels)}
    generated, rows = {}, {}
    for name, s in (("without", 0.0), ("with", scale)):
        t0 = time.time()
        images = generate_controlled(pipe, params, captions, control, s, seed=seed, guidance=guidance, steps=steps)
        seconds = time.time() - t0
        generated[name] = images
        iou = mask_iou(shape_masks(images, labels), silhouettes)
        feats, preds = predict(clf, images)
        rows[name] = {"median_iou": float(np.median(iou)), "mean_iou": float(np.mean(iou)),
                      "median_iou_per_shape": {shape: float(np.median(iou[labels[:, 1] == k]))
                                               for k, shape in enumerate(data_lib.SHAPES)},
                      "adherence": accuracies(preds, labels), "fd_vs_real": frechet_distance(feats, real_feats),
                      "controlnet_conditioning_scale": s, "seconds": seconds}
    # the ceiling: the real images through the frozen VAE (encode, posterior mean, decode), all a ControlNet steers
    recon = vae_reconstructions(pipe.vae, params["vae"], real)
    iou = mask_iou(shape_masks(recon, labels), silhouettes)
    result["vae_reconstruction"] = {
        "median_iou": float(np.median(iou)), "adherence": accuracies(predict(clf, recon)[1], labels),
        "median_iou_per_shape": {shape: float(np.median(iou[labels[:, 1] == k]))
                                 for k, shape in enumerate(data_lib.SHAPES)}}
    result |= {"rows": rows, "model": str(model_path), "controlnet": str(controlnet_path), "guidance": guidance,
               "steps": steps, "images": len(captions), "per_caption": per_caption, "data_seed": data_seed,
               "seed": seed, "scheduler": type(pipe.scheduler).__name__, "total_seconds": time.time() - t_load}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_controlnet.json", result)
        save_control_comparison(silhouettes, generated["without"], generated["with"], real,
                                out / "controlnet_samples.png")
        save_disagreement(pipe, params, silhouettes, labels, out / "controlnet_disagree.png", scale=scale, seed=seed,
                          guidance=guidance, steps=steps)
    return result


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vae, vae_params, x):
    return vae.apply({"params": vae_params}, vae.apply({"params": vae_params}, x, method=vae.encode).mean,
                     method=vae.decode)


def vae_reconstructions(vae, vae_params, images_uint8) -> np.ndarray:
    """images [N, H, W, 3] uint8 -> an AutoencoderKL's reconstructions (posterior mean decoded), uint8."""
    x = jnp.asarray(images_uint8.transpose(0, 3, 1, 2), jnp.float32) / 127.5 - 1.0
    out = _reconstruct(vae, vae_params, x)
    out = np.asarray(getattr(out, "sample", out))
    return np.round(np.clip((out + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def save_disagreement(pipe, params, silhouettes, labels, path, scale=1.0, seed=0, guidance=5.0, steps=25,
                      color: int = 0, background: int = 0, size: int = 4):
    """Prompt and silhouette disagreeing: rows the first held-out circle, square and triangle silhouette of
    `color` on `background`; columns the control image, then the prompt asking for each shape in that color and
    background (the diagonal agrees). Each image shown `size` x."""
    rows = [int(np.flatnonzero((labels == (color, s, background)).all(1))[0]) for s in range(len(data_lib.SHAPES))]
    n = len(data_lib.SHAPES)
    control = np.repeat(silhouettes[np.repeat(rows, n)][:, None].astype(np.float32) / 255.0, 3, axis=1)
    captions = [data_lib.caption_for(color, s, background) for _ in rows for s in range(n)]
    images = generate_controlled(pipe, params, captions, control, scale, seed=seed, guidance=guidance, steps=steps,
                                 batch_size=len(captions))
    big = lambda im: im.repeat(size, 0).repeat(size, 1)  # noqa: E731
    gap = np.full((silhouettes.shape[1] * size, 4, 3), 255, np.uint8)
    lines = []
    for r, i in enumerate(rows):
        cells = [big(np.repeat(silhouettes[i][..., None], 3, axis=-1)), np.full_like(gap, 255), gap]
        cells += [x for k in range(n) for x in (big(images[r * n + k]), gap)]
        line = np.concatenate(cells[:-1], axis=1)
        lines += [line, np.full((4, line.shape[1], 3), 255, np.uint8)]
    write_png(path, np.concatenate(lines[:-1], axis=0))


def save_control_comparison(silhouettes, without, with_, real, path, count: int = 18, scale: int = 3):
    """Columns: control silhouette, without the ControlNet, with it, the real image; `count` rows of the first images
    (the first 18: every color, shape and background), each shown `scale` x, in two blocks side by side."""
    n = min(count, len(silhouettes))
    big = lambda im: im.repeat(scale, 0).repeat(scale, 1)  # noqa: E731
    gap = np.full((silhouettes.shape[1] * scale, 2, 3), 255, np.uint8)
    rows = []
    for i in range(n):
        sil = np.repeat(silhouettes[i][..., None], 3, axis=-1)
        rows.append(np.concatenate([big(sil), gap, big(without[i]), gap, big(with_[i]), gap, big(real[i])], axis=1))
    half = (n + 1) // 2
    blank = np.full_like(rows[0], 255)
    left, right = rows[:half], rows[half:] + [blank] * (half - len(rows[half:]))
    sep = lambda r: np.full((4, r.shape[1], 3), 255, np.uint8)  # noqa: E731
    column = lambda rs: np.concatenate([x for r in rs for x in (r, sep(r))][:-1], axis=0)  # noqa: E731
    left_col, right_col = column(left), column(right)
    write_png(path, np.concatenate([left_col, np.full((left_col.shape[0], 12, 3), 255, np.uint8), right_col], axis=1))

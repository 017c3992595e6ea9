"""The ceiling a frozen toy autoencoder sets for every model trained on its latents (LDM, ControlNet, LoRA):
held-out real "shapes" images, encoded and decoded (posterior mean), read by the evaluation classifier.

    python bench/autoencoder_ceiling.py sdjax/assets/toy-shapes/vae runs/ae/vae --out /tmp/ceiling.png

A ControlNet or a LoRA only steers the latents the VAE decodes: if the real images' reconstructions are read as the
right shape 92% of the time, no model on that VAE scores 97% shape adherence. For each VAE folder (a diffusers
AutoencoderKL folder: a pipeline's vae/ or a `sdjax train autoencoder` workdir's vae/): PSNR (dB, over all pixels),
color / shape / background adherence and the shape's silhouette IoU (`sdjax train evaluate`'s classifier and masks,
trained and cached in --classifier-dir on first use), and how often a new colour (`--concept`, never in the toy
model's training images) comes back as itself, per background (the classifier extended to it). The first row is
the real images themselves. The picture: rows real, then each VAE's reconstructions (18 shapes images, then 18 of
the concept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sdjax.cli.args import positive_int
from sdjax.errors import SdjaxError


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float(10 * np.log10(255.0 ** 2 / max(err, 1e-10)))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae", nargs="+", help="AutoencoderKL folders (a pipeline's vae/, a workdir's vae/)")
    p.add_argument("--per-caption", type=positive_int, default=6,
                   help="held-out images of each of the 54 captions (default 6: 324 images)")
    p.add_argument("--concept", default="orange", help="a new colour (default: orange)")
    p.add_argument("--concept-images", type=positive_int, default=360, help="images of the concept (default: 360)")
    p.add_argument("--classifier-dir", default="runs/shapes_classifier",
                   help="the evaluation classifier's cache (default: runs/shapes_classifier)")
    p.add_argument("--out", default=None, help="PNG: rows real, then each VAE's reconstructions (3x)")
    p.add_argument("--json", default=None, help="write the rows here too")
    args = p.parse_args(argv)
    # checked before minutes of work: a folder where a file goes, or a file where a folder goes, named now
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
            p.error(f"{flag} {path}: a file path in an existing folder is expected")
    if Path(args.classifier_dir).exists() and not Path(args.classifier_dir).is_dir():
        p.error(f"--classifier-dir {args.classifier_dir}: a folder is expected (it is a file)")

    from sdjax.io import write_json, write_png
    from sdjax.models.autoencoder_kl import AutoencoderKL
    from sdjax.train import data as data_lib
    from sdjax.train import evaluate as ev

    if args.concept not in data_lib.NEW_COLORS:
        p.error(f"--concept {args.concept!r}: a new colour is expected ({', '.join(data_lib.NEW_COLORS)})")
    clf = ev.load_or_train_classifier(args.classifier_dir, 32)
    clf_concept = ev.load_or_train_classifier(args.classifier_dir, 32, extra=(args.concept,))
    real, silhouettes, labels = ev.held_out_silhouettes(args.per_caption)
    concept = data_lib.concept_dataset(args.concept, args.concept_images, seed=1, start=data_lib.HELD_OUT_START)
    concept_label = data_lib.ALL_COLOR_NAMES.index(args.concept)
    rows, pictures = [], [np.concatenate([real[:18], concept.images[:18]])]
    for name in ["real images"] + args.vae:
        if name == "real images":
            recon, recon_concept = real, concept.images
        else:
            try:
                vae, params = AutoencoderKL.from_pretrained(name)
            except SdjaxError as e:
                p.error(f"{name}: {e}")
            recon = ev.vae_reconstructions(vae, params, real)
            recon_concept = ev.vae_reconstructions(vae, params, concept.images)
            pictures.append(np.concatenate([recon[:18], recon_concept[:18]]))
        preds = ev.predict(clf, recon)[1]
        iou = ev.mask_iou(ev.shape_masks(recon, labels), silhouettes)
        read = ev.predict(clf_concept, recon_concept)[1]["color"] == concept_label
        rows.append({
            "vae": name, "psnr_db": psnr(recon, real) if name != "real images" else None,
            "adherence": ev.accuracies(preds, labels),
            "shape_per_shape": {s: float(np.mean(preds["shape"][labels[:, 1] == k] == k))
                                for k, s in enumerate(data_lib.SHAPES)},
            "median_iou": float(np.median(iou)),
            "concept": float(np.mean(read)),
            "concept_per_background": {b: float(np.mean(read[concept.labels[:, 2] == k]))
                                       for k, b in enumerate(data_lib.BACKGROUND_NAMES)}})

    print(f"| VAE | PSNR (dB) | color | shape | circle / square / triangle | median IoU | {args.concept} "
          f"| {' / '.join(data_lib.BACKGROUND_NAMES)} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["adherence"]
        print(f"| {r['vae']} | {'' if r['psnr_db'] is None else format(r['psnr_db'], '.1f')} | {a['color']:.1%} "
              f"| {a['shape']:.1%} | {' / '.join(format(v, '.1%') for v in r['shape_per_shape'].values())} "
              f"| {r['median_iou']:.2f} | {r['concept']:.1%} "
              f"| {' / '.join(format(v, '.1%') for v in r['concept_per_background'].values())} |")
    if args.out:
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in pictures], axis=0)
        write_png(args.out, grid.repeat(3, axis=0).repeat(3, axis=1))
    if args.json:
        write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()

"""The ceiling of a latent upscaler: how close its autoencoder's reconstructions come to real 64x64 "shapes"
images, against plain bicubic upsampling of their 32x32 (area-downsampled) versions.

    python bench/upscaler_ceiling.py --autoencoder-dir runs/shapes_upscaler_autoencoder --out docs/images/upscaler_ceiling.png

A latent upscaler (diffusers' x4 layout: the UNet denoises the latents of the high-resolution image, the VAE's
decoder upsamples) can never be sharper or closer to the real image than its VAE's reconstruction of that
image. If the reconstruction loses to bicubic, no upscaler trained on that VAE can beat bicubic: train the
autoencoder further first. Prints PSNR (dB, mean over images) and sharpness (the RMS difference of neighbouring
pixels, horizontal and vertical, in gray levels: a blur spreads an edge's step over more pixels and lowers it; the
real images' value is the target); writes a picture: rows real, VAE reconstruction, bicubic.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(err, 1e-10))))


def sharpness(images: np.ndarray) -> float:
    g = images.astype(np.float64).mean(-1)
    d = np.concatenate([np.diff(g, axis=1).ravel(), np.diff(g, axis=2).ravel()])
    return float(np.sqrt((d ** 2).mean()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder-dir", required=True, help="an f=2 autoencoder workdir (its vae/ is used)")
    p.add_argument("--images", type=int, default=64, help="held-out 64x64 images (default: 64)")
    p.add_argument("--out", default=None, help="PNG: rows real, reconstruction, bicubic (8 images, 2x)")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from sdjax.io import write_png
    from sdjax.train import data as data_lib
    from sdjax.train import ldm
    from sdjax.train.evaluate import bicubic
    from sdjax.train.upscaler import downsample

    vae, params = ldm.load_autoencoder(args.autoencoder_dir)
    f = vae.vae_scale_factor
    real = data_lib.shapes_dataset(args.images, seed=0, image_size=64, start=data_lib.HELD_OUT_START).images
    x = jnp.transpose(jnp.asarray(real, jnp.float32) / 127.5 - 1, (0, 3, 1, 2))
    z = vae.apply({"params": params}, x, method=vae.encode).mean
    rec = vae.apply({"params": params}, z, method=vae.decode)
    rec = getattr(rec, "sample", rec)
    rec = np.asarray(jnp.clip((jnp.transpose(rec, (0, 2, 3, 1)) + 1) * 127.5, 0, 255)).round().astype(np.uint8)
    bic = bicubic(downsample(real, f), 64)
    result = {"autoencoder_dir": args.autoencoder_dir, "images": args.images, "factor": f,
              "psnr_db": {"reconstruction": psnr(rec, real), "bicubic": psnr(bic, real)},
              "sharpness": {"real": sharpness(real), "reconstruction": sharpness(rec), "bicubic": sharpness(bic)}}
    print(json.dumps(result, indent=2))
    if args.out:
        row = lambda ims: np.concatenate([im.repeat(2, 0).repeat(2, 1) for im in ims[:8]], axis=1)  # noqa: E731
        write_png(args.out, np.concatenate([row(real), row(rec), row(bic)], axis=0))
    return result


if __name__ == "__main__":
    main()

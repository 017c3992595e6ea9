"""Write a trained toy LDM as a diffusers-format Stable Diffusion folder.

    python -m train.export --workdir runs/ldm --out sdjax/assets/toy-shapes [--dtype float16]

The folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) loads in
`sdjax.FlaxStableDiffusionPipeline.from_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained`.
The UNet and text encoder are the EMA weights; the scheduler is DDIM (or PLMS) with the training betas.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from sdjax.errors import ConfigError, exit_code



def export_pipeline(out_dir, cfg, text_encoder, unet, ema_params, vae, vae_params, tokenizer, dtype=jnp.float32):
    from sdjax.pipeline_stable_diffusion import FlaxStableDiffusionPipeline
    from sdjax.schedulers import get_scheduler

    from .ldm import sampling_scheduler_config

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then swapped in: an interrupted export leaves the old folder (or none), never half.
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    try:
        scheduler = get_scheduler(sampling_scheduler_config(cfg))
        pipe = FlaxStableDiffusionPipeline(text_encoder, vae, unet, tokenizer, scheduler)
        cast = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
        pipe.save_pretrained(tmp, cast({"text_encoder": ema_params["text_encoder"], "vae": vae_params,
                                        "unet": ema_params["unet"]}))
        # Also CLIP's hub layout (vocab.json + merges.txt), which transformers 4's slow CLIPTokenizer needs.
        source = Path(getattr(tokenizer, "name_or_path", "") or "")
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if (source / name).is_file():
                shutil.copy(source / name, tmp / "tokenizer" / name)
        for p in [tmp, *tmp.rglob("*")]:  # readable by everyone, like any installed file
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_from_workdir(workdir, out_dir, dtype=jnp.float32, use_ema: bool = True):
    """Rebuild the models from a stage-2 workdir's config and latest checkpoint, and export them."""
    from .checkpointing import Checkpointer
    from .config import build_config
    from .ldm import Config, create_train_state, load_autoencoder, make_models, setup_tokenizer

    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ConfigError(f"{workdir} is not a stage-2 workdir: it has no config.json (train it with python -m train.ldm)")
    cfg = build_config(Config, json.loads((workdir / "config.json").read_text()), source=str(workdir / "config.json"))
    vae, vae_params = load_autoencoder(cfg.autoencoder_dir)
    tokenizer = setup_tokenizer(workdir, [], cfg.model_max_length)
    text_encoder, unet = make_models(cfg, vae, tokenizer)
    ckpt = Checkpointer(workdir, cfg.checkpoint_every, cfg.keep_checkpoints)
    if ckpt.latest_step() is None:
        raise ConfigError(f"no checkpoint in {workdir}/checkpoints: nothing to export yet")
    state = ckpt.restore(jax.eval_shape(lambda: create_train_state(cfg, text_encoder, unet)))
    ckpt.close()
    params = state["ema"] if use_ema else state["params"]
    return export_pipeline(out_dir, cfg, text_encoder, unet, jax.device_get(params), vae, vae_params, tokenizer, dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a stage-2 (train.ldm) workdir")
    parser.add_argument("--out", required=True, help="the pipeline folder to write (replaced)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    args = parser.parse_args(argv)
    out = export_from_workdir(args.workdir, args.out, dtype=jnp.dtype(args.dtype), use_ema=not args.no_ema)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(exit_code(main, "train.export"))

"""Write trained models as a diffusers-format Stable Diffusion folder.

    sdjax train export --workdir runs/shapes_ldm --out sdjax/assets/toy-shapes

The folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) loads in
`sdjax.FlaxStableDiffusionPipeline.from_pretrained` and diffusers' `StableDiffusionPipeline.from_pretrained`.
It is written beside the target and swapped in whole: an interrupted export leaves the old folder, never half.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from sdjax.io import check_output_dir, write_folder
from sdjax.pipelines import FlaxStableDiffusionPipeline


COMMAND = "sdjax train export"


def export_pipeline(out_dir, text_encoder, unet, params, vae, vae_params, tokenizer, scheduler, dtype=jnp.float32,
                    overwrite: bool = False, protect=()):
    """params: {"unet": ..., "text_encoder": ...} (e.g. the EMA weights). Returns the folder.

    An existing `out_dir` is replaced only if an earlier export wrote it (its output marker) or `overwrite`;
    never a folder in `protect` (the training workdirs) or one holding them."""
    pipe = FlaxStableDiffusionPipeline(text_encoder, vae, unet, tokenizer, scheduler)
    return write_pipeline_folder(out_dir, pipe, {"text_encoder": params["text_encoder"], "vae": vae_params,
                                                 "unet": params["unet"]},
                                 Path(getattr(tokenizer, "name_or_path", "") or ""), dtype=dtype, overwrite=overwrite,
                                 protect=protect)


def write_pipeline_folder(out_dir, pipe, params, tokenizer_source, dtype=jnp.float32, overwrite: bool = False,
                          protect=()):
    """`pipe.save_pretrained(out_dir, params)` cast to `dtype`, written beside the target and swapped in whole, with
    CLIP's hub tokenizer files (vocab.json + merges.txt) copied from `tokenizer_source`. Returns the folder."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, COMMAND, overwrite=overwrite, protect=protect)

    def fill(tmp):
        cast = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
        pipe.save_pretrained(tmp, cast(params))
        # Also CLIP's hub layout (vocab.json + merges.txt), which transformers 4's slow CLIPTokenizer needs.
        source = Path(tokenizer_source)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            if (source / name).is_file():
                shutil.copy(source / name, tmp / "tokenizer" / name)

    return write_folder(out_dir, COMMAND, fill)

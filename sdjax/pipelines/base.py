"""What every pipeline shares: loading a diffusers folder, the modules-here/params-passed-in call style,
the choice of compiled program (single device, pmap, mesh), and decoding.

A pipeline object holds modules (Flax Linen, hashed by config), a tokenizer and a scheduler; no weights.
It is a static argument of `engine.run_jit` / `engine.run_pmap`, so it is equal and hashed by value:
two pipelines built from the same configs share compiled programs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ..errors import ConfigError, SdjaxError
from ..hub import resolve_folder
from ..io import read_json
from . import engine

logger = logging.getLogger(__name__)

# Components of a diffusers folder that sdjax does not run (and does not download).
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


class DiffusionPipeline:
    """Base of sdjax's pipelines. Subclasses define `generate(settings, inputs, params, key)` (traced)."""

    #: the components this pipeline runs, by model_index.json name
    components: tuple[str, ...] = ()

    # ------------------------------------------------------------------ identity (static argument)
    def _identity(self) -> tuple:
        """Everything the compiled program depends on: the modules' and scheduler's configs and the dtype."""
        parts = [type(self), jnp.dtype(self.dtype).name]
        for name in self.components:
            if name == "tokenizer" or name.startswith("tokenizer"):
                continue
            parts.append(getattr(self, name))
        return tuple(parts)

    def __hash__(self):
        return hash(self._identity())

    def __eq__(self, other):
        return type(other) is type(self) and self._identity() == other._identity()

    # ------------------------------------------------------------------ running
    def _run(self, settings, inputs: dict, params, key, *, jit: bool = False, mesh: Mesh | None = None):
        """The compiled program for `settings` on `inputs` (a dict of batch-major arrays):
        jit=True: pmapped (inputs, params, key with a leading device axis); mesh: inputs split over the mesh."""
        if jit:
            return engine.run_pmap(self, settings, inputs, params, key)
        if mesh is not None:
            inputs, params, key = engine.place_on_mesh(mesh, inputs, params, key)
        return engine.run_jit(self, settings, inputs, params, key)

    # ------------------------------------------------------------------ decoding
    def decode_latents(self, vae_params, latents):
        """Latents (NCHW, scaled) -> images [B, H, W, 3] float32 in [0, 1]."""
        image = self.vae.apply({"params": vae_params}, latents / self.vae.scaling_factor, method=self.vae.decode)
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1)
        return image.transpose(0, 2, 3, 1)

    def decode_frames(self, vae_params, latents, chunk_size: int = 8, progress: bool = True) -> np.ndarray:
        """Decode latent frames [T, B, C, h, w] to uint8 images [T, B, H, W, 3], a chunk at a time.

        Only one chunk of float images exists at once, so a 50-step, batch-8, 512x512 trajectory
        (400 frames, 315 MB as uint8) decodes on one accelerator.
        """
        latents = np.asarray(latents)
        t, b = latents.shape[:2]
        flat = latents.reshape((t * b,) + latents.shape[2:])
        n = flat.shape[0]
        chunks = []
        for start in tqdm(range(0, n, chunk_size), desc="decoding frames", unit="chunk", disable=not progress,
                          leave=False):
            part = flat[start:start + chunk_size]
            pad = chunk_size - part.shape[0]
            if pad:  # keep one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            chunks.append(np.asarray(_decode_uint8(self, vae_params, part))[: chunk_size - pad])
        frames = np.concatenate(chunks)
        return frames.reshape((t, b) + frames.shape[1:])


@functools.partial(jax.jit, static_argnums=0)
def _decode_uint8(pipe, vae_params, latents):
    return jnp.round(pipe.decode_latents(vae_params, latents) * 255).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------- loading
def open_pipeline_folder(pretrained_model_name_or_path, patterns, revision=None) -> tuple[Path, dict]:
    """(local folder, model_index.json) of a diffusers pipeline folder or hub repo id."""
    root = resolve_folder(pretrained_model_name_or_path, allow_patterns=patterns, revision=revision)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise SdjaxError(f"{root} is not a diffusers pipeline folder: model_index.json is missing")
    return root, read_json(index_path, "model_index.json")


def check_components(index: dict, index_path, supported: tuple[str, ...], pipeline_name: str) -> None:
    """Refuse a folder with components this pipeline would silently ignore."""
    extra = [k for k, v in index.items() if not k.startswith("_") and k not in supported
             and k not in SKIPPED_COMPONENTS and isinstance(v, list) and v and v[0] is not None]
    if extra:
        raise ConfigError(f"{index_path}: components {extra} are not run by sdjax's {pipeline_name} "
                          f"(it runs: {', '.join(supported)})")


def weight_patterns(components) -> list[str]:
    """What to download for a repo id: configs, tokenizer files and non-variant safetensors; never pickles."""
    pats = ["model_index.json"]
    for sub in components:
        if sub.startswith("tokenizer"):
            pats.append(f"{sub}/*")
        elif sub.startswith("scheduler"):
            pats.append(f"{sub}/*.json")
        else:
            pats += [f"{sub}/config.json", f"{sub}/diffusion_pytorch_model.safetensors", f"{sub}/model.safetensors",
                     f"{sub}/*.safetensors.index.json", f"{sub}/*-of-*.safetensors"]
    return pats


def runtime_for(model_cls, runtime: dict) -> dict:
    """The kernel choices (`attention_kernel`, `conv_kernel`) that `model_cls` has; unknown names are an error."""
    known = {"attention_kernel", "conv_kernel"}
    unknown = set(runtime) - known
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)}; kernel choices: {sorted(known)}")
    return {k: v for k, v in runtime.items() if k in model_cls.runtime_fields()}

"""Cascaded generation: a text-to-image pipeline, then an upscaler on its images (text -> 32x32 -> 64x64 for the toy
model and its upscaler). Each stage is its own compiled program (the pipelines' own `run_jit`); the stage-1 images
go to the upscaler as they are (floats, not rounded to uint8).

    out = run_cascade(base, base_params, upscaler, upscaler_params, ["a red circle on a white background"], seed=0)
    out.low_res    # [B, h, w, 3] stage 1's images in [0, 1]
    out.images     # [B, h * f, w * f, 3] the upscaler's

Noise: sample i of a run with seed s uses stage 1's usual noise (sdjax.seeds: PRNGKey(s + i)) and, for stage 2,
the latents and the low-resolution image's noise from fold_in(PRNGKey(s + i), 1) and (..., 2): an image depends on
its own seed only, as in every sdjax command.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..seeds import initial_noise, loop_key, sample_seeds
from .output import FlaxStableDiffusionPipelineOutput


@dataclasses.dataclass
class CascadeOutput:
    low_res: jax.Array                         # [B, h, w, 3] float32 in [0, 1]: stage 1's images
    images: jax.Array                          # [B, H, W, 3] float32 in [0, 1]: the upscaler's images
    stage1: FlaxStableDiffusionPipelineOutput  # with its trajectory when asked
    stage2: FlaxStableDiffusionPipelineOutput
    seeds: list[int]
    noise_level: int | np.ndarray
    low_res_noise: np.ndarray                  # [B, 3, h, w]: the noise stage 2 added to the low-resolution images


def stage_noise(seeds, shape, stage: int) -> np.ndarray:
    """One standard normal tensor of `shape` per seed, from fold_in(PRNGKey(seed), stage)."""
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(int(s)), stage),
                                                  tuple(shape), jnp.float32)) for s in seeds])


def run_cascade(base, base_params, upscaler, upscaler_params, prompts: list[str], *, negative_prompt: str = "",
                seed: int = 0, steps: int = 25, guidance: float = 5.0, upscaler_steps: int = 25,
                upscaler_guidance: float = 1.0, noise_level=100, height: int | None = None, width: int | None = None,
                return_trajectory: bool = False, output_attentions: bool = False,
                check_finite: bool = True) -> CascadeOutput:
    """Generate `prompts` with `base`, then upscale the images with `upscaler` (the same prompts).
    output_attentions: stage 1's cross-attention maps (in out.stage1.trajectory)."""
    n = len(prompts)
    seeds = sample_seeds(seed, range(n))
    height = base.default_size if height is None else height
    width = base.default_size if width is None else width
    ids = base.prepare_inputs(list(prompts))
    neg = base.prepare_inputs([negative_prompt] * n)
    base.check_inputs(height, width, steps, n)
    stage1 = base(ids, base_params, loop_key(seed), num_inference_steps=steps, guidance_scale=guidance,
                  height=height, width=width, latents=initial_noise(seeds, base.latent_shape(1, height, width)[1:]),
                  neg_prompt_ids=neg, return_trajectory=return_trajectory or output_attentions,
                  output_attentions=output_attentions, check_finite=check_finite)
    low_res = stage1.images
    stage2, low_res_noise = upscale(upscaler, upscaler_params, prompts, low_res, seeds, negative_prompt=negative_prompt,
                                    seed=seed, steps=upscaler_steps, guidance=upscaler_guidance,
                                    noise_level=noise_level, return_trajectory=return_trajectory,
                                    check_finite=check_finite)
    return CascadeOutput(low_res=low_res, images=stage2.images, stage1=stage1, stage2=stage2, seeds=seeds,
                         noise_level=noise_level, low_res_noise=low_res_noise)


def upscale(upscaler, upscaler_params, prompts: list[str], low_res, seeds, *, negative_prompt: str = "", seed: int = 0,
            steps: int = 25, guidance: float = 1.0, noise_level=100, return_trajectory: bool = False,
            check_finite: bool = True):
    """Stage 2 of a cascade on images [B, h, w, 3] in [0, 1] (stage 1's, sample i from seed seeds[i]):
    (the upscaler's output, the noise it added to the low-resolution images)."""
    n = len(prompts)
    height, width = low_res.shape[1:3]
    image = jnp.transpose(2.0 * jnp.asarray(low_res, jnp.float32) - 1.0, (0, 3, 1, 2))
    f = upscaler.vae_scale_factor
    latents = stage_noise(seeds, upscaler.latent_shape(1, height * f, width * f)[1:], 1)
    low_res_noise = stage_noise(seeds, (3, height, width), 2)
    out = upscaler(upscaler.tokenize(list(prompts)), image, upscaler_params, loop_key(seed, 1),
                   num_inference_steps=steps, guidance_scale=guidance, noise_level=noise_level, latents=latents,
                   low_res_noise=low_res_noise, neg_prompt_ids=upscaler.tokenize([negative_prompt] * n),
                   return_trajectory=return_trajectory, check_finite=check_finite)
    return out, low_res_noise

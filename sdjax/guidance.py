"""Guidance: how the model's conditional and unconditional predictions combine into the one the sampler uses.

Classifier-free guidance (Ho & Salimans 2022): the UNet runs on the batch [unconditional; conditional]
and the sampler gets eps_u + w (eps_c - eps_u). w = 1 is the conditional model alone, w = 0 the
unconditional one. `guidance_scale` is traced ([B] or a scalar), so changing it never recompiles.

Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4;
diffusers' `rescale_noise_cfg`): the guided prediction is scaled to the conditional one's standard deviation
and mixed back with weight `guidance_rescale` (traced too; 0 leaves the guided prediction exactly as it is).
"""

from __future__ import annotations

import jax.numpy as jnp


def _per_sample(scale, ndim: int):
    scale = jnp.asarray(scale, jnp.float32)
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim)) if scale.ndim else scale


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' `rescale_noise_cfg`: r * noise_cfg * std(text) / std(cfg) + (1 - r) * noise_cfg, with the
    standard deviations per sample over all other axes (unbiased, as torch's `std`). Where r is 0 the result is
    noise_cfg itself (no division is looked at), as diffusers, which skips the call for r = 0."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    r = _per_sample(guidance_rescale, noise_cfg.ndim)
    mixed = r * (noise_cfg * (std_text / std_cfg)) + (1 - r) * noise_cfg
    return jnp.where(r > 0, mixed, noise_cfg)


def classifier_free_guidance(noise_pred, guidance_scale, guidance_rescale=None):
    """noise_pred [2B, ...] (unconditional half first) -> eps_u + w (eps_c - eps_u), [B, ...] float32;
    then `rescale_noise_cfg` with `guidance_rescale` ([B] or a scalar) when it is given."""
    uncond, cond = jnp.split(noise_pred.astype(jnp.float32), 2)
    w = _per_sample(guidance_scale, uncond.ndim)
    guided = uncond + w * (cond - uncond)
    if guidance_rescale is None:
        return guided
    return rescale_noise_cfg(guided, cond, guidance_rescale)

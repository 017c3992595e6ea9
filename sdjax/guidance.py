"""Guidance: how the model's conditional and unconditional predictions combine into the one the sampler uses.

Classifier-free guidance (Ho & Salimans 2022): the UNet runs on the batch [unconditional; conditional]
and the sampler gets eps_u + w (eps_c - eps_u). w = 1 is the conditional model alone, w = 0 the
unconditional one. `guidance_scale` is traced ([B] or a scalar), so changing it never recompiles.
"""

from __future__ import annotations

import jax.numpy as jnp


def _per_sample(scale, ndim: int):
    scale = jnp.asarray(scale, jnp.float32)
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim)) if scale.ndim else scale


def classifier_free_guidance(noise_pred, guidance_scale):
    """noise_pred [2B, ...] (unconditional half first) -> eps_u + w (eps_c - eps_u), [B, ...] float32."""
    uncond, cond = jnp.split(noise_pred.astype(jnp.float32), 2)
    w = _per_sample(guidance_scale, uncond.ndim)
    return uncond + w * (cond - uncond)

"""Timestep embeddings: the sinusoidal projection (diffusers' `Timesteps`) and the MLP after it
(diffusers' `TimestepEmbedding`, torch names `linear_1` / `linear_2`)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import flax.linen as nn


def get_timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: int = 10000):
    """[N] timesteps (int or float, may be fractional) -> [N, embedding_dim] float32 sinusoids.

    Same arithmetic as diffusers' `get_timestep_embedding`, in float32 like torch, so the frequencies
    (and thus the network's input) match bit for bit up to the sin/cos implementations.
    """
    assert timesteps.ndim == 1, "timesteps should be a 1-D array"
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    emb = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:  # SD uses [cos, sin]
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nn.Module):
    """No parameters; kept as a module only to mirror diffusers' structure."""

    num_channels: int
    flip_sin_to_cos: bool
    downscale_freq_shift: float
    scale: float = 1.0

    def __call__(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (the only activation SD 1.x/2.x use here)."""

    time_embed_dim: int
    out_dim: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample):
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = nn.silu(sample)
        return nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)

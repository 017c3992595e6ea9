"""The KL autoencoder's parts (diffusers' `models/autoencoders/vae.py`), Flax Linen, NHWC inside.

Encoder, Decoder, their blocks (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D) and the posterior
`DiagonalGaussianDistribution`. Submodule names are diffusers' PyTorch attribute names, with list indices
as suffixes (`down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

# diffusers builds every VAE resnet, attention norm and output norm with eps=1e-6.
VAE_EPS = 1e-6


# --------------------------------------------------------------------------- posterior


@struct.dataclass
class DiagonalGaussianDistribution:
    """diffusers' `DiagonalGaussianDistribution` as a pytree (it can be returned from `apply`, `jit`, `vmap`).

    `mean` and `logvar` are [B, C, h, w] (NCHW, diffusers' layout); logvar is clipped to [-30, 20].
    """

    mean: jax.Array
    logvar: jax.Array
    deterministic: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def from_parameters(cls, parameters: jax.Array, deterministic: bool = False, axis: int = 1):
        """Split the encoder's moments [B, 2C, h, w] into mean and (clipped) logvar, as diffusers does."""
        mean, logvar = jnp.split(parameters, 2, axis=axis)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0), deterministic=deterministic)

    @property
    def parameters(self) -> jax.Array:
        return jnp.concatenate([self.mean, self.logvar], axis=1)

    @property
    def std(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1) drawn with `key` (in the parameters' dtype, like diffusers)."""
        eps = jax.random.normal(key, self.mean.shape, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> jax.Array:
        """KL(self || other) (other=None: the standard normal), summed over C, h, w -> [B]. Computed in float32."""
        if self.deterministic:
            return jnp.zeros((1,), jnp.float32)
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        var = jnp.exp(logvar)
        if other is None:
            terms = jnp.square(mean) + var - 1.0 - logvar
        else:
            o_mean, o_logvar = other.mean.astype(jnp.float32), other.logvar.astype(jnp.float32)
            o_var = jnp.exp(o_logvar)
            terms = jnp.square(mean - o_mean) / o_var + var / o_var - 1.0 - logvar + o_logvar
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, sample: jax.Array, dims: Sequence[int] = (1, 2, 3)) -> jax.Array:
        """Negative log-likelihood of `sample` (NCHW), summed over `dims`. Computed in float32."""
        if self.deterministic:
            return jnp.zeros((1,), jnp.float32)
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        logtwopi = jnp.log(2.0 * jnp.pi)
        return 0.5 * jnp.sum(logtwopi + logvar + jnp.square(x - mean) / jnp.exp(logvar), axis=tuple(dims))


# --------------------------------------------------------------------------- blocks


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets (no time embedding), then an optional stride-2 conv with the VAE's (0, 1) padding."""

    in_channels: int
    out_channels: int
    num_layers: int = 1
    resnet_groups: int = 32
    resnet_eps: float = VAE_EPS
    add_downsample: bool = True
    downsample_padding: int = 0
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                in_channels=self.in_channels if i == 0 else self.out_channels, out_channels=self.out_channels,
                temb_channels=None, groups=self.resnet_groups, eps=self.resnet_eps, conv_kernel=self.conv_kernel,
                dtype=self.dtype, name=f"resnets_{i}",
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, conv_kernel=self.conv_kernel,
                             dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (no time embedding), then an optional nearest-2x upsample + conv."""

    in_channels: int
    out_channels: int
    num_layers: int = 1
    resnet_groups: int = 32
    resnet_eps: float = VAE_EPS
    add_upsample: bool = True
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                in_channels=self.in_channels if i == 0 else self.out_channels, out_channels=self.out_channels,
                temb_channels=None, groups=self.resnet_groups, eps=self.resnet_eps, conv_kernel=self.conv_kernel,
                dtype=self.dtype, name=f"resnets_{i}",
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, conv_kernel=self.conv_kernel, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, then `num_layers` x (spatial self-attention, resnet); the VAE uses num_layers=1, one head.

    The attention is diffusers' `Attention(..., norm_num_groups, residual_connection=True, bias=True,
    upcast_softmax=True)` with heads = in_channels // attention_head_dim (the VAE: attention_head_dim =
    in_channels, one head). The softmax always runs in float32 (jax.nn.dot_product_attention does so).
    """

    in_channels: int
    num_layers: int = 1
    resnet_groups: int = 32
    resnet_eps: float = VAE_EPS
    add_attention: bool = True
    attention_head_dim: int | None = None  # None: in_channels (one head)
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.in_channels
        head_dim = self.attention_head_dim or c

        def resnet(i):
            return ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=None, groups=self.resnet_groups,
                                 eps=self.resnet_eps, conv_kernel=self.conv_kernel, dtype=self.dtype,
                                 name=f"resnets_{i}")

        x = resnet(0)(x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = Attention(
                    query_dim=c, heads=c // head_dim, dim_head=head_dim, bias=True,
                    norm_num_groups=self.resnet_groups, norm_eps=self.resnet_eps, residual_connection=True,
                    attention_kernel=self.attention_kernel, dtype=self.dtype, name=f"attentions_{i}",
                )(x)
            x = resnet(i + 1)(x)
        return x


# --------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block -> GroupNorm -> SiLU -> conv_out (2 * out_channels if double_z). NHWC."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        boc = tuple(self.block_out_channels)
        kernels = dict(attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel)
        x = conv(boc[0], 3, self.dtype, "conv_in", conv_kernel=self.conv_kernel)(x)
        output_channel = boc[0]
        for i, block_type in enumerate(self.down_block_types):
            if block_type != "DownEncoderBlock2D":
                raise ValueError(f"Encoder: unsupported down block type {block_type!r} (only 'DownEncoderBlock2D')")
            input_channel, output_channel = output_channel, boc[i]
            x = DownEncoderBlock2D(
                in_channels=input_channel, out_channels=output_channel, num_layers=self.layers_per_block,
                resnet_groups=self.norm_num_groups, add_downsample=i != len(boc) - 1, downsample_padding=0,
                conv_kernel=self.conv_kernel, dtype=self.dtype, name=f"down_blocks_{i}",
            )(x)
        x = UNetMidBlock2D(
            in_channels=boc[-1], resnet_groups=self.norm_num_groups, add_attention=self.mid_block_add_attention,
            attention_head_dim=boc[-1], dtype=self.dtype, name="mid_block", **kernels,
        )(x)
        x = group_norm(self.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        out = 2 * self.out_channels if self.double_z else self.out_channels
        return conv(out, 3, self.dtype, "conv_out", conv_kernel=self.conv_kernel)(x)


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks (layers_per_block + 1 resnets each) -> GroupNorm -> SiLU -> conv_out. NHWC."""

    in_channels: int = 3
    out_channels: int = 3
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        boc = tuple(self.block_out_channels)
        kernels = dict(attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel)
        x = conv(boc[-1], 3, self.dtype, "conv_in", conv_kernel=self.conv_kernel)(z)
        x = UNetMidBlock2D(
            in_channels=boc[-1], resnet_groups=self.norm_num_groups, add_attention=self.mid_block_add_attention,
            attention_head_dim=boc[-1], dtype=self.dtype, name="mid_block", **kernels,
        )(x)
        rev = tuple(reversed(boc))
        output_channel = rev[0]
        for i, block_type in enumerate(self.up_block_types):
            if block_type != "UpDecoderBlock2D":
                raise ValueError(f"Decoder: unsupported up block type {block_type!r} (only 'UpDecoderBlock2D')")
            prev_output_channel, output_channel = output_channel, rev[i]
            x = UpDecoderBlock2D(
                in_channels=prev_output_channel, out_channels=output_channel, num_layers=self.layers_per_block + 1,
                resnet_groups=self.norm_num_groups, add_upsample=i != len(boc) - 1, conv_kernel=self.conv_kernel,
                dtype=self.dtype, name=f"up_blocks_{i}",
            )(x)
        x = group_norm(self.norm_num_groups, VAE_EPS, self.dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        return conv(self.out_channels, 3, self.dtype, "conv_out", conv_kernel=self.conv_kernel)(x)

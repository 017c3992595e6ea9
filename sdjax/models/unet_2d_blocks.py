"""The UNet's down, mid and up blocks (diffusers' `unet_2d_blocks`), NHWC.

Down blocks return (hidden_states, skips); up blocks pop the skips they need from the end of that list.
Per-block options that SD 1.x/2.x never change (resnet act fn, time-embedding norm, pre-norm) are fixed.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer_2d import Transformer2DModel


class DownBlock2D(nn.Module):
    """num_layers resnets, then an optional stride-2 conv; every output is a skip for the up path."""

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    add_downsample: bool = True
    downsample_padding: int = 1
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                              self.temb_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                              conv_kernel=self.conv_kernel, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, conv_kernel=self.conv_kernel,
                             dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(nn.Module):
    """Like DownBlock2D with a Transformer2DModel after every resnet."""

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    transformer_layers_per_block: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    add_downsample: bool = True
    downsample_padding: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels,
                              self.temb_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                              conv_kernel=self.conv_kernel, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            x = _transformer(self, f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding, conv_kernel=self.conv_kernel,
                             dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) num_layers times, at the lowest resolution."""

    in_channels: int
    temb_channels: int
    num_layers: int = 1
    transformer_layers_per_block: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    num_attention_heads: int = 1
    output_scale_factor: float = 1.0
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @property
    def out_channels(self):  # read by _transformer
        return self.in_channels

    @nn.compact
    def __call__(self, x, temb, context):
        def resnet(i):
            return ResnetBlock2D(self.in_channels, self.in_channels, self.temb_channels, groups=self.resnet_groups,
                                 eps=self.resnet_eps, output_scale_factor=self.output_scale_factor,
                                 conv_kernel=self.conv_kernel, dtype=self.dtype, name=f"resnets_{i}")

        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = _transformer(self, f"attentions_{i}")(x, context)
            x = resnet(i + 1)(x, temb)
        return x


class UpBlock2D(nn.Module):
    """num_layers resnets, each on concat(x, last skip); then an optional 2x upsample.

    in_channels: channels of the skip consumed by the last resnet (the previous level's width);
    prev_output_channel: channels of x coming in from the level below.
    """

    in_channels: int
    prev_output_channel: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    add_upsample: bool = True
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, upsample_size=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _up_resnet(self, i)(x, temb)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, conv_kernel=self.conv_kernel, dtype=self.dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """Like UpBlock2D with a Transformer2DModel after every resnet."""

    in_channels: int
    prev_output_channel: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    transformer_layers_per_block: int = 1
    resnet_eps: float = 1e-6
    resnet_groups: int = 32
    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    add_upsample: bool = True
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _up_resnet(self, i)(x, temb)
            x = _transformer(self, f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, conv_kernel=self.conv_kernel, dtype=self.dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


def _up_resnet(block, i: int) -> ResnetBlock2D:
    # The last resnet of an up block takes the skip from the block's input (width in_channels), the others
    # skips of width out_channels; the first takes x from below (prev_output_channel), the others out_channels.
    skip_channels = block.in_channels if i == block.num_layers - 1 else block.out_channels
    x_channels = block.prev_output_channel if i == 0 else block.out_channels
    return ResnetBlock2D(x_channels + skip_channels, block.out_channels, block.temb_channels,
                         groups=block.resnet_groups, eps=block.resnet_eps, conv_kernel=block.conv_kernel,
                         dtype=block.dtype, name=f"resnets_{i}")


def _transformer(block, name: str) -> Transformer2DModel:
    # diffusers' naming quirk: these blocks get the head *count* and derive head_dim = channels // heads.
    return Transformer2DModel(
        block.num_attention_heads, block.out_channels // block.num_attention_heads, in_channels=block.out_channels,
        num_layers=block.transformer_layers_per_block, cross_attention_dim=block.cross_attention_dim,
        norm_num_groups=block.resnet_groups, use_linear_projection=block.use_linear_projection,
        upcast_attention=block.upcast_attention, attention_kernel=block.attention_kernel, dtype=block.dtype,
        only_cross_attention=getattr(block, "only_cross_attention", False),  # the mid block has none
        name=name,
    )

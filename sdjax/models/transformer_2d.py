"""The UNet's spatial transformer: diffusers' `Transformer2DModel` (continuous input) and `BasicTransformerBlock`.

NHWC in and out. Submodule names are the PyTorch attribute names (`ff.net.0.proj` -> `ff/net_0/proj`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .attention import Attention
from .resnet import group_norm


class GEGLU(nn.Module):
    """proj to 2*dim_out, split in (x, gate), x * gelu(gate). torch's F.gelu is the exact (erf) one."""

    dim_out: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x)
        x, gate = jnp.split(x, 2, axis=-1)
        return x * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net.0 = GEGLU(dim -> 4*dim), net.1 = dropout (no params), net.2 = Linear(4*dim -> dim)."""

    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text, GEGLU feed-forward; each residual.

    only_cross_attention: attn1 attends to the text too instead of to the pixels (diffusers' flag; the SD x4
    upscaler's high-resolution blocks), so neither attention layer is self-attention."""

    dim: int
    num_attention_heads: int
    attention_head_dim: int
    cross_attention_dim: int | None = None
    upcast_attention: bool = False
    only_cross_attention: bool = False
    norm_eps: float = 1e-5
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        def layer_norm(name):
            return nn.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, name=name)

        def attention(name, cross_dim, sow):
            return Attention(query_dim=self.dim, heads=self.num_attention_heads, dim_head=self.attention_head_dim,
                             cross_attention_dim=cross_dim, upcast_attention=self.upcast_attention,
                             sow_probs=sow, attention_kernel=self.attention_kernel, dtype=self.dtype, name=name)

        # Self-attention never sows: its [HW, HW] maps are large and the visualization wants text maps only.
        if self.only_cross_attention:
            x = x + attention("attn1", self.cross_attention_dim, sow=False)(layer_norm("norm1")(x), context)
        else:
            x = x + attention("attn1", None, sow=False)(layer_norm("norm1")(x))
        x = x + attention("attn2", self.cross_attention_dim, sow=True)(layer_norm("norm2")(x), context)
        x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layer_norm("norm3")(x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the residual.

    proj_in/proj_out are 1x1 convs (SD 1.x) or Linears (`use_linear_projection`, SD 2.x); on NHWC data
    both are the same per-pixel matmul, but their weights are stored differently (4-D vs 2-D).
    """

    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    num_layers: int = 1
    cross_attention_dim: int | None = None
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner_dim = self.num_attention_heads * self.attention_head_dim
        residual = x

        x = group_norm(self.norm_num_groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            proj_in = nn.Dense(inner_dim, dtype=self.dtype, name="proj_in")
            proj_out = nn.Dense(self.in_channels, dtype=self.dtype, name="proj_out")
        else:
            proj_in = nn.Conv(inner_dim, (1, 1), dtype=self.dtype, name="proj_in")
            proj_out = nn.Conv(self.in_channels, (1, 1), dtype=self.dtype, name="proj_out")

        x = proj_in(x).reshape(b, h * w, inner_dim)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(inner_dim, self.num_attention_heads, self.attention_head_dim,
                                      cross_attention_dim=self.cross_attention_dim,
                                      upcast_attention=self.upcast_attention,
                                      only_cross_attention=self.only_cross_attention,
                                      attention_kernel=self.attention_kernel, dtype=self.dtype,
                                      name=f"transformer_blocks_{i}")(x, context)
        x = proj_out(x.reshape(b, h, w, inner_dim))
        return x + residual

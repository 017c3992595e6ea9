"""Attention: the one function every network attends through, and diffusers' `Attention` block.

Layout convention: tokens are [batch, length, channels]; heads are split as [batch, length, heads, head_dim],
the layout `jax.nn.dot_product_attention` takes, so GPU/TPU get their fused kernels.

The implementation is a module field (`attention_kernel` on every model), one of ATTENTION_KERNELS:
  "auto"   (default) "einsum" on CPU, "xla" elsewhere, chosen for the platform the program is compiled
           for (`lax.platform_dependent`), not the process's default backend;
  "einsum" explicit heads-major einsums + softmax (also used whenever probabilities are asked for);
  "xla"    `jax.nn.dot_product_attention` (XLA picks its fused kernel);
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention (GPU only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..errors import ConfigError

# Collection name under which cross-attention layers `sow` their head-averaged attention probabilities.
# Apply with `mutable=[ATTENTION_PROBS]` to get them; without it the fused path runs and nothing is kept.
ATTENTION_PROBS = "attention_probs"


ATTENTION_KERNELS = ("auto", "einsum", "xla", "cudnn")


def check_kernel(value, allowed, field: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def dot_product_attention(q, k, v, *, mask=None, is_causal=False, scale=None, upcast=False, return_probs=False,
                          kernel: str = "auto"):
    """softmax(q k^T * scale [+ mask]) v over [B, T, N, H] inputs.

    mask: boolean, broadcastable to [B, N, Tq, Tk], True = attend.
    upcast: compute scores and softmax in float32 (diffusers' `upcast_attention`, SD 2.1).
    return_probs: also return the probabilities [B, N, Tq, Tk] (float32); uses the explicit
        einsum path whatever the kernel.
    kernel: one of ATTENTION_KERNELS (see the module's docstring).
    """
    check_kernel(kernel, ATTENTION_KERNELS, "attention_kernel")
    out_dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if return_probs or kernel == "einsum":
        return _einsum_attention(q, k, v, mask, is_causal, scale, out_dtype, return_probs)
    if upcast:
        v = v.astype(jnp.float32)

    def fused(q, k, v, implementation=None):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                           implementation=implementation)
        return out.astype(out_dtype)

    if kernel == "xla":
        return fused(q, k, v)
    if kernel == "cudnn":
        return fused(q, k, v, implementation="cudnn")
    # "auto": decided when the program is lowered for its platform. On CPU the fused call is XLA's
    # reference implementation, which contracts [B, T, N, H] operands whose batch dims (B, N) are not
    # leading; XLA:CPU runs that several times slower than heads-major batched matmuls (bench/unet.py:
    # ~10x on the tiny UNet's 1024-token self-attention, see BENCHMARKS.md).
    return jax.lax.platform_dependent(
        q, k, v, cpu=lambda q, k, v: _einsum_attention(q, k, v, mask, is_causal, scale, out_dtype, False),
        default=fused)


def _einsum_attention(q, k, v, mask, is_causal, scale, out_dtype, return_probs):
    """Explicit path, heads-major: [B, N, T, H], so both matmuls have leading batch dims (B, N)."""
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    scores = jnp.einsum("bnqh,bnkh->bnqk", q, k).astype(jnp.float32) * scale
    if is_causal:
        tq, tk = scores.shape[-2:]
        causal = jnp.tril(jnp.ones((tq, tk), dtype=bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.swapaxes(jnp.einsum("bnqk,bnkh->bnqh", probs.astype(v.dtype), v), 1, 2).astype(out_dtype)
    return (out, probs) if return_probs else out


class Attention(nn.Module):
    """diffusers' `Attention`: to_q / to_k / to_v / to_out.0 (torch names), optional GroupNorm and residual.

    Used as self- and cross-attention in the UNet's transformer blocks, and (with `norm_num_groups`,
    `residual_connection`, biases on q/k/v) as the VAE's spatial self-attention.
    Input is [B, L, C] or [B, H, W, C] (spatial input is flattened and restored).
    """

    query_dim: int
    heads: int = 8
    dim_head: int = 64
    cross_attention_dim: int | None = None
    bias: bool = False  # bias on to_q/to_k/to_v
    upcast_attention: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    sow_probs: bool = False  # sow head-averaged probs into ATTENTION_PROBS when that collection is mutable
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states=None):
        residual = hidden_states
        spatial_shape = None
        if hidden_states.ndim == 4:
            b, h, w, c = hidden_states.shape
            spatial_shape = (b, h, w, c)
            hidden_states = hidden_states.reshape(b, h * w, c)
        if self.norm_num_groups is not None:
            hidden_states = nn.GroupNorm(
                num_groups=self.norm_num_groups, epsilon=self.norm_eps, use_fast_variance=False,
                dtype=self.dtype, name="group_norm",
            )(hidden_states)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        inner = self.heads * self.dim_head
        q = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_q")(hidden_states)
        k = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_v")(context)
        split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)
        q, k, v = split(q), split(k), split(v)

        want_probs = self.sow_probs and self.is_mutable_collection(ATTENTION_PROBS)
        if want_probs:
            out, probs = dot_product_attention(q, k, v, upcast=self.upcast_attention, return_probs=True)
            self.sow(ATTENTION_PROBS, "probs", probs.mean(axis=1))  # [B, Tq, Tk], averaged over heads
        else:
            out = dot_product_attention(q, k, v, upcast=self.upcast_attention, kernel=self.attention_kernel)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        out = nn.Dense(self.query_dim, dtype=self.dtype, name="to_out_0")(out)

        if spatial_shape is not None:
            out = out.reshape(spatial_shape)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

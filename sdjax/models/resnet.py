"""Convolutional blocks shared by the UNet and the VAE (NHWC): ResnetBlock2D, Downsample2D, Upsample2D.

Submodule names are diffusers' PyTorch names, so weight conversion is a table of generic rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def group_norm(num_groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    # use_fast_variance=False: E[(x-mean)^2], as torch computes it, not E[x^2]-mean^2.
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


# How 3x3 convolutions run: a module field (`conv_kernel` on the UNet and the VAE), one of CONV_KERNELS:
#   "auto"   (default) "matmul" in programs compiled for CPU, "xla" elsewhere (`lax.platform_dependent`);
#   "xla"    `lax.conv_general_dilated` always;
#   "matmul" outputs of at most SMALL_CONV_PIXELS pixels as one matmul over the 3x3 patches (im2col).
CONV_KERNELS = ("auto", "xla", "matmul")
# Outputs of at most this many pixels are computed as one matmul by the "matmul" kernel.
SMALL_CONV_PIXELS = 64


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: int | None = None,
         conv_kernel: str = "auto", zero_init: bool = False) -> nn.Conv:
    """zero_init: kernel and bias start at zero (a ControlNet's "zero convolutions", diffusers' zero_module)."""
    pad = kernel // 2 if padding is None else padding
    inits = dict(kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init()) if zero_init else {}
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, name=name, conv_general_dilated=CONV_FUNCTIONS[conv_kernel], **inits)


def _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, **kwargs):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def _matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`, except for small NHWC outputs: patches @ kernel, one matmul.

    XLA:CPU runs a 3x3 convolution whose input is smaller than its window (SD's 2x2 deepest level at
    128x128) by swapping the operands and reversing the kernel: 85 ms instead of 2 ms for
    [2, 2, 2, 1280] -> 1280 channels, and up to 3x slower than a matmul up to 8x8 outputs
    (bench/conv.py, BENCHMARKS.md). The matmul computes the same sum in another order (~1e-7 relative).
    """
    out = _conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, precision)
    if out is not None:
        return out
    return _xla_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, precision, **kwargs)


def _auto_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, precision=None, **kwargs):
    """"matmul" where the program is compiled for CPU, "xla" on GPU/TPU (only that branch is compiled)."""
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision)
    if _matmul_output_size(lhs, rhs, *args[:-1]) is None:  # not a small conv: no choice to make
        return _xla_conv(lhs, rhs, *args, **kwargs)
    return lax.platform_dependent(lhs, rhs, cpu=lambda a, b: _matmul_conv(a, b, *args, **kwargs),
                                  default=lambda a, b: _xla_conv(a, b, *args, **kwargs))


CONV_FUNCTIONS = {"auto": _auto_conv, "xla": _xla_conv, "matmul": _matmul_conv}


def _matmul_output_size(x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    """(Ho, Wo) when the convolution is a small NHWC/HWIO one that the matmul form serves; else None."""
    if groups != 1 or x.ndim != 4 or isinstance(padding, str):
        return None
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return None
    nhwc = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    if lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers) != nhwc:
        return None
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    h, w = x.shape[1:3]
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    if kh * kw == 1 or ho * wo > SMALL_CONV_PIXELS:
        return None
    return ho, wo


def _conv_as_matmul(x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, precision):
    """The im2col form of an NHWC/HWIO convolution when it applies and pays off; else None."""
    size = _matmul_output_size(x, kernel, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups)
    if size is None:
        return None
    ho, wo = size
    kh, kw, cin, cout = kernel.shape
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    b = x.shape[0]
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1)  # [B, Ho, Wo, kh*kw*Cin], (i, j, c) order = the kernel's HWI order
    out = jnp.dot(patches.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), precision=precision)
    return out.reshape(b, ho, wo, cout)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> conv, plus the skip."""

    in_channels: int
    out_channels: int | None = None
    temb_channels: int | None = 1280  # None: no time embedding (the VAE)
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        out_channels = self.out_channels or self.in_channels
        h = group_norm(self.groups, self.eps, self.dtype, "norm1")(x)
        h = nn.silu(h)
        h = conv(out_channels, 3, self.dtype, "conv1", conv_kernel=self.conv_kernel)(h)
        if self.temb_channels is not None:
            t = nn.Dense(out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h)
        h = nn.silu(h)
        h = conv(out_channels, 3, self.dtype, "conv2", conv_kernel=self.conv_kernel)(h)
        if self.in_channels != out_channels:
            x = conv(out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 in the UNet; padding=0 in the VAE, which pads (0, 1) on H and W first."""

    out_channels: int
    padding: int = 1
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding,
                    conv_kernel=self.conv_kernel)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv.

    output_size (H, W): resize to that size instead of 2x. The UNet passes it when the latent size is not a
    multiple of 2**num_upsamplers (e.g. 65 -> 33 on the way down, so 33 -> 65 on the way up), as diffusers'
    `F.interpolate(size=...)` does; nearest picks source index floor(i * in / out).
    """

    out_channels: int
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size=None):
        h, w = x.shape[1:3]
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            out_h, out_w = output_size
            x = x[:, (jnp.arange(out_h) * h) // out_h]
            x = x[:, :, (jnp.arange(out_w) * w) // out_w]
        return conv(self.out_channels, 3, self.dtype, "conv", conv_kernel=self.conv_kernel)(x)

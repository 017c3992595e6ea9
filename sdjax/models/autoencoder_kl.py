"""`AutoencoderKL`: the Stable Diffusion VAE (diffusers' `models/autoencoders/autoencoder_kl.py`) in Flax Linen.

    vae, params = AutoencoderKL.from_pretrained("path/or/repo", subfolder="vae")
    posterior = vae.apply({"params": params}, images, method=vae.encode)        # images [B, 3, H, W] in [-1, 1]
    latents = posterior.sample(key) * vae.scaling_factor                         # [B, 4, H/8, W/8]
    images = vae.apply({"params": params}, latents / vae.scaling_factor, method=vae.decode)

Public layouts are NCHW like diffusers; the network runs NHWC. `encode`, `decode` and `__call__` are pure,
so they work under jit / vmap / lax.scan (the pipeline decodes trajectories in chunks).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..errors import ConfigError
from .modeling_utils import FlaxModelMixin
from .vae import Decoder, DiagonalGaussianDistribution, Encoder


def nchw_to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nn.Module, FlaxModelMixin):
    """VAE with a KL-regularised diagonal Gaussian posterior. Fields are diffusers' config keys and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Not config keys: how the program runs (see sdjax.models.attention / resnet). Same numbers either way.
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    # Options whose other values sdjax does not implement ("swish" is diffusers' alias of SiLU).
    _config_supported: ClassVar[dict] = {"act_fn": ("silu", "swish")}
    _positive_keys: ClassVar[tuple] = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                                       "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
                                       "latents_std")
    _optional_params: ClassVar[tuple] = ("quant_conv", "post_quant_conv")  # use_quant_conv / use_post_quant_conv
    # What only `encode` reads: `from_pretrained(..., skip=AutoencoderKL.ENCODER)` loads a VAE that decodes.
    ENCODER: ClassVar[tuple] = ("encoder", "quant_conv")
    # Old diffusers checkpoints (e.g. SD 1.5 on the hub, legacy Flax msgpack) name the VAE attention
    # query/key/value/proj_attn; very old ones store them as 1x1 convs (the loader squeezes [O, I, 1, 1]).
    _key_renames: ClassVar[tuple] = (
        (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    )

    def __post_init__(self):
        self._check_types()
        # Lists from a JSON config become tuples (hashable, like the defaults).
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size",
                     "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        n = len(self.block_out_channels)
        for key, value, allowed in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                    ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            bad = [v for v in value if v != allowed]
            if bad:
                raise ConfigError(f"AutoencoderKL: config key {key!r} = {list(value)!r} is not supported "
                                  f"(supported: only {allowed!r} blocks)")
            if len(value) != n:
                raise ConfigError(f"AutoencoderKL: config key {key!r} has {len(value)} entries but "
                                  f"block_out_channels has {n}")
        if self.act_fn not in self._config_supported["act_fn"]:
            raise ConfigError(f"AutoencoderKL: config key 'act_fn' = {self.act_fn!r} is not supported "
                              f"(supported: 'silu', 'swish')")
        super().__post_init__()
        self._check_runtime()

    def setup(self):
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel, dtype=self.dtype)
        self.encoder = Encoder(in_channels=self.in_channels, out_channels=self.latent_channels,
                               down_block_types=self.down_block_types, double_z=True, **common)
        self.decoder = Decoder(in_channels=self.latent_channels, out_channels=self.out_channels,
                               up_block_types=self.up_block_types, **common)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        """Image size / latent size (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x) -> DiagonalGaussianDistribution:
        """Images [B, in_channels, H, W] -> posterior over latents [B, latent_channels, H/f, W/f]."""
        h = self.encoder(nchw_to_nhwc(x))
        if self.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussianDistribution.from_parameters(nhwc_to_nchw(h))

    def decode(self, z):
        """Latents [B, latent_channels, h, w] (unscaled: divide by scaling_factor first) -> images [B, C, h*f, w*f]."""
        h = nchw_to_nhwc(z)
        if self.use_post_quant_conv:
            h = self.post_quant_conv(h)
        return nhwc_to_nchw(self.decoder(h))

    def __call__(self, sample, sample_posterior: bool = False, key: jax.Array | None = None):
        """Encode, take the posterior's mode (or a sample drawn with `key`), decode: diffusers' `forward`."""
        posterior = self.encode(sample)
        if sample_posterior:
            if key is None:
                if not self.has_rng("sample"):
                    raise ValueError("AutoencoderKL: sample_posterior=True needs `key` (or rngs={'sample': key})")
                key = self.make_rng("sample")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)

    def dummy_inputs(self) -> tuple:
        """The smallest image the network takes (one latent pixel); init through it creates every param."""
        s = self.vae_scale_factor
        return (jnp.zeros((1, self.in_channels, s, s), jnp.float32),)

"""diffusers' `ControlNetModel` (SD 1.x / 2.x ControlNets) in Flax Linen.

    controlnet, cn_params = ControlNetModel.from_pretrained("path/to/controlnet")
    check_compatible(controlnet, unet)
    down, mid = controlnet.apply({"params": cn_params}, latents, t, text_embeddings, image,
                                 conditioning_scale=1.0, return_dict=False)
    eps = unet.apply({"params": unet_params}, latents, t, text_embeddings,
                     down_block_additional_residuals=down, mid_block_additional_residual=mid)

A ControlNet is a copy of the UNet's encoder (conv_in, time embedding, down blocks, mid block, shared with
the UNet through `UNetEncoderMixin`) whose input is the latents plus an embedding of the control image, and
whose outputs, one per UNet skip and one for the mid block, pass through 1x1 "zero convolutions" before the
UNet adds them. Inputs and outputs are NCHW like diffusers; the network runs in NHWC.
"""

from __future__ import annotations

import re
from typing import ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import convert
from ..errors import ConfigError, WeightsError
from .modeling_utils import FlaxModelMixin
from .resnet import conv
from .unet_2d_condition import UNet2DConditionModel, UNetEncoderMixin

# The encoder parts ControlNetModel.from_unet copies from the UNet (diffusers: conv_in, time_proj (no weights),
# time_embedding, down_blocks, mid_block); every other ControlNet weight is new.
_FROM_UNET = ("conv_in", "time_embedding", "mid_block")  # and down_blocks_<i>

# UNet config keys that ControlNetModel.from_unet copies (diffusers' from_unet, minus keys sdjax's UNet lacks).
_UNET_KEYS = (
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
    "addition_time_embed_dim", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
    "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type",
)


@flax.struct.dataclass
class ControlNetOutput:
    """down_block_res_samples: one NCHW array per UNet skip (`skip_channels()`); mid_block_res_sample: NCHW."""

    down_block_res_samples: tuple
    mid_block_res_sample: jax.Array


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (NHWC) -> features at the latent resolution: conv_in, then per step a 3x3 conv and a
    stride-2 3x3 conv (SiLU after each), then the zero-initialised conv_out to the UNet's first width.
    Torch names: conv_in, blocks.0 .. blocks.{2(n-1)-1}, conv_out."""

    conditioning_embedding_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        boc = self.block_out_channels
        x = nn.silu(conv(boc[0], 3, self.dtype, "conv_in", conv_kernel=self.conv_kernel)(x))
        for i in range(len(boc) - 1):
            x = nn.silu(conv(boc[i], 3, self.dtype, f"blocks_{2 * i}", conv_kernel=self.conv_kernel)(x))
            x = nn.silu(conv(boc[i + 1], 3, self.dtype, f"blocks_{2 * i + 1}", stride=2,
                             conv_kernel=self.conv_kernel)(x))
        return conv(self.conditioning_embedding_channels, 3, self.dtype, "conv_out", conv_kernel=self.conv_kernel,
                    zero_init=True)(x)


class ControlNetModel(nn.Module, FlaxModelMixin, UNetEncoderMixin):
    # Field names and defaults are diffusers' config keys (ControlNetModel.__init__). Unlike the UNet's,
    # layers_per_block and cross_attention_dim are single ints there.
    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # only read with addition_embed_type="text_time"
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None  # only read with class/addition embeddings
    controlnet_conditioning_channel_order: str = "rgb"
    # diffusers annotates `| None` but cannot build a model from None; refused by type here.
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64  # only read with addition_embed_type="text"
    # Not config keys: how the program runs (see sdjax.models.attention / resnet). Same numbers either way.
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    # Options whose non-default values (SDXL ControlNets' add embeddings, class labels, UNetMidBlock2D, ...)
    # are not implemented. Checked by FlaxModelMixin.from_config and again on construction (_check_config).
    _config_supported: ClassVar[dict] = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "act_fn": ("silu", "swish"),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "num_class_embeds": (None,),
        "resnet_time_scale_shift": ("default",),
        "controlnet_conditioning_channel_order": ("rgb", "bgr"),
    }

    _positive_keys: ClassVar[tuple] = (
        "in_channels", "conditioning_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
        "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
        "conditioning_embedding_out_channels", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
        "addition_embed_type_num_heads")

    # Legacy diffusers Flax ControlNets (FlaxControlNetModel's msgpack) name attention projections as the UNet's did.
    _key_renames: ClassVar[tuple] = UNet2DConditionModel._key_renames

    def __post_init__(self):
        self._check_types()
        # Lists (a JSON config, or a caller) become tuples: module fields must be hashable.
        for f in self.config_fields():
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(value))
        super().__post_init__()
        self._check_config()
        self._check_runtime()

    def _check_config(self):
        self._check_encoder_config()
        if not self.conditioning_embedding_out_channels:
            self._refuse("conditioning_embedding_out_channels", self.conditioning_embedding_out_channels,
                         "at least one width")

    def cond_downscale(self) -> int:
        """How many times larger than the latents the control image is: one stride-2 conv per width after the
        first in conditioning_embedding_out_channels (8 for SD's (16, 32, 96, 256): the VAE's factor)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def dummy_inputs(self) -> tuple:
        """Smallest inputs that reach every layer (one downsample per level): for `init` / eval_shape."""
        size = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, self.in_channels, size, size), jnp.float32)
        timesteps = jnp.zeros((1,), jnp.int32)
        encoder_hidden_states = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
        cond_size = size * self.cond_downscale()
        controlnet_cond = jnp.zeros((1, self.conditioning_channels, cond_size, cond_size), jnp.float32)
        return sample, timesteps, encoder_hidden_states, controlnet_cond

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, return_dict: bool = True):
        """sample [B, C, h, w] latents, timesteps scalar or [B], encoder_hidden_states [B, L, D], controlnet_cond
        [B, conditioning_channels, h * cond_downscale(), w * cond_downscale()] (the control image in [0, 1], as
        diffusers' pipelines prepare it) -> ControlNetOutput (or (down, mid) with return_dict=False), NCHW, in
        sample's dtype.

        conditioning_scale: multiplies every residual; a Python number or a traced scalar.
        guess_mode (static): scales the residuals from 0.1 (first skip) to 1.0 (mid block) log-spaced, times
        conditioning_scale, as diffusers does (not with global_pool_conditions).
        """
        out_dtype = sample.dtype
        if self.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = jnp.flip(controlnet_cond, axis=1)
        context = encoder_hidden_states

        # 1. time
        emb = self._time_embedding(timesteps, sample.shape[0])

        # 2. pre-process: the latents' conv_in plus the control image's embedding
        x = jnp.transpose(sample, (0, 2, 3, 1))  # NCHW -> NHWC
        x = conv(self.block_out_channels[0], 3, self.dtype, "conv_in", padding=1, conv_kernel=self.conv_kernel)(x)
        cond = ControlNetConditioningEmbedding(
            self.block_out_channels[0], self.conditioning_embedding_out_channels, conv_kernel=self.conv_kernel,
            dtype=self.dtype, name="controlnet_cond_embedding")(jnp.transpose(controlnet_cond, (0, 2, 3, 1)))
        if cond.shape[1:3] != x.shape[1:3]:
            raise ConfigError(
                f"ControlNetModel: controlnet_cond {tuple(controlnet_cond.shape)} embeds to {cond.shape[1]}x"
                f"{cond.shape[2]}, the latents {tuple(sample.shape)} are {x.shape[1]}x{x.shape[2]}: the control "
                f"image must be {self.cond_downscale()} times the latent size (conditioning_embedding_out_channels"
                f" = {self.conditioning_embedding_out_channels})")
        x = x + cond

        # 3. down, 4. mid: the UNet's encoder
        x, skips = self._down(x, emb, context)
        x = self._mid(x, emb, context)

        # 5. zero convolutions, one per skip (torch: controlnet_down_blocks.i) and one for the mid block
        down = [conv(s.shape[-1], 1, self.dtype, f"controlnet_down_blocks_{i}", conv_kernel=self.conv_kernel,
                     zero_init=True)(s) for i, s in enumerate(skips)]
        mid = conv(x.shape[-1], 1, self.dtype, "controlnet_mid_block", conv_kernel=self.conv_kernel,
                   zero_init=True)(x)

        # 6. scaling, in diffusers' order of operations
        if guess_mode and not self.global_pool_conditions:
            scales = jnp.asarray(np.logspace(-1, 0, len(down) + 1), jnp.float32) * conditioning_scale
            down = [d * scales[i] for i, d in enumerate(down)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)

        def nchw(a):
            return jnp.transpose(a, (0, 3, 1, 2)).astype(out_dtype)

        down, mid = tuple(nchw(d) for d in down), nchw(mid)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    # ------------------------------------------------------------------ from a UNet
    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, unet_params: dict | None,
                  controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3, rng=None):
        """A new ControlNet for `unet`, as diffusers' `ControlNetModel.from_unet`: the UNet's encoder config,
        and (load_weights_from_unet) copies of its conv_in, time_embedding, down_blocks and mid_block weights;
        the zero convolutions (and the conditioning embedding's conv_out) are zero, the rest of the
        conditioning embedding is freshly initialised from `rng` (default PRNGKey(0)).

        Returns (controlnet, params): same dtype and kernel choices as `unet`, params in the dtype of
        unet_params. The copies are new buffers, so donating one model's params never deletes the other's.
        Without load_weights_from_unet, unet_params is not read and every weight is freshly initialised (float32).
        """
        # Keys diffusers' ControlNet does not have: its conv_in is 3x3 and its time embedding 4x the first width.
        if unet.conv_in_kernel != 3:
            raise ConfigError(f"ControlNetModel.from_unet: UNet config key 'conv_in_kernel' = {unet.conv_in_kernel!r}"
                              " has no ControlNet equivalent (a ControlNet's conv_in is 3x3)")
        if unet._time_embed_dim() != unet.block_out_channels[0] * 4:
            raise ConfigError(f"ControlNetModel.from_unet: UNet config key 'time_embedding_dim' = "
                              f"{unet.time_embedding_dim!r} has no ControlNet equivalent (a ControlNet's time "
                              f"embedding is 4 x block_out_channels[0] = {unet.block_out_channels[0] * 4} wide)")
        config = {key: getattr(unet, key) for key in _UNET_KEYS}
        config.update(controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                      conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
                      conditioning_channels=conditioning_channels)
        controlnet = cls.from_config(config, dtype=unet.dtype, attention_kernel=unet.attention_kernel,
                                     conv_kernel=unet.conv_kernel)
        rng = jax.random.PRNGKey(0) if rng is None else rng
        if not load_weights_from_unet:  # everything fresh (zero convolutions zero), as diffusers
            return controlnet, controlnet.init_weights(rng)

        expected = controlnet.param_shapes()
        copied = [k for k in expected if k in _FROM_UNET or re.fullmatch(r"down_blocks_\d+", k)]
        _check_shapes({k: unet_params.get(k) for k in copied}, {k: expected[k] for k in copied})
        param_dtype = jnp.asarray(unet_params["conv_in"]["kernel"]).dtype
        # jnp.array copies: new buffers, never the UNet's
        params = {k: jax.tree_util.tree_map(lambda a: jnp.array(a, param_dtype), unet_params[k]) for k in copied}
        embedding = ControlNetConditioningEmbedding(
            controlnet.block_out_channels[0], controlnet.conditioning_embedding_out_channels,
            conv_kernel=controlnet.conv_kernel)
        size = controlnet.cond_downscale()
        params["controlnet_cond_embedding"] = jax.tree_util.tree_map(
            lambda a: a.astype(param_dtype),
            embedding.init(rng, jnp.zeros((1, size, size, conditioning_channels)))["params"])
        for k, shapes in expected.items():  # the zero convolutions
            if k not in params:
                params[k] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, param_dtype), shapes)
        return controlnet, params


def _check_shapes(params: dict, expected: dict) -> None:
    """The UNet params that from_unet copies have the shapes the ControlNet needs (else WeightsError listing them)."""
    have = convert.flat_params({k: v for k, v in params.items() if v is not None})
    want = convert.flat_params(expected)
    bad = [f"{'/'.join(p)}: {'missing' if p not in have else tuple(np.shape(have[p]))} vs {tuple(want[p].shape)}"
           for p in want if p not in have or tuple(np.shape(have[p])) != tuple(want[p].shape)]
    if bad:
        raise WeightsError(f"ControlNetModel.from_unet: unet_params do not match the UNet's config ({len(bad)} "
                           f"params, got vs expected): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")


def check_compatible(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Raise ConfigError unless `controlnet`'s residuals fit `unet`: the same latent channels, cross-attention
    width (both read the same text embeddings) and down-path layout (one residual per UNet skip, channel
    for channel). The message names both models' values."""
    problems = []
    if controlnet.in_channels != unet.in_channels:
        problems.append(f"in_channels {controlnet.in_channels} (ControlNet) vs {unet.in_channels} (UNet)")
    unet_cross = unet._cross_dims()[0]
    if controlnet.cross_attention_dim != unet_cross:
        problems.append(f"cross_attention_dim {controlnet.cross_attention_dim} (ControlNet) vs {unet_cross} (UNet)")
    cn_skips, unet_skips = controlnet.skip_channels(), unet.skip_channels()
    if cn_skips != unet_skips:
        problems.append(
            f"down-path layout: the ControlNet (block_out_channels {controlnet.block_out_channels}, layers_per_block "
            f"{controlnet.layers_per_block}) gives {len(cn_skips)} residuals of channels {cn_skips}, the UNet "
            f"(block_out_channels {unet.block_out_channels}, layers_per_block {unet.layers_per_block}) has "
            f"{len(unet_skips)} skips of channels {unet_skips}")
    if problems:
        raise ConfigError("ControlNetModel does not fit UNet2DConditionModel: " + "; ".join(problems))

"""diffusers' `UNet2DConditionModel` (SD 1.x / 2.x / SDXL and any smaller config of the same family) in Flax Linen.

    unet, params = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    eps = unet.apply({"params": params}, latents_nchw, t, text_embeddings)
    # SDXL (addition_embed_type="text_time"): the pooled text embedding and the size/crop conditioning
    eps = unet.apply({"params": params}, latents_nchw, t, text_embeddings,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})  # [B, D], [B, n]
    # class labels (num_class_embeds; the SD x4 upscaler's noise level): int [B]
    eps = unet.apply({"params": params}, latents_nchw, t, text_embeddings, class_labels=noise_level)

Inputs and output are NCHW like diffusers; the network runs in NHWC (what XLA's convolutions want).
Cross-attention maps: `unet.apply(..., mutable=["attention_probs"])` returns (eps, {"attention_probs": ...}).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import flax.linen as nn

from ..errors import ConfigError
from .embeddings import TimestepEmbedding, get_timestep_embedding
from .modeling_utils import FlaxModelMixin
from .resnet import conv, group_norm
from .unet_2d_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
                             UpBlock2D)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, n: int, key: str, owner: str = "UNet2DConditionModel") -> tuple:
    """An int (or bool) for every block, or one value per block."""
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"{owner}: config key {key!r} = {value!r} needs one value per block ({n})")
        return tuple(value)
    return (value,) * n


def _add_residual(features, residual, what: str):
    """NHWC features + an NCHW residual. The residual may broadcast over H, W (a ControlNet with
    global_pool_conditions gives [B, C, 1, 1]); it is cast to the features' dtype so that a bf16 UNet stays bf16."""
    r = jnp.transpose(jnp.asarray(residual), (0, 2, 3, 1))  # NCHW -> NHWC
    try:
        fits = r.ndim == 4 and jnp.broadcast_shapes(features.shape, r.shape) == features.shape
    except ValueError:
        fits = False
    if not fits:
        nchw = lambda s: (s[0], s[3], s[1], s[2])  # noqa: E731
        raise ConfigError(f"UNet2DConditionModel: {what} has shape {tuple(jnp.shape(residual))}, the UNet's "
                          f"features there are {nchw(features.shape)} (NCHW)")
    return features + r.astype(features.dtype)


class UNetEncoderMixin:
    """The encoder half that UNet2DConditionModel and ControlNetModel share (diffusers builds both from the same
    config keys and ControlNetModel.from_unet copies these weights): the checks of the keys it reads, the time
    embedding, the down blocks and the mid block. Called from the models' compact `__call__`, so the
    submodules it creates belong to the model under the PyTorch names (`time_embedding`, `down_blocks_i`,
    `mid_block`). A plain mixin, not a Linen module: Flax wraps only a module class's own methods.
    """

    #: whether the model runs `only_cross_attention` blocks (the UNet does; the ControlNet refuses them, untested)
    _only_cross_attention_supported: ClassVar[bool] = False

    def _refuse(self, key, value, supported):
        raise ConfigError(f"{type(self).__name__}: config key {key!r} = {value!r} is not supported "
                          f"(supported: {supported})")

    def _check_block_types(self, key: str, types: tuple) -> None:
        value = tuple(getattr(self, key))
        n = len(self.block_out_channels)
        if len(value) != n:
            raise ConfigError(f"{type(self).__name__}: config key {key!r} = {value!r} needs one entry "
                              f"per block_out_channels ({n})")
        for t in value:
            if t not in types:
                self._refuse(key, value, f"tuples of {', '.join(types)}")

    def _check_encoder_config(self) -> None:
        """The unsupported values (`_config_supported`) and the keys the time embedding, down and mid blocks read."""
        for key, allowed in self._config_supported.items():
            value = getattr(self, key)
            if value not in allowed:
                self._refuse(key, value, ", ".join(repr(a) for a in allowed))
        self._check_block_types("down_block_types", DOWN_BLOCK_TYPES)
        if any(self._for_blocks("only_cross_attention")) and not self._only_cross_attention_supported:
            self._refuse("only_cross_attention", self.only_cross_attention, "False")
        if self.norm_num_groups is None:
            self._refuse("norm_num_groups", None, "an int")
        for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block"):
            for v in self._for_blocks(key):
                if not isinstance(v, int):  # e.g. SDXL-style nested transformer_layers_per_block
                    self._refuse(key, getattr(self, key), "an int or one int per block")
        if len(set(self._cross_dims())) != 1:  # one encoder_hidden_states feeds every block's attn2
            self._refuse("cross_attention_dim", self.cross_attention_dim, "one value for all blocks")
        if self.num_attention_heads is not None:
            self._for_blocks("num_attention_heads")

    # ------------------------------------------------------------------ config, resolved per block
    def _for_blocks(self, key: str, value=None) -> tuple:
        """Config key `key` (or `value` read under that name) for every block; errors name this model's class."""
        value = getattr(self, key) if value is None else value
        return _per_block(value, len(self.block_out_channels), key, type(self).__name__)

    def _heads(self) -> tuple:
        # diffusers' naming quirk: without num_attention_heads, `attention_head_dim` is the head *count*.
        return self._for_blocks("num_attention_heads", self.num_attention_heads or self.attention_head_dim)

    def _cross_dims(self) -> tuple:
        return self._for_blocks("cross_attention_dim")

    def _time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the down path's skips in order (conv_in's output, then every resnet/attention output and
        downsample of every block): what the up path consumes and what a ControlNet's residuals must match."""
        boc = self.block_out_channels
        layers = self._for_blocks("layers_per_block")
        out = [boc[0]]
        for i, c in enumerate(boc):
            out += [c] * (layers[i] + (i < len(boc) - 1))
        return tuple(out)

    # ------------------------------------------------------------------ forward pieces (NHWC)
    def _time_embedding(self, timesteps, batch: int):
        """Timesteps (scalar or [B], int or float) -> [batch, time_embed_dim]: sinusoids in float32, then the MLP."""
        timesteps = jnp.asarray(timesteps)
        timesteps = jnp.broadcast_to(timesteps.reshape(-1) if timesteps.ndim else timesteps, (batch,))
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        return TimestepEmbedding(self._time_embed_dim(), dtype=self.dtype, name="time_embedding")(t_emb)

    def _down(self, x, emb, context):
        """conv_in's output -> (lowest-resolution features, skips): every resnet/attention output and every
        downsample is a skip for the up path (and gets a ControlNet residual)."""
        n = len(self.block_out_channels)
        boc, heads, cross_dims = self.block_out_channels, self._heads(), self._cross_dims()
        layers = self._for_blocks("layers_per_block")
        tlayers = self._for_blocks("transformer_layers_per_block")
        skips = [x]
        for i, block_type in enumerate(self.down_block_types):
            common = dict(in_channels=boc[max(i - 1, 0)], out_channels=boc[i], temb_channels=self._time_embed_dim(),
                          num_layers=layers[i], resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups,
                          add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                          attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel, dtype=self.dtype,
                          name=f"down_blocks_{i}")
            if block_type == "CrossAttnDownBlock2D":
                x, block_skips = CrossAttnDownBlock2D(
                    **common, transformer_layers_per_block=tlayers[i], num_attention_heads=heads[i],
                    cross_attention_dim=cross_dims[i], use_linear_projection=self.use_linear_projection,
                    upcast_attention=self.upcast_attention,
                    only_cross_attention=self._for_blocks("only_cross_attention")[i])(x, emb, context)
            else:
                x, block_skips = DownBlock2D(**common)(x, emb)
            skips += block_skips
        return x, skips

    def _mid(self, x, emb, context):
        if self.mid_block_type is None:
            return x
        tlayers = self._for_blocks("transformer_layers_per_block")
        return UNetMidBlock2DCrossAttn(
            self.block_out_channels[-1], self._time_embed_dim(), transformer_layers_per_block=tlayers[-1],
            resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups, num_attention_heads=self._heads()[-1],
            output_scale_factor=self.mid_block_scale_factor, cross_attention_dim=self._cross_dims()[-1],
            use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
            attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel, dtype=self.dtype,
            name="mid_block")(x, emb, context)


class UNet2DConditionModel(nn.Module, FlaxModelMixin, UNetEncoderMixin):
    # Field names and defaults are diffusers' config keys (UNet2DConditionModel.__init__).
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False  # SDXL base's config.json has null (= False, as in diffusers)
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False  # only read by block types sdjax does not have
    resnet_out_scale_factor: float = 1.0  # idem
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # Width of add_embedding's input with addition_embed_type="text_time": text_embeds' width plus
    # addition_time_embed_dim per time id (SDXL base: 1280 + 6 * 256 = 2816; refiner: 1280 + 5 * 256 = 2560).
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64  # only read with addition_embed_type="text"
    # Not config keys: how the program runs (see sdjax.models.attention / resnet). Same numbers either way.
    attention_kernel: str = "auto"
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    # Options whose non-default values (class labels, GLIGEN, other addition embeddings, ...) are not implemented.
    # Checked by FlaxModelMixin.from_config and again on construction (_check_config).
    _config_supported: ClassVar[dict] = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
        "act_fn": ("silu", "swish"),
        "dual_cross_attention": (False,),
        "reverse_transformer_layers_per_block": (None,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "class_embed_type": (None,),  # with num_class_embeds: an nn.Embed of class labels (the x4 upscaler)
        "addition_embed_type": (None, "text_time"),  # text_time: SDXL
        "resnet_time_scale_shift": ("default",),
        "time_embedding_type": ("positional",),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "attention_type": ("default",),
        "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,),
    }

    _positive_keys: ClassVar[tuple] = (
        "in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
        "cross_attention_dim", "attention_head_dim", "num_attention_heads", "conv_in_kernel", "conv_out_kernel",
        "time_embedding_dim", "sample_size", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
        "num_class_embeds")

    # Legacy diffusers Flax checkpoints (diffusion_flax_model.msgpack) name the attention projections
    # query/key/value/proj_attn; everything else already has the PyTorch names.
    _key_renames: ClassVar[tuple] = (
        (r"\.(attn[12])\.query\.", r".\1.to_q."),
        (r"\.(attn[12])\.key\.", r".\1.to_k."),
        (r"\.(attn[12])\.value\.", r".\1.to_v."),
        (r"\.(attn[12])\.proj_attn\.", r".\1.to_out.0."),
    )

    def __post_init__(self):
        self._check_types()
        # Lists (a JSON config, or a caller) become tuples: module fields must be hashable.
        for f in self.config_fields():
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        super().__post_init__()
        self._check_config()
        self._check_runtime()

    def _check_config(self):
        self._check_encoder_config()
        self._check_block_types("up_block_types", UP_BLOCK_TYPES)

        if self.addition_embed_type == "text_time":
            # diffusers builds add_time_proj / add_embedding from these two; without them it fails obscurely.
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if getattr(self, key) is None:
                    raise ConfigError(f"UNet2DConditionModel: addition_embed_type 'text_time' needs config key "
                                      f"{key!r} (got None)")
            if self.projection_class_embeddings_input_dim < self.addition_time_embed_dim:
                raise ConfigError(
                    f"UNet2DConditionModel: projection_class_embeddings_input_dim "
                    f"{self.projection_class_embeddings_input_dim} is smaller than addition_time_embed_dim "
                    f"{self.addition_time_embed_dim}: it is text_embeds' width + addition_time_embed_dim per time id")

    def _time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    _only_cross_attention_supported: ClassVar[bool] = True

    def init_weights(self, rng) -> dict:
        kwargs = {} if self.num_class_embeds is None else {"class_labels": jnp.zeros((1,), jnp.int32)}
        return self.init(rng, *self.dummy_inputs(), **kwargs)["params"]

    def dummy_inputs(self) -> tuple:
        """Smallest inputs that reach every layer (one downsample per level): for `init` / eval_shape."""
        size = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, self.in_channels, size, size), jnp.float32)
        timesteps = jnp.zeros((1,), jnp.int32)
        encoder_hidden_states = jnp.zeros((1, 1, self._cross_dims()[0]), jnp.float32)
        if self.addition_embed_type != "text_time":
            return sample, timesteps, encoder_hidden_states
        # One time id; text_embeds take the rest of add_embedding's input width.
        text_width = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
        added_cond_kwargs = {"text_embeds": jnp.zeros((1, text_width), jnp.float32),
                             "time_ids": jnp.zeros((1, 1), jnp.float32)}
        return sample, timesteps, encoder_hidden_states, added_cond_kwargs

    def _class_embedding(self, class_labels, batch: int, time_embed_dim: int):
        """num_class_embeds with class_embed_type None: class_embedding(class_labels), added to the time embedding
        as diffusers does (its `get_class_embed`); the SD x4 upscaler passes the low-resolution image's noise level.
        Called from __call__'s compact scope."""
        if class_labels is None:
            raise ConfigError(f"UNet2DConditionModel: this UNet has num_class_embeds = {self.num_class_embeds}: "
                              "pass class_labels (int, scalar or [batch]; the x4 upscaler's noise_level)")
        labels = jnp.asarray(class_labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ConfigError(f"UNet2DConditionModel: class_labels must be integers, got {labels.dtype}")
        if labels.ndim > 1 or (labels.ndim == 1 and labels.shape[0] not in (1, batch)):
            raise ConfigError(f"UNet2DConditionModel: class_labels has shape {tuple(labels.shape)}; expected a "
                              f"scalar or one per sample ({batch},)")
        labels = jnp.broadcast_to(labels.reshape(-1) if labels.ndim else labels, (batch,))
        return nn.Embed(self.num_class_embeds, time_embed_dim, dtype=self.dtype, name="class_embedding")(labels)

    def _text_time_embedding(self, added_cond_kwargs, batch: int, time_embed_dim: int):
        """SDXL's addition to the time embedding: the sinusoids of each time id (original size, crop, target
        size or aesthetic score), flattened per sample and concatenated after text_embeds, through
        add_embedding (diffusers' `get_aug_embed`, "text_time"). Called from __call__'s compact scope."""
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ConfigError(
                "UNet2DConditionModel: addition_embed_type 'text_time' (SDXL) needs added_cond_kwargs="
                "{'text_embeds': [B, D], 'time_ids': [B, n]}; missing: " + ", ".join(repr(k) for k in missing))
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        # diffusers flattens time_ids and reshapes their sinusoids to [B, -1]: n ids per sample.
        n_ids = time_ids.size // batch
        width = text_embeds.shape[-1] + n_ids * self.addition_time_embed_dim if text_embeds.ndim == 2 else None
        if (text_embeds.shape[:1] != (batch,) or time_ids.size != n_ids * batch
                or width != self.projection_class_embeddings_input_dim):
            raise ConfigError(
                f"UNet2DConditionModel: added_cond_kwargs text_embeds {tuple(text_embeds.shape)} and time_ids "
                f"{tuple(time_ids.shape)} for a batch of {batch} give add_embedding an input of width {width} "
                f"(text width + time ids * addition_time_embed_dim {self.addition_time_embed_dim}); the config "
                f"says projection_class_embeddings_input_dim = {self.projection_class_embeddings_input_dim}")
        time_embeds = get_timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                             self.flip_sin_to_cos, self.freq_shift)  # add_time_proj (no params)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(batch, -1)], axis=-1)
        return TimestepEmbedding(time_embed_dim, dtype=self.dtype, name="add_embedding")(add_embeds)

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs: dict | None = None,
                 train: bool = False, down_block_additional_residuals=None, mid_block_additional_residual=None,
                 class_labels=None):
        """sample [B, C, H, W], timesteps scalar or [B] (int or float), encoder_hidden_states [B, L, D]
        -> noise prediction [B, out_channels, H, W] in sample's dtype.

        class_labels (int, scalar or [B]): required with num_class_embeds (the SD x4 upscaler's noise_level),
        ignored otherwise as in diffusers. Labels outside [0, num_class_embeds) give NaN (Flax's Embed fills).

        added_cond_kwargs {"text_embeds": [B, D'], "time_ids": [B, n]}: SDXL's micro-conditioning (only read, and
        required, with addition_embed_type "text_time"; ignored otherwise, as in diffusers).
        down_block_additional_residuals (one NCHW array per skip, `skip_channels()`) and
        mid_block_additional_residual (NCHW): a ControlNet's output, added as diffusers adds them, to the down
        path's skips and to the mid block's output. Both or neither (diffusers would silently ignore a lone mid
        residual and read lone down residuals as a T2I-Adapter's).
        """
        if train and self.dropout > 0:
            raise NotImplementedError("UNet2DConditionModel: dropout > 0 in training is not implemented")
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ConfigError("UNet2DConditionModel: pass both down_block_additional_residuals and "
                              "mid_block_additional_residual (a ControlNet's output), or neither")
        n = len(self.block_out_channels)
        boc = self.block_out_channels
        heads, cross_dims = self._heads(), self._cross_dims()
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        out_dtype = sample.dtype

        # 1. time (+ SDXL's text and size embedding)
        time_embed_dim = self._time_embed_dim()
        emb = self._time_embedding(timesteps, sample.shape[0])
        if self.num_class_embeds is not None:
            emb = emb + self._class_embedding(class_labels, sample.shape[0], time_embed_dim).astype(emb.dtype)
        if self.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, sample.shape[0], time_embed_dim)

        # 2. pre-process
        x = jnp.transpose(sample, (0, 2, 3, 1))  # NCHW -> NHWC
        if self.center_input_sample:
            x = 2 * x - 1.0
        kernels = dict(attention_kernel=self.attention_kernel, conv_kernel=self.conv_kernel)
        x = conv(boc[0], self.conv_in_kernel, self.dtype, "conv_in", padding=(self.conv_in_kernel - 1) // 2,
                 conv_kernel=self.conv_kernel)(x)
        context = encoder_hidden_states

        # 3. down
        x, skips = self._down(x, emb, context)
        if down_block_additional_residuals is not None:
            residuals = list(down_block_additional_residuals)
            if len(residuals) != len(skips):
                raise ConfigError(f"UNet2DConditionModel: down_block_additional_residuals has {len(residuals)} "
                                  f"arrays, the UNet has {len(skips)} skips (conv_in, every resnet/attention, every "
                                  f"downsample; channels {self.skip_channels()})")
            skips = [_add_residual(s, r, f"down_block_additional_residuals[{i}]")
                     for i, (s, r) in enumerate(zip(skips, residuals))]

        # 4. mid
        x = self._mid(x, emb, context)
        if mid_block_additional_residual is not None:
            x = _add_residual(x, mid_block_additional_residual, "mid_block_additional_residual")

        # 5. up, widths reversed. Each up block has one more resnet than its down block (it also eats the
        # downsample's skip). Upsampling targets the size of the next skip, so odd latent sizes work.
        rboc, rheads, rcross = boc[::-1], heads[::-1], cross_dims[::-1]
        rlayers, rtlayers = layers[::-1], tlayers[::-1]
        ronly_cross = self._for_blocks("only_cross_attention")[::-1]
        for i, block_type in enumerate(self.up_block_types):
            num_layers = rlayers[i] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            is_final = i == n - 1
            upsample_size = None if is_final else skips[-1].shape[1:3]
            common = dict(in_channels=rboc[min(i + 1, n - 1)], prev_output_channel=rboc[max(i - 1, 0)],
                          out_channels=rboc[i], temb_channels=time_embed_dim, num_layers=num_layers,
                          resnet_eps=self.norm_eps, resnet_groups=self.norm_num_groups, add_upsample=not is_final,
                          dtype=self.dtype, name=f"up_blocks_{i}", **kernels)
            if block_type == "CrossAttnUpBlock2D":
                x = CrossAttnUpBlock2D(
                    **common, transformer_layers_per_block=rtlayers[i], num_attention_heads=rheads[i],
                    cross_attention_dim=rcross[i], use_linear_projection=self.use_linear_projection,
                    upcast_attention=self.upcast_attention,
                    only_cross_attention=ronly_cross[i])(x, block_skips, emb, context, upsample_size)
            else:
                x = UpBlock2D(**common)(x, block_skips, emb, upsample_size)

        # 6. post-process
        x = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(x)
        x = nn.silu(x)
        x = conv(self.out_channels, self.conv_out_kernel, self.dtype, "conv_out",
                 padding=(self.conv_out_kernel - 1) // 2, conv_kernel=self.conv_kernel)(x)
        return jnp.transpose(x, (0, 3, 1, 2)).astype(out_dtype)  # NHWC -> NCHW

"""`CLIPTextModel`: transformers' CLIP text transformer (the `text_encoder/` of Stable Diffusion) in Flax Linen.

    text_encoder, params = CLIPTextModel.from_pretrained("path/or/repo", subfolder="text_encoder")
    out = text_encoder.apply({"params": params}, input_ids)          # input_ids [B, 77] int
    out.last_hidden_state   # [B, 77, D], after final_layer_norm: SD's conditioning
    out.pooler_output       # [B, D], the state at the EOS token

SD 1.x: OpenAI ViT-L/14 text tower (768 wide, 12 layers, quick_gelu). SD 2.x: OpenCLIP ViT-H text tower
(1024 wide, 23 layers, gelu). Pre-LN transformer with a causal mask, learned position embeddings.

Param names are transformers' PyTorch names without the `text_model.` prefix, list indices as suffixes:
`text_model.encoder.layers.3.self_attn.q_proj.weight` <-> `encoder/layers_3/self_attn/q_proj/kernel`.
Checkpoints with (transformers 4.x, every SD repo) and without (transformers 5 `save_pretrained`) the
prefix both load; `save_pretrained` writes it, which transformers 4 and 5 both load.

`CLIPTextModelWithProjection` (SDXL's `text_encoder_2`, OpenCLIP ViT-bigG: 1280 wide, 32 layers, gelu) is the
same text transformer as a `text_model` submodule plus `text_projection`, a Linear without bias:

    text_encoder_2, params = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    out = text_encoder_2.apply({"params": params}, input_ids, output_hidden_states=True)
    out.text_embeds         # [B, projection_dim]: text_projection(pooled EOS state), SDXL's pooled embedding
    out.hidden_states[-2]   # [B, 77, D], the penultimate layer's output: SDXL's conditioning

Its params keep the `text_model` level (`text_model/encoder/layers_3/...`, `text_projection/kernel`): both
transformers 4 (text_model = CLIPTextTransformer) and 5 (text_model = CLIPTextModel) save it as
`text_model.*` + `text_projection.weight`, so loading and saving need no renames.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from ..errors import ConfigError
from .attention import dot_product_attention
from .modeling_utils import FlaxModelMixin


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (transformers' `quick_gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the same functions. `gelu` is the exact erf GELU (torch's default);
# `gelu_new` and `gelu_pytorch_tanh` are both the tanh approximation.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@struct.dataclass
class CLIPTextModelOutput:
    """transformers' `BaseModelOutputWithPooling` (without attentions), as a pytree.

    last_hidden_state: [B, L, D], after final_layer_norm.
    pooler_output: [B, D], last_hidden_state at the EOS token of each sequence.
    hidden_states: None, or (embeddings output, layer 1 output, ..., layer N output), each [B, L, D]
        (before final_layer_norm), as transformers returns with `output_hidden_states=True`.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        length = input_ids.shape[-1]
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(length)[None, :])
        return tokens + positions


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        b, length, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(b, length, self.num_heads, head_dim)
        q, k, v = split(dense("q_proj")(x)), split(dense("k_proj")(x)), split(dense("v_proj")(x))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=head_dim ** -0.5,
                                    kernel=self.attention_kernel)
        return dense("out_proj")(out.reshape(b, length, self.hidden_size))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
        h = ln("layer_norm1")(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.attention_kernel, dtype=self.dtype,
                              name="self_attn")(h, mask)
        h = ln("layer_norm2")(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        """Returns (last output, (input, output of layer 1, ..., output of layer N))."""
        states = [x]
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.hidden_act,
                                 self.layer_norm_eps, self.attention_kernel, dtype=self.dtype,
                                 name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


@struct.dataclass
class CLIPTextModelWithProjectionOutput:
    """transformers' `CLIPTextModelOutput` (without attentions), as a pytree.

    text_embeds: [B, projection_dim], text_projection of the EOS state (the pooler output).
    last_hidden_state: [B, L, D], after final_layer_norm.
    hidden_states: None, or (embeddings output, layer 1 output, ..., layer N output) as in CLIPTextModelOutput.
    """

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


class _CLIPTextConfigModule(nn.Module, FlaxModelMixin):
    """The fields and checks both text models share. Fields are `CLIPTextConfig`'s keys with its defaults,
    plus `attention_kernel` and `dtype`."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512  # used only by CLIPTextModelWithProjection; kept for the config
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02  # training-only (init); kept for the config
    initializer_factor: float = 1.0  # training-only (init); kept for the config
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    attention_kernel: str = "auto"  # not a config key: see sdjax.models.attention
    dtype: jnp.dtype = jnp.float32

    _config_format: ClassVar[str] = "transformers"
    _positive_keys: ClassVar[tuple] = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "max_position_embeddings", "layer_norm_eps",
                                       "projection_dim")
    _config_supported: ClassVar[dict] = {
        "hidden_act": tuple(ACTIVATIONS),
        "dropout": (0.0, 0, None),  # transformers 4.x wrote this key; the text model never used it
    }
    _ignored_keys: ClassVar[tuple] = (r"(^|\.)embeddings\.position_ids$",)  # a buffer: arange(77)

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.eos_token_id, (list, tuple)):
            raise ConfigError(f"{name}: config key 'eos_token_id' = {list(self.eos_token_id)!r} is not "
                              "supported (supported: a single token id)")
        self._check_types()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{name}: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        super().__post_init__()
        self._check_runtime()

    def to_json_config(self) -> dict[str, Any]:
        cfg = super().to_json_config()
        return {"architectures": cfg.pop("architectures"), "model_type": "clip_text_model", **cfg}

    def dummy_inputs(self) -> tuple:
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),)


class CLIPTextModel(_CLIPTextConfigModule):
    """transformers' `CLIPTextModel`. Fields are `CLIPTextConfig`'s keys with its defaults, plus `dtype`."""

    # transformers 4.x (every SD repo on the hub) prefixes keys with `text_model.`; transformers 5 does not.
    _key_renames: ClassVar[tuple] = ((r"^text_model\.", ""),)
    # Saved with the prefix: transformers 4 needs it, transformers 5 strips it on load (PrefixChange).
    _save_prefix: ClassVar[str] = "text_model."

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                 train: bool = False) -> CLIPTextModelOutput:
        """input_ids [B, L] (L <= max_position_embeddings); attention_mask [B, L] (1 = token, 0 = padding)
        or None. The causal mask is always applied. `train` changes nothing (no dropout is implemented;
        attention_dropout > 0 with train=True is refused)."""
        if train and self.attention_dropout:
            raise NotImplementedError(f"CLIPTextModel: attention_dropout = {self.attention_dropout} in training "
                                      "is not implemented (the SD text encoders use 0.0)")
        input_ids = jnp.asarray(input_ids)
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        length = input_ids.shape[-1]
        if length > self.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {length} is longer than "
                             f"max_position_embeddings {self.max_position_embeddings}")

        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, dtype=self.dtype,
                               name="embeddings")(input_ids)
        mask = None
        if attention_mask is not None:  # [B, L] -> [B, 1, 1, L]: which keys each query may attend to
            mask = jnp.asarray(attention_mask).reshape(-1, length).astype(bool)[:, None, None, :]
        x, states = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size,
                                self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                                self.attention_kernel, dtype=self.dtype, name="encoder")(x, mask)
        last = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)

        if self.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): the EOS token is the highest id in the sequence.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # The first position of eos_token_id (pad may equal eos).
            eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextModelOutput(last_hidden_state=last, pooler_output=pooled,
                                   hidden_states=states if output_hidden_states else None)


class CLIPTextModelWithProjection(_CLIPTextConfigModule):
    """transformers' `CLIPTextModelWithProjection`: `text_model` (a CLIPTextModel) + `text_projection`
    (Linear hidden_size -> projection_dim, no bias) on its pooled EOS state. Same config keys as CLIPTextModel."""

    def __post_init__(self):
        if self.projection_dim is None:  # CLIPTextModel ignores it; here it is text_projection's width
            raise ConfigError("CLIPTextModelWithProjection: config key 'projection_dim' = None: expected an int "
                              "(the width of text_projection)")
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False,
                 train: bool = False) -> CLIPTextModelWithProjectionOutput:
        """input_ids [B, L], attention_mask [B, L] or None, as CLIPTextModel."""
        out = CLIPTextModel(**self.config, attention_kernel=self.attention_kernel, dtype=self.dtype,
                            name="text_model")(input_ids, attention_mask, output_hidden_states, train)
        text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                               name="text_projection")(out.pooler_output)
        return CLIPTextModelWithProjectionOutput(text_embeds=text_embeds, last_hidden_state=out.last_hidden_state,
                                                 hidden_states=out.hidden_states)

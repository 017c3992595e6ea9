"""A noise-conditional classifier p(y | x_t, t) on latents, for classifier guidance (Dhariwal & Nichol 2021).

    classifier, clf_params = NoiseClassifier.from_pretrained("sdjax/assets/toy-shapes-classifier")
    logits = classifier.apply({"params": clf_params}, noisy_latents, timesteps)   # [B, sum(num_labels)]
    labels = classifier.label_indices({"color": "red", "shape": "square"}, batch=4)  # [4, n_heads], -1: head unused
    logp = label_log_prob(logits, labels, classifier.num_labels)                   # [B]

The network is the UNet's encoder half without attention: conv_in, the same time embedding (sinusoids of t,
then `time_embedding` linear_1/linear_2), its DownBlock2D levels (ResnetBlock2D, stride-2 conv between levels), a
last GroupNorm + SiLU, spatial mean pooling and one Dense over every head's logits. Several label sets
("heads", e.g. color, shape and background) share the trunk; their logits are concatenated in head order.

Inputs are the scaled latents (x_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps, NCHW, the UNet's
alpha-space input) and training timesteps t (int or float, [B] or a scalar), as the classifier was trained
with the forward process of one noise schedule (`num_train_timesteps` of it; the betas are the training
script's). Labels are an int per head, NO_LABEL (-1) for a head that is not asked for.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError, InputError
from .embeddings import TimestepEmbedding, get_timestep_embedding
from .modeling_utils import FlaxModelMixin
from .resnet import conv, group_norm
from .unet_2d_blocks import DownBlock2D

#: the label index of a head that is not used (its log-probability is not part of log p(y | x_t))
NO_LABEL = -1
#: the word for NO_LABEL in label dicts and on the command line (`color=red,shape=none`)
NO_LABEL_NAME = "none"


class NoiseClassifier(nn.Module, FlaxModelMixin):
    # config keys (config.json)
    in_channels: int = 4
    sample_size: int = 8  # the latent size it was trained at (it is convolutional: any size runs)
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # the time sinusoids as Stable Diffusion's UNet has them
    freq_shift: int = 0
    num_train_timesteps: int = 1000  # t runs over [0, num_train_timesteps)
    heads: tuple[str, ...] = ("label",)  # names of the label sets, e.g. ("color", "shape", "background")
    num_labels: tuple[int, ...] = (2,)  # labels per head
    label_names: tuple[str, ...] = ("0", "1")  # every head's label names, in head order (sum(num_labels))
    # not config keys: how the program runs
    conv_kernel: str = "auto"
    dtype: jnp.dtype = jnp.float32

    _positive_keys: ClassVar[tuple] = ("in_channels", "sample_size", "block_out_channels", "layers_per_block",
                                       "norm_num_groups", "norm_eps", "num_train_timesteps", "num_labels")

    def __post_init__(self):
        self._check_types()
        for f in self.config_fields():  # lists (a JSON config) become tuples: module fields must be hashable
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(value))
        super().__post_init__()
        self._check_config()
        self._check_runtime()

    def _check_config(self) -> None:
        name = type(self).__name__
        if not self.heads:
            raise ConfigError(f"{name}: config key 'heads' is empty: give at least one head")
        if len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"{name}: config key 'heads' = {list(self.heads)} names a head twice")
        if len(self.num_labels) != len(self.heads):
            raise ConfigError(f"{name}: config key 'num_labels' = {list(self.num_labels)} has {len(self.num_labels)} "
                              f"entries for {len(self.heads)} heads {list(self.heads)}")
        if len(self.label_names) != sum(self.num_labels):
            raise ConfigError(f"{name}: config key 'label_names' has {len(self.label_names)} names; num_labels "
                              f"{list(self.num_labels)} needs {sum(self.num_labels)}")
        for head, names in self.head_labels().items():
            for word in (head, *names):
                if not word or word != word.strip() or any(c in word for c in ",="):
                    raise ConfigError(f"{name}: head or label name {word!r} must be a non-empty word without "
                                      "',' or '=' (they separate `head=label` pairs)")
            if NO_LABEL_NAME in names:
                raise ConfigError(f"{name}: head {head!r} has a label called {NO_LABEL_NAME!r}, which means "
                                  "'head not used'")
            if len(set(names)) != len(names):
                raise ConfigError(f"{name}: head {head!r} names a label twice: {list(names)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"{name}: block_out_channels {list(self.block_out_channels)} must be multiples "
                                  f"of norm_num_groups ({self.norm_num_groups})")

    # ------------------------------------------------------------------ labels (host side, no params)
    def head_labels(self) -> dict[str, tuple[str, ...]]:
        """{head: its label names} in head order."""
        out, start = {}, 0
        for head, n in zip(self.heads, self.num_labels):
            out[head] = tuple(self.label_names[start:start + n])
            start += n
        return out

    def label_indices(self, labels, batch: int | None = None) -> np.ndarray:
        """Label names -> int32 [B, n_heads] (NO_LABEL for a head not named, or named "none").

        labels: {head: label name or index}, used for all `batch` samples (default 1), or a list of such
            dicts, one per sample. Unknown heads or labels raise InputError naming them and what exists."""
        rows = [labels] * (1 if batch is None else batch) if isinstance(labels, dict) else labels
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"labels must be a dict {{head: label}} or a list of them, got {type(labels).__name__}")
        if batch is not None and len(rows) != batch:
            raise InputError(f"{len(rows)} label dicts for a batch of {batch}")
        table = self.head_labels()
        out = np.full((len(rows), len(self.heads)), NO_LABEL, np.int32)
        for b, row in enumerate(rows):
            unknown = [h for h in row if h not in table]
            if unknown:
                raise InputError(f"unknown classifier head(s) {', '.join(map(repr, unknown))}; the classifier's "
                                 f"heads: {', '.join(self.heads)}")
            for h, value in row.items():
                k = self.heads.index(h)
                names = table[h]
                if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                    if not NO_LABEL <= value < len(names):
                        raise InputError(f"label index {value} of head {h!r} is outside [-1, {len(names)})")
                    out[b, k] = value
                elif value == NO_LABEL_NAME or value is None:
                    out[b, k] = NO_LABEL
                elif value in names:
                    out[b, k] = names.index(value)
                else:
                    raise InputError(f"unknown label {value!r} for head {h!r}; its labels: {', '.join(names)} "
                                     f"(or {NO_LABEL_NAME})")
        return out

    def label_dict(self, indices) -> dict[str, str]:
        """One row of label indices -> {head: name} for the heads used."""
        table = self.head_labels()
        return {h: table[h][int(i)] for h, i in zip(self.heads, np.asarray(indices)) if int(i) != NO_LABEL}

    # ------------------------------------------------------------------ the network
    def dummy_inputs(self) -> tuple:
        size = 2 ** (len(self.block_out_channels) - 1)
        return jnp.zeros((1, self.in_channels, size, size), jnp.float32), jnp.zeros((1,), jnp.int32)

    @nn.compact
    def __call__(self, sample, timesteps):
        """sample [B, C, h, w] (NCHW, alpha space), timesteps (scalar or [B]) -> logits [B, sum(num_labels)] float32."""
        b = sample.shape[0]
        t = jnp.asarray(timesteps)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (b,))
        boc = self.block_out_channels
        temb_dim = boc[0] * 4
        emb = get_timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift)
        emb = TimestepEmbedding(temb_dim, dtype=self.dtype, name="time_embedding")(emb)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        x = conv(boc[0], 3, self.dtype, "conv_in", conv_kernel=self.conv_kernel)(x)
        for i, c in enumerate(boc):  # the UNet's DownBlock2D: resnets_j, then downsamplers_0 between levels
            x, _ = DownBlock2D(boc[max(i - 1, 0)], c, temb_dim, self.layers_per_block, self.norm_eps,
                               self.norm_num_groups, add_downsample=i < len(boc) - 1, conv_kernel=self.conv_kernel,
                               dtype=self.dtype, name=f"down_blocks_{i}")(x, emb)
        x = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "norm_out")(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(sum(self.num_labels), dtype=self.dtype, name="classifier")(x).astype(jnp.float32)


def split_logits(logits, num_labels) -> list:
    """[B, sum(num_labels)] -> one [B, n] array per head."""
    bounds = np.cumsum(num_labels)[:-1].tolist()
    return jnp.split(logits, bounds, axis=-1)


def label_log_prob(logits, labels, num_labels):
    """sum over the heads used of log softmax(logits_head)[label_head]: [B] (0 for a row without labels).

    labels [B, n_heads] int (NO_LABEL: head unused)."""
    total = jnp.zeros(logits.shape[:-1], jnp.float32)
    for k, head_logits in enumerate(split_logits(logits, num_labels)):
        y = labels[..., k]
        logp = nn.log_softmax(head_logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(y, 0)[..., None], axis=-1)[..., 0]
        total = total + jnp.where(y == NO_LABEL, 0.0, picked)
    return total

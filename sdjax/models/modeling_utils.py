"""`FlaxModelMixin`: config.json + weights <-> (Flax module, params), the way diffusers' Flax models worked.

    unet, params = UNet2DConditionModel.from_pretrained("path/or/repo", subfolder="unet", dtype=jnp.bfloat16)
    unet.save_pretrained("out/unet", params)   # diffusers' PyTorch from_pretrained loads this

A model class is a Flax module whose dataclass fields are its config keys. It declares:
  _config_supported  {key: allowed values} for options sdjax does not implement (others are refused)
  _key_renames       (regex, replacement) applied to PyTorch keys before the generic rules (sdjax.convert)
  _ignored_keys      regexes of PyTorch keys that are buffers, not parameters
  _save_prefix       prefix for keys on save (the text encoder's "text_model.")
  _config_format     "diffusers" or "transformers" (what config.json and the weights file are called)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
import typing
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import convert
from ..errors import ConfigError, WeightsError
from ..hub import resolve_folder
from .attention import ATTENTION_KERNELS, check_kernel
from .resnet import CONV_KERNELS
from ..validation import check_fields, check_value
from ..io import LOAD_THREADS, SafetensorsFiles, listing, read_json, release_free_host_memory, write_json, write_safetensors

logger = logging.getLogger(__name__)

# Keys every diffusers/transformers config carries that say nothing about the architecture.
BOOKKEEPING_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "architectures",
    "model_type", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset",
    "return_dict", "output_hidden_states", "output_attentions", "use_return_dict", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings", "problem_type",
})

# Module fields that are not config keys: how the program runs (compute dtype, kernel choices).
RUNTIME_FIELDS = ("dtype", "attention_kernel", "conv_kernel")
DIFFUSERS_VERSION = "0.35.0"  # written into saved configs: the format version we produce
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
MAX_LISTED = 20


class FlaxModelMixin:
    _config_supported: ClassVar[dict[str, tuple]] = {}
    _key_renames: ClassVar[tuple] = ()
    _ignored_keys: ClassVar[tuple] = ()
    _optional_params: ClassVar[tuple] = ()  # top-level submodules a config can leave out (skip= may name them)
    _save_prefix: ClassVar[str] = ""
    _config_format: ClassVar[str] = "diffusers"
    _positive_keys: ClassVar[tuple] = ()  # config keys whose numbers (or every number in the list) must be > 0

    # ------------------------------------------------------------------ config
    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name") + RUNTIME_FIELDS}

    @classmethod
    def runtime_fields(cls) -> tuple[str, ...]:
        """The fields that say how the program runs, not what it computes: dtype and the kernel choices."""
        names = {f.name for f in dataclasses.fields(cls)}
        return tuple(n for n in RUNTIME_FIELDS if n in names)

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype=jnp.float32, source: str | None = None, **runtime):
        """Build the module from a config dict. Unsupported values raise ConfigError naming the key.

        runtime: the module's kernel choices (`attention_kernel`, `conv_kernel`), which are not config keys."""
        where = f" in {source}" if source else ""
        fields = cls.config_fields()
        hints = cls.config_types()
        check_fields(cls.__name__, {k: v for k, v in config.items() if k in fields}, hints, source)
        kwargs = {}
        for key, value in config.items():
            if key in cls._config_supported:
                allowed = cls._config_supported[key]
                if _normalize(value) not in [_normalize(a) for a in allowed]:
                    raise ConfigError(
                        f"{cls.__name__}: config key {key!r} = {value!r}{where} is not supported "
                        f"(supported: {', '.join(repr(a) for a in allowed)})"
                    )
            if key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key not in cls._config_supported and key not in BOOKKEEPING_KEYS:
                logger.debug("%s: ignoring config key %r%s", cls.__name__, key, where)
        unknown = [k for k in runtime if k not in cls.runtime_fields()]
        if unknown:
            raise TypeError(f"{cls.__name__}.from_config: unknown argument(s) {unknown}; "
                            f"runtime fields: {', '.join(cls.runtime_fields())}")
        try:
            return cls(**kwargs, dtype=dtype, **runtime)
        except ConfigError as e:
            if not source or source in str(e):
                raise
            raise ConfigError(f"{e} (in {source})") from None

    @classmethod
    def config_types(cls) -> dict[str, Any]:
        """The declared type of every config key (the dataclass annotations)."""
        return _type_hints(cls)

    def _check_types(self) -> None:
        """Every config field has its declared type, and numbers that must be positive are (the message names
        the key, the value and what was expected). Runs first in __post_init__, before any field is used."""
        name = type(self).__name__
        hints = self.config_types()
        for key in self.config_fields():
            value = getattr(self, key)
            check_value(name, key, value, hints[key])
            if key in self._positive_keys and not _all_positive(value):
                raise ConfigError(f"{name}: config key {key!r} = {value!r}: must be > 0")

    def _check_runtime(self) -> None:
        """Kernel choices are checked when the module is built (a typo would otherwise fail at compile time)."""
        for name, allowed in (("attention_kernel", ATTENTION_KERNELS), ("conv_kernel", CONV_KERNELS)):
            if name in self.runtime_fields():
                check_kernel(getattr(self, name), allowed, f"{type(self).__name__}.{name}")

    @classmethod
    def check_config_dict(cls, config: dict, source: str, filled: tuple = ()) -> None:
        """Check a partial config (e.g. a training config's `unet` dict) without building the model: every key
        is one of the model's (with a close match suggested), of its declared type; `filled` keys are set by
        the caller and may not be given."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected an object of {cls.__name__} config keys, got {type(config).__name__}")
        fields = cls.config_fields()
        for key in config:
            if key in filled:
                raise ConfigError(f"{source}: key {key!r} is filled in from the other models; remove it")
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: {key!r} is not a {cls.__name__} config key{hint}")
        check_fields(cls.__name__, config, cls.config_types(), source)
        for key in set(config) & set(cls._positive_keys):
            if not _all_positive(config[key]):
                raise ConfigError(f"{cls.__name__}: config key {key!r} = {config[key]!r} in {source}: must be > 0")

    @property
    def config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.config_fields()}

    def to_json_config(self) -> dict[str, Any]:
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()}
        if self._config_format == "transformers":
            return {"architectures": [type(self).__name__], **cfg}
        return {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION, **cfg}

    # ------------------------------------------------------------------ params
    def dummy_inputs(self) -> tuple:
        raise NotImplementedError

    def init_weights(self, rng) -> dict:
        return self.init(rng, *self.dummy_inputs())["params"]

    def param_shapes(self, skip: tuple[str, ...] = ()) -> dict:
        """The params tree as shapes, without allocating or computing anything; without the top-level
        submodules named in `skip` (each must be one: ConfigError otherwise)."""
        shapes = jax.eval_shape(self.init_weights, jax.random.PRNGKey(0))
        unknown = [name for name in skip if name not in shapes and name not in self._optional_params]
        if isinstance(skip, str) or unknown:
            raise ConfigError(f"{type(self).__name__}: skip={skip!r} names no submodule of its params "
                              f"(it has: {', '.join(shapes)})")
        return {name: tree for name, tree in shapes.items() if name not in skip}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, dtype=jnp.float32,
                        param_dtype=None, allow_pickle: bool = False, variant: str | None = None,
                        revision: str | None = None, check_finite: bool = True, abstract: bool = False,
                        skip: tuple[str, ...] = (), **runtime):
        """Load (module, params) from a diffusers/transformers folder or hub repo id.

        dtype: compute dtype. param_dtype: dtype of the returned params (default: dtype).
        allow_pickle: also read pickled `.bin` weights (with torch.load(weights_only=True)); off by default.
        check_finite: refuse weights holding NaN or inf, naming the tensor (False skips that pass, for speed).
        abstract: read the config only and return params as `jax.ShapeDtypeStruct`s (the weights file is found,
            not read): for compiling a program before the weights are in memory (`pipe.lower`).
        skip: top-level submodules whose weights are not read (they are absent from the params, and their
            tensors in the file are passed over unread), e.g. `AutoencoderKL.ENCODER` for a VAE that only decodes.
        runtime: kernel choices (`attention_kernel=`, `conv_kernel=`), see sdjax.models.attention / resnet.
        """
        folder = resolve_folder(pretrained_model_name_or_path, subfolder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise WeightsError(f"no config.json in {folder} (has: {listing(folder)})")
        config = read_json(config_path, error=WeightsError)
        model = cls.from_config(config, dtype=dtype, source=str(config_path), **runtime)
        param_dtype = dtype if param_dtype is None else param_dtype
        if abstract:
            find_weights(folder, allow_pickle=allow_pickle, variant=variant)  # a folder without weights fails now
            return model, jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype),
                                                 model.param_shapes(skip))
        params = model.load_params(folder, allow_pickle=allow_pickle, variant=variant, check_finite=check_finite,
                                   materialize=lambda x: jnp.asarray(x, dtype=param_dtype), skip=skip)
        return model, params

    def load_params(self, folder: Path, allow_pickle: bool = False, variant: str | None = None,
                    materialize=np.asarray, check_finite: bool = True, skip: tuple[str, ...] = ()) -> dict:
        """Read the weights in `folder` into a params tree for this module (strict).

        materialize: applied to each converted host array (from_pretrained: `jnp.asarray(x, dtype)`).
        skip: top-level submodules not read (see from_pretrained).
        Safetensors are read tensor by tensor on LOAD_THREADS threads, never all at once.
        """
        expected = self.param_shapes(skip)
        # The skipped submodules' tensors (PyTorch names start with the same name) are passed over unread.
        ignored = self._ignored_keys + tuple(rf"^{re.escape(name)}\." for name in skip)
        kind, files = find_weights(folder, allow_pickle=allow_pickle, variant=variant)
        if kind == "msgpack":
            tree = _read_msgpack(files[0])
            params, report = convert.legacy_flax_to_flax(tree, expected, self._key_renames, ignored,
                                                         check_finite=check_finite)
            params = jax.tree_util.tree_map(materialize, params)
        else:
            if kind == "safetensors":
                state = SafetensorsFiles(files)
            else:
                state = {}
                for f in files:
                    state.update(_read_pickle(f))
            params, report = convert.torch_to_flax(state, expected, self._key_renames, ignored,
                                                   materialize=materialize, max_workers=LOAD_THREADS,
                                                   check_finite=check_finite)
        release_free_host_memory()
        if not report.ok:
            raise WeightsError(_mismatch_message(type(self).__name__, files, report, n_expected=len(convert.flat_params(expected))))
        return params

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, params, safe_serialization: bool = True) -> None:
        """Write config.json + safetensors in PyTorch names and layouts (loadable by diffusers/transformers)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        tensors = convert.flax_to_torch(jax.device_get(params), prefix=self._save_prefix)
        weights_name = "model.safetensors" if self._config_format == "transformers" else "diffusion_pytorch_model.safetensors"
        write_safetensors(save_directory / weights_name, tensors)
        write_json(save_directory / "config.json", self.to_json_config())


def find_weights(folder: Path, allow_pickle: bool = False, variant: str | None = None):
    """Pick the weights file(s) in a folder: ('safetensors'|'msgpack'|'pickle', [paths])."""
    folder = Path(folder)
    v = f".{variant}" if variant else ""
    for base in ("diffusion_pytorch_model", "model"):
        single = folder / f"{base}{v}.safetensors"
        if single.is_file():
            return "safetensors", [single]
        index = folder / f"{base}{v}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, error=WeightsError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no 'weight_map' dict")
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                    raise WeightsError(f"{index}: weight_map entry {name!r} points outside {folder} "
                                       "(shards must be files in the model folder)")
                shards.append(folder / name)
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise WeightsError(f"{index} lists shards that are not in {folder}: {missing}")
            return "safetensors", shards
    for name in ("diffusion_flax_model.msgpack", "flax_model.msgpack"):
        if (folder / name).is_file():
            return "msgpack", [folder / name]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise WeightsError(
                f"{folder} has only pickled weights ({', '.join(p.name for p in pickles)}). Pickle files can run "
                "arbitrary code when loaded, so sdjax refuses them by default. If you trust this file, pass "
                "allow_pickle=True (it is then read with torch.load(weights_only=True), which needs torch), "
                "or convert it to safetensors."
            )
        return "pickle", pickles[:1] if len(pickles) == 1 else [p for p in pickles if "index" not in p.name]
    raise WeightsError(f"no weights found in {folder}: expected diffusion_pytorch_model.safetensors, "
                       f"model.safetensors, a sharded *.safetensors.index.json, or a Flax *.msgpack "
                       f"(has: {listing(folder)})")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading pickled weights {path} needs torch (pip install torch), "
                           "or convert the file to safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()
            if hasattr(v, "numpy")}


def _read_msgpack(path: Path) -> dict:
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(Path(path).read_bytes())
    except Exception as e:
        raise WeightsError(f"cannot read Flax msgpack {path}: {type(e).__name__}: {e}") from None
    return tree.get("params", tree) if isinstance(tree, dict) else tree


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _all_positive(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_all_positive(v) for v in value)
    return value > 0


def _normalize(v):
    return tuple(v) if isinstance(v, list) else v


def _mismatch_message(cls_name, files, report, n_expected) -> str:
    def listed(items):
        items = list(items)
        more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        return "".join(f"\n    {x}" for x in items[:MAX_LISTED]) + more

    src = ", ".join(str(f) for f in files)
    lines = [f"weights in {src} do not match {cls_name}:"]
    if len(report.missing) == n_expected:
        lines.append("  NONE of the model's parameters were found in the file: it was saved for another "
                     "architecture or with a key layout sdjax does not know. Refusing to continue with random weights.")
    if report.mismatched:
        lines.append(f"  {len(report.mismatched)} with the wrong shape (name: in file vs expected, PyTorch layout):"
                     + listed(f"{k}: {a} vs {b}" for k, a, b in report.mismatched))
    if report.wrong_dtype:
        lines.append(f"  {len(report.wrong_dtype)} of an integer or boolean dtype where the model has floats "
                     "(a file of another kind? sdjax never casts them silently):"
                     + listed(f"{k}: {d}" for k, d in report.wrong_dtype))
    if report.non_finite:
        lines.append(f"  {len(report.non_finite)} holding NaN or inf (a broken download or a diverged training run; "
                     "check_finite=False loads them anyway):" + listed(f"{k}: {n} non-finite values"
                                                                   for k, n in report.non_finite))
    if report.missing:
        lines.append(f"  {len(report.missing)} missing (the model needs them, the file lacks them):" + listed(report.missing))
    if report.unexpected:
        lines.append(f"  {len(report.unexpected)} unexpected (in the file, not used by the model):" + listed(report.unexpected))
    return "\n".join(lines)

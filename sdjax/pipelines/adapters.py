"""LoRA adapters and textual-inversion embeddings on a pipeline: diffusers' `load_lora_weights`, `set_adapters`,
`fuse_lora` / `unfuse_lora` and `load_textual_inversion`, in the modules-here / params-passed-in style.

    params = pipe.load_lora_weights("style.safetensors", params, adapter_name="style")   # diffusers/PEFT or Kohya
    params = pipe.load_lora_weights("subject/", params, adapter_name="subject")
    out = pipe(ids, params, key, lora_scale={"style": 0.6, "subject": {"unet": 1.0, "text_encoder": 0.5}})
    params = pipe.set_adapters(params, ["style"], [0.8])       # as diffusers: the adapters not named are off
    params = pipe.fuse_lora(params, lora_scale=0.8)            # baked into the weights ...
    params = pipe.unfuse_lora(params)                          # ... and taken out again
    pipe, params = pipe.load_textual_inversion("learned_embeds.safetensors", params, token="<cat-toy>")

What lives where in `params` (every entry a pytree of arrays, so `replicate`, `device_put` and orbax take it as is):
  params["lora"][name]        a `LoraAdapter`: merged into the weights inside the compiled program
                              (`merge_adapters`, at the top of `engine`'s traced function)
  params["lora_scale"][name]  {component: scale}: set by `set_adapters` / `lora_scale=`; an adapter or component
                              without one has 1.0 (diffusers' default weight)
  params["lora_fused"][name]  what `fuse_lora` baked in, for `unfuse_lora`; never passed to the program

Scales are traced numbers: each call passes a full {adapter: {component: float32}} tree, so changing a scale
never recompiles (the program depends on which adapters are loaded, their layers and ranks, not on the scales).
Params without adapters compile exactly as before.

As in diffusers, loading an adapter makes it the active one (the adapters loaded before it get scale 0) until
`set_adapters` names several. Differences, on purpose: `pipe(..., lora_scale=...)` changes the named adapters for
that call and leaves the others as set; an inactive adapter has scale 0, so `fuse_lora(adapter_names=[it])` bakes
in nothing until `set_adapters` names it (diffusers keeps an inactive adapter's last weight and fuses at that). `load_textual_inversion` returns a new pipeline (the text
encoder module's `vocab_size` grows and the tokenizer gains tokens; the old pipeline and its tokenizer are left
as they were) and the new params. Load adapters and embeddings before `replicate(params)` (jit=True).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import convert
from ..errors import AdapterError, InputError
from ..lora import COMPONENTS, LoraAdapter, load_lora, merge_lora
from ..textual_inversion import load_textual_inversion as _load_textual_inversion

ADAPTER_KEYS = ("lora", "lora_scale", "lora_fused")
# SDXL textual-inversion files: which embedding goes into which text encoder (CLIP ViT-L and OpenCLIP bigG)
SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


# ---------------------------------------------------------------------------------------------- traced
def merge_adapters(params):
    """The params the models run with: every adapter of params["lora"] merged at its params["lora_scale"]
    (traced); params without adapter entries are returned as they are (the same program as before)."""
    if not isinstance(params, Mapping) or not any(k in params for k in ADAPTER_KEYS):
        return params
    base = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
    adapters = params.get("lora") or {}
    if not adapters:
        return base
    return merge_lora(base, adapters, params.get("lora_scale") or {})


_fuse = jax.jit(merge_lora)


# ---------------------------------------------------------------------------------------------- the mixin
class AdaptersMixin:
    """LoRA and textual-inversion loading for every pipeline, over the components it has (`unet`, `text_encoder`,
    `text_encoder_2`)."""

    def lora_components(self) -> tuple[str, ...]:
        """The components of this pipeline a LoRA may change."""
        return tuple(c for c in self.components if c in COMPONENTS)

    # ------------------------------------------------------------------ LoRA
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, params, adapter_name: str | None = None,
                          weight_name: str | None = None, allow_pickle: bool = False, metadata=None) -> dict:
        """Load a LoRA (diffusers/PEFT or Kohya/A1111 file, folder, hub repo id or state dict) for this pipeline's
        UNet and text encoders: returns new params with params["lora"][adapter_name] = the adapter (the params
        given are not changed). adapter_name: default "default_0", "default_1", ... as diffusers names them.

        Strict: a LoRA for another architecture (the mismatched layers and both shapes named), keys that match no
        layer, inconsistent ranks, a component this pipeline lacks, and pickled files unless allow_pickle=True
        are an AdapterError. As diffusers, the new adapter is the active one: scale 1.0, and the adapters loaded
        before it 0, until set otherwise (`set_adapters(params, names, weights)`, or `lora_scale=` at call time)."""
        params = self._check_params_dict(params)
        loaded = _names(params)
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(loaded) + 1) if f"default_{i}" not in loaded)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise AdapterError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in loaded:
            raise AdapterError(f"adapter name {adapter_name!r} is already in use (loaded: {', '.join(loaded)}); "
                               "pass another adapter_name, or delete_adapters first")
        components = {c: params[c] for c in self.lora_components() if c in params}
        adapter = load_lora(pretrained_model_name_or_path_or_dict, components, allow_pickle=allow_pickle,
                            weight_name=weight_name, metadata=metadata)
        previous = params.get("lora") or {}
        params = {**params, "lora": {**previous, adapter_name: adapter}}
        return self.set_adapters(params, [adapter_name]) if previous else params

    def set_adapters(self, params, adapter_names, adapter_weights=None) -> dict:
        """diffusers' `set_adapters`: the named adapters at these weights (a number, or {component: number}; None:
        1.0), every other loaded adapter at 0. Returns new params; the weights are traced (no recompile)."""
        params = self._check_params_dict(params)
        adapters = params.get("lora") or {}
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (numbers.Number, Mapping)) or np.ndim(adapter_weights) == 0:
            weights = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
            if len(weights) != len(names):
                raise AdapterError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        _known(names, adapters, "set_adapters")
        chosen = dict(zip(names, weights))
        scales = {name: self._component_scales(name, adapter, chosen[name] if name in chosen else 0.0,
                                               "set_adapters")
                  for name, adapter in adapters.items()}
        return {**params, "lora_scale": scales}

    def set_lora_scale(self, params, lora_scale) -> dict:
        """params with `lora_scale` applied: None (unchanged), a number (every adapter, every component), or
        {name: number | {component: number}} (those adapters; the others keep their scale). This is what
        `pipe(..., lora_scale=...)` does for one call."""
        if lora_scale is None:
            return params
        params = self._check_params_dict(params)
        adapters = params.get("lora") or {}
        if not adapters:
            raise InputError("`lora_scale` is given, but params has no LoRA adapters (load one with "
                             "pipe.load_lora_weights(path, params))")
        if isinstance(lora_scale, Mapping):
            _known(list(lora_scale), adapters, "lora_scale")
            given = dict(lora_scale)
        else:
            given = dict.fromkeys(adapters, lora_scale)
        scales = dict(params.get("lora_scale") or {})
        for name, value in given.items():
            scales[name] = {**scales.get(name, {}), **self._component_scales(name, adapters[name], value, "lora_scale")}
        return {**params, "lora_scale": scales}

    def delete_adapters(self, params, adapter_names) -> dict:
        """params without these adapters (fused ones are unfused first)."""
        params = self._check_params_dict(params)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        _known(names, {**(params.get("lora") or {}), **(params.get("lora_fused") or {})}, "delete_adapters")
        fused = [n for n in names if n in (params.get("lora_fused") or {})]
        if fused:
            params = self.unfuse_lora(params, fused)
        out = dict(params)
        for key in ("lora", "lora_scale"):
            if key in out:
                out[key] = {n: v for n, v in out[key].items() if n not in names}
        return _drop_empty(out)

    def unload_lora_weights(self, params) -> dict:
        """params without any LoRA (fused adapters are taken out of the weights first)."""
        params = self._check_params_dict(params)
        if params.get("lora_fused"):
            params = self.unfuse_lora(params)
        return {k: v for k, v in params.items() if k not in ADAPTER_KEYS}

    def fuse_lora(self, params, lora_scale=1.0, adapter_names=None) -> dict:
        """Bake adapters into the weights (diffusers' `fuse_lora`): each at its current scale times `lora_scale`.
        adapter_names: default every loaded (unfused) adapter. The fused adapters leave params["lora"] (the program
        no longer merges them) and are remembered in params["lora_fused"] for `unfuse_lora`."""
        params = self._check_params_dict(params)
        adapters = params.get("lora") or {}
        names = list(adapters) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        _known(names, adapters, "fuse_lora")
        if not names:
            raise AdapterError("fuse_lora: no LoRA adapters are loaded")
        stored = params.get("lora_scale") or {}
        base = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
        fused = dict(params.get("lora_fused") or {})
        for name in names:
            weight = {c: np.float32(stored.get(name, {}).get(c, 1.0)) for c in adapters[name].components}
            extra = self._component_scales(name, adapters[name], lora_scale, "fuse_lora")
            scale = {c: np.float32(weight[c] * extra[c]) for c in weight}
            base = _fuse(base, {name: adapters[name]}, {name: scale})
            fused[name] = {"adapter": adapters[name], "scale": scale, "weight": weight}
        out = {**base, "lora": {n: a for n, a in adapters.items() if n not in names},
               "lora_scale": {n: s for n, s in stored.items() if n not in names}, "lora_fused": fused}
        return _drop_empty(out)

    def unfuse_lora(self, params, adapter_names=None) -> dict:
        """Take fused adapters out of the weights again (to float rounding, ~1e-7 relative) and load them back
        unfused at the scale they had before `fuse_lora`."""
        params = self._check_params_dict(params)
        fused = params.get("lora_fused") or {}
        names = list(fused) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        _known(names, fused, "unfuse_lora")
        base = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
        adapters, scales = dict(params.get("lora") or {}), dict(params.get("lora_scale") or {})
        for name in names:
            entry = fused[name]
            base = _fuse(base, {name: entry["adapter"]}, {name: {c: -s for c, s in entry["scale"].items()}})
            adapters[name], scales[name] = entry["adapter"], dict(entry["weight"])
        out = {**base, "lora": adapters, "lora_scale": scales,
               "lora_fused": {n: e for n, e in fused.items() if n not in names}}
        return _drop_empty(out)

    # ------------------------------------------------------------------ what a call passes to the program
    def adapter_call_params(self, params, jit: bool = False):
        """Host side, before the compiled call: params["lora_fused"] dropped, and a scale for every (adapter,
        component) as a float32 array ([n_devices] with jit=True), so scales are traced and one program serves
        them all."""
        if not isinstance(params, Mapping) or not any(k in params for k in ADAPTER_KEYS):
            return params
        out = {k: v for k, v in params.items() if k != "lora_fused"}
        adapters = out.get("lora") or {}
        if not adapters:
            return {k: v for k, v in out.items() if k not in ADAPTER_KEYS}
        stored = out.get("lora_scale") or {}
        n_dev = jax.local_device_count() if jit else None
        out["lora_scale"] = {name: {c: _scale_array(stored.get(name, {}).get(c, 1.0), n_dev)
                                    for c in adapter.components}
                             for name, adapter in adapters.items()}
        return out

    def check_adapters(self, params, jit: bool = False) -> None:
        """params["lora"] holds LoraAdapters for components this pipeline has, fitting their layers; scales name
        loaded adapters (host side, before anything is traced)."""
        adapters = params.get("lora")
        if adapters is None:
            adapters = {}
        if not isinstance(adapters, Mapping):
            raise InputError(f"`params['lora']` must be a dict {{adapter name: LoraAdapter}} "
                             f"(pipe.load_lora_weights), got {type(adapters).__name__}")
        for name, adapter in adapters.items():
            if not isinstance(adapter, LoraAdapter):
                raise InputError(f"`params['lora'][{name!r}]` is a {type(adapter).__name__}, not a LoraAdapter "
                                 "(pipe.load_lora_weights makes them)")
            for component in adapter.components:
                if component not in self.lora_components() or component not in params:
                    raise InputError(f"LoRA adapter {name!r} changes {component}, which this "
                                     f"{type(self).__name__} does not have (it has: "
                                     f"{', '.join(self.lora_components())})")
                kernels = {p[:-1]: tuple(np.shape(v))[1 if jit else 0:]
                           for p, v in convert.flat_params(params[component]).items() if p[-1] == "kernel"}
                for key, layer in adapter.layers[component].items():
                    path = tuple(key.split("/"))
                    want = (tuple(np.shape(layer.down))[1:-1] + (int(np.shape(layer.up)[-1]),)) if jit \
                        else layer.kernel_shape()
                    have = kernels.get(path)
                    if have != want:
                        where = convert.path_to_torch_key(path)
                        raise InputError(f"LoRA adapter {name!r}: {component}.{where} "
                                         + ("is not a layer of these params" if have is None else
                                            f"has kernel shape {have} (Flax layout), the adapter's is {want}")
                                         + " (an adapter loaded for another model?)")
        for key in ("lora_scale", "lora_fused"):
            entry = params.get(key) or {}
            if not isinstance(entry, Mapping):
                raise InputError(f"`params[{key!r}]` must be a dict by adapter name, got {type(entry).__name__}")
        unknown = [n for n in (params.get("lora_scale") or {}) if n not in adapters]
        if unknown:
            raise InputError(f"`params['lora_scale']` names adapters that are not loaded: {unknown} (loaded: "
                             f"{list(adapters)})")

    # ------------------------------------------------------------------ textual inversion
    def load_textual_inversion(self, pretrained_model_name_or_path, params, token=None,
                               text_encoder: str | None = None, weight_name: str | None = None,
                               embedding_key: str | None = None, allow_pickle: bool = False):
        """Add textual-inversion embeddings (diffusers, A1111 or SDXL clip_l/clip_g files): returns (pipe, params),
        a new pipeline whose tokenizer has the new tokens and whose text encoder has the new `vocab_size`, and
        params with the new embedding rows. This pipeline, its tokenizer and `params` are left unchanged.

        pretrained_model_name_or_path / token: one, or lists of the same length (several embeddings).
        text_encoder: which text encoder ("text_encoder", "text_encoder_2"); default: "text_encoder", or for an
            SDXL file (clip_l + clip_g) every text encoder of the pipeline: clip_l into text_encoder, clip_g into
            text_encoder_2 (embedding_key= picks one for all).
        A token already in the tokenizer is an AdapterError (nothing is changed). `prepare_inputs` writes a
        multi-vector token `<tok>` as `<tok> <tok>_1 ...` (diffusers' maybe_convert_prompt)."""
        params = self._check_params_dict(params)
        sources = (list(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, (list, tuple))
                   else [pretrained_model_name_or_path])
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise AdapterError(f"load_textual_inversion: {len(sources)} files but {len(tokens)} tokens")
        encoders = [c for c in SDXL_EMBEDDING_KEYS if c in self.components and getattr(self, c, None) is not None]
        if text_encoder is not None and text_encoder not in encoders:
            raise AdapterError(f"text_encoder={text_encoder!r}: this {type(self).__name__} has "
                               f"{', '.join(encoders) or 'no text encoder'}")
        changes, new_params = {}, dict(params)
        for source, tok in zip(sources, tokens):
            sdxl = _is_sdxl_embedding(source, weight_name, allow_pickle)
            targets = [text_encoder] if text_encoder else (encoders if sdxl else encoders[:1])
            for component in targets:
                tok_name = component.replace("text_encoder", "tokenizer")
                tokenizer = changes[tok_name] if tok_name in changes else copy.deepcopy(getattr(self, tok_name))
                module = changes[component] if component in changes else getattr(self, component)
                key = embedding_key or (SDXL_EMBEDDING_KEYS[component] if sdxl else None)
                ti = _load_textual_inversion(source, tokenizer, new_params[component], token=tok,
                                             embedding_key=key, weight_name=weight_name, allow_pickle=allow_pickle)
                changes[tok_name], changes[component] = tokenizer, module.clone(vocab_size=ti.vocab_size)
                new_params[component] = ti.params
        return type(self).from_pipe(self, **changes), new_params

    # ------------------------------------------------------------------ helpers
    def _check_params_dict(self, params) -> dict:
        if not isinstance(params, Mapping):
            raise InputError(f"`params` must be the dict from from_pretrained, got {type(params).__name__}")
        return dict(params)

    def _component_scales(self, name, adapter: LoraAdapter, value, where) -> dict:
        """{component: np.float32} for the components `adapter` changes, from a number or {component: number}."""
        if value is None:
            value = 1.0
        if isinstance(value, Mapping):
            bad = [c for c in value if c not in COMPONENTS]
            if bad:
                raise AdapterError(f"{where}[{name!r}] names unknown components {bad} (components: "
                                   f"{', '.join(COMPONENTS)})")
            return {c: _number(value.get(c, 1.0), f"{where}[{name!r}][{c!r}]") for c in adapter.components}
        number = _number(value, f"{where}[{name!r}]")
        return dict.fromkeys(adapter.components, number)


def _names(params) -> list[str]:
    return list(params.get("lora") or {}) + list(params.get("lora_fused") or {})


def _known(names, adapters, where):
    unknown = [n for n in names if n not in adapters]
    if unknown:
        raise AdapterError(f"{where}: no adapter named {', '.join(map(repr, unknown))} (loaded: "
                           f"{', '.join(map(repr, adapters)) or 'none'})")


def _number(value, where) -> np.float32:
    if isinstance(value, bool) or np.ndim(value) != 0:
        raise AdapterError(f"{where} must be a number (or {{component: number}}), got {value!r}")
    try:
        number = np.float32(value)
    except (TypeError, ValueError):
        raise AdapterError(f"{where} must be a number (or {{component: number}}), got {value!r}") from None
    if not np.isfinite(number):
        raise AdapterError(f"{where} must be finite, got {value!r}")
    return number


def _scale_array(value, n_dev):
    arr = jnp.asarray(value, jnp.float32)
    if n_dev is not None and arr.ndim == 0:
        arr = jnp.broadcast_to(arr, (n_dev,))
    return arr


def _drop_empty(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ADAPTER_KEYS or v}


def _is_sdxl_embedding(source, weight_name, allow_pickle) -> bool:
    """Whether a textual-inversion file (or state dict) holds SDXL's clip_l / clip_g pair."""
    from ..textual_inversion import SDXL_KEYS, _read

    try:
        state, _, _ = _read(source, weight_name, allow_pickle)
    except AdapterError:
        return False  # the loader reads it again and raises its error
    return any(k in state for k in SDXL_KEYS)

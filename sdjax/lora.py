"""LoRA adapters: load diffusers/PEFT and Kohya/A1111 files, merge them into the params inside the compiled program.

    adapter = load_lora("path/to/lora", params)        # folder (pytorch_lora_weights.safetensors) or file
    style = load_lora("style.safetensors", params)      # Kohya/A1111 `lora_unet_...` names, LoCon convs included
    merged = merge_lora(params, {"subject": adapter, "style": style},
                        {"subject": 1.0, "style": {"unet": 0.5, "text_encoder": 0.0}})
    params = fuse_lora(params, adapter, 0.8)            # bake in ...
    params = unfuse_lora(params, adapter, 0.8)          # ... and take out again
    save_lora("out/lora", adapter)                      # diffusers' `load_lora_weights` loads this

The adapter is a pytree (`LoraAdapter`): its arrays go into `jit` with the params, and the merge

    W' = W + sum_i scale_i * alpha_i / rank_i * (up_i @ down_i)     (rsLoRA: alpha_i / sqrt(rank_i))

runs inside the program, so a scale is a traced number: changing it never recompiles. Conv layers (LoCon) merge
as PEFT does: `down` is a conv with the layer's kernel size, `up` a 1x1 conv, and the kernel delta is their
composition, `delta[h, w, i, o] = sum_r down[h, w, i, r] * up[r, o]`.

Pipeline wiring is `params = merge_lora(params, adapters, scales)` at the top of the traced function, with
`adapters` and `scales` passed in beside the params (e.g. `params["lora"]`). Pass scales as one kind of value
(e.g. always `jnp.float32` arrays): a weakly typed Python float and a float32 array are different jit inputs.

Alphas, as diffusers applies them:
  * diffusers/PEFT files: the `lora_adapter_metadata` JSON in the safetensors header (the PEFT `LoraConfig` of each
    component: `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`), matched to module names with
    PEFT's pattern rule; a file without it has scale alpha/rank = 1 (PEFT's `W + B @ A`), unless it carries
    `<module>.alpha` tensors, which are read as Kohya's (diffusers refuses such files);
  * Kohya files: the `alpha` tensor of each layer, scale alpha/rank per layer (a layer without one, or with 0, has
    alpha = rank, as kohya-ss' LoRA module does). diffusers turns these into a `LoraConfig` with the most common alpha
    and an `alpha_pattern` for the rest; that pattern misses attention layers (it keeps `.processor.to_q_lora...` in
    its keys), so diffusers gives an attention layer whose alpha is *not* the file's most common one the common
    alpha instead. Here every layer gets its own: the two agree whenever that case does not arise.

Keys are matched to the params tree of each component strictly: a key that names no layer, a LoRA whose shapes do
not fit its layer, or `down`/`up` of different ranks raise `AdapterError` listing every such key.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import convert
from .errors import AdapterError
from .hub import looks_like_repo_id, resolve_folder
from .io import SafetensorsFiles, listing, write_safetensors
from .models.clip_text import CLIPTextModel
from .models.modeling_utils import MAX_LISTED, PICKLE_SUFFIXES, _read_pickle
from .models.unet_2d_condition import UNet2DConditionModel

LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header: {"unet.r": 4, ...}

# The components LoRA files address, and the key renames of their models (the conversion table's own rules).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_RENAMES = {"unet": UNet2DConditionModel._key_renames, "text_encoder": CLIPTextModel._key_renames,
            "text_encoder_2": CLIPTextModel._key_renames}
# transformers 4 names the text encoder's modules `text_model.encoder...`; written so on save (both versions load it).
# SDXL's text_encoder_2 (CLIPTextModelWithProjection) has `text_model` in its own params tree in both versions.
TEXT_MODEL = "text_model"
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}

# diffusers/PEFT tensor names after `<component>.<module>`: PEFT, diffusers' own (`.lora.down`), the text encoder's
# `lora_linear_layer`, and PEFT's optional `lora_B` bias. `.alpha` (a network alpha) is read as Kohya's.
_PEFT_ROLES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"), (".alpha", "alpha"),
)
# diffusers' old attention-processor names: `attn1.processor.to_q_lora.down.weight` (UNet) and
# `self_attn.to_q_lora.down.weight` (text encoder).
_OLD_ATTN = re.compile(r"^(?:(.*)\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_ATTN_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_ATTN_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = ((r"dora_scale|lora_magnitude_vector", "DoRA"), (r"\.hada_", "LoHa (LyCORIS)"),
                (r"\.lokr_", "LoKr (LyCORIS)"), (r"\.diff(_b)?$", "full weight differences (LyCORIS 'diff')"),
                (r"\.lora_mid\.", "LoCon with a Tucker 'lora_mid'"))
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


# ---------------------------------------------------------------------------------------------- the pytree
@struct.dataclass
class LoraLayer:
    """One layer's LoRA, in Flax layouts (the layer's kernel is [in, out] or [kh, kw, in, out]).

    down:  [in, r] for a Dense layer, [kh, kw, in, r] for a Conv (PEFT's lora_A / Kohya's lora_down, transposed)
    up:    [r, out] (lora_B / lora_up, transposed; a conv's 1x1 up squeezed)
    alpha: float32 scalar array: the layer scales by alpha / r (rsLoRA: alpha / sqrt(r))
    bias:  [out] or None: PEFT's `lora_B.bias` (added to the layer's bias, times the same scale)
    """

    down: jax.Array
    up: jax.Array
    alpha: jax.Array
    bias: jax.Array | None = None
    rslora: bool = struct.field(pytree_node=False, default=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    def factor(self):
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self):
        """up @ down in the kernel's Flax layout (float32, unscaled)."""
        return jnp.einsum("...ir,ro->...io", self.down.astype(jnp.float32), self.up.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.down.shape[:-1]) + (int(self.up.shape[-1]),)


@struct.dataclass
class LoraAdapter:
    """A loaded LoRA: `layers[component]["down_blocks_0/attentions_0/.../to_q"] -> LoraLayer`.

    component: "unet", "text_encoder" or "text_encoder_2" (the keys of the pipeline's params dict); the layer key
    is the Flax module path (params[component]["down_blocks_0"]...["to_q"] holds the kernel it changes). Only
    arrays are leaves (and the rsLoRA flag is static): two adapters with the same layers and ranks have the same tree
    structure, so swapping one for the other in a compiled program does not recompile either.
    """

    layers: dict[str, dict[str, LoraLayer]]

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in self.layers if self.layers[c])

    def summary(self) -> str:
        parts = []
        for c, layers in self.layers.items():
            ranks = sorted({layer.rank for layer in layers.values()})
            parts.append(f"{c}: {len(layers)} layers, rank {'/'.join(map(str, ranks))}")
        return "; ".join(parts) or "empty"


# ---------------------------------------------------------------------------------------------- loading
def load_lora(path_or_file, params: Mapping[str, Any], allow_pickle: bool = False, weight_name: str | None = None,
              dtype=jnp.float32, metadata: Mapping[str, Any] | None = None) -> LoraAdapter:
    """Read a LoRA file and match it to `params` (the pipeline's {"unet": ..., "text_encoder": ...} dict).

    path_or_file: a .safetensors file; a folder (its `pytorch_lora_weights.safetensors`, or `weight_name`, or its
        only .safetensors file); a hub repo id; or a state dict {name: array} (with `metadata`, the header's
        `lora_adapter_metadata` JSON as a dict, if any).
    allow_pickle: also read pickled `.bin/.pt/.pth/.ckpt` files (torch.load(weights_only=True), needs torch). Off by
        default: a pickle can run code when loaded.
    dtype: dtype of the adapter's arrays (the merge computes in float32 and casts to each parameter's dtype).
    Raises AdapterError naming the file and every key that matches no layer, does not fit its layer's shape, or
    whose down/up ranks differ.
    """
    state, file_metadata, source = _read_lora_file(path_or_file, allow_pickle, weight_name)
    if metadata is None:
        metadata = file_metadata
    return lora_from_state_dict(state, params, metadata=metadata, source=source, dtype=dtype)


def lora_from_state_dict(state: Mapping[str, Any], params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                         source: str = "state dict", dtype=jnp.float32) -> LoraAdapter:
    """`load_lora` for tensors already in memory: {key: array} in diffusers/PEFT or Kohya names."""
    if not len(state):
        raise AdapterError(f"{source} holds no tensors")
    groups, problems = _group_keys(state, params, source)
    configs = _component_configs(metadata, source)
    layers: dict[str, dict[str, LoraLayer]] = {}
    mismatched, ranks, incomplete = [], [], []
    for (component, path), roles in groups.items():
        kernel = _node(params[component], path)["kernel"]
        name = _torch_name(path)
        try:
            layer = _build_layer(state, roles, kernel, params[component], path, configs.get(component), component,
                                 dtype)
        except _Mismatch as e:
            mismatched.append(f"{component}.{name}: {e}")
            continue
        except _RankError as e:
            ranks.append(f"{component}.{name}: {e}")
            continue
        except _Incomplete as e:
            incomplete.append(f"{component}.{name}: {e}")
            continue
        layers.setdefault(component, {})["/".join(path)] = layer
    if problems.unmatched or problems.no_component or mismatched or ranks or incomplete or problems.unsupported:
        raise AdapterError(_problem_message(source, params, problems, mismatched, ranks, incomplete))
    return LoraAdapter(layers=layers)


class _Mismatch(Exception):
    pass


class _RankError(Exception):
    pass


class _Incomplete(Exception):
    pass


class _Problems:
    def __init__(self):
        self.unmatched: list[str] = []             # keys that name no layer of their component
        self.no_component: dict[str, list] = {}    # component the params lack -> its keys
        self.unsupported: list[str] = []           # DoRA, LoHa, ...


def _group_keys(state, params, source):
    """Sort the file's keys into {(component, module path): {role: key}}."""
    problems = _Problems()
    groups: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
    kohya_maps: dict[str, dict[str, tuple[str, ...]]] = {}

    def add(component, path, role, key):
        roles = groups.setdefault((component, path), {})
        if role in roles:  # two spellings of the same tensor
            raise AdapterError(f"{source}: {key!r} and {roles[role]!r} are the same LoRA tensor ({role} of "
                               f"{component}.{_torch_name(path)}); which one is meant is unknown")
        roles[role] = key

    for key in state.keys():
        what = next((label for pattern, label in _UNSUPPORTED if re.search(pattern, key)), None)
        if what:
            problems.unsupported.append(f"{key} ({what})")
            continue
        kohya = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        if kohya:
            component = KOHYA_PREFIXES[kohya]
            lora_name, _, suffix = key.partition(".")
            role = _KOHYA_ROLES.get(suffix)
            if role is None:
                problems.unmatched.append(key)
                continue
            if component not in params:
                problems.no_component.setdefault(component, []).append(key)
                continue
            if component not in kohya_maps:
                kohya_maps[component] = _kohya_names(params[component], component)
            path = kohya_maps[component].get(lora_name[len(kohya):])
            if path is None:
                problems.unmatched.append(key)
                continue
            add(component, path, role, key)
            continue

        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            problems.unmatched.append(key)
            continue
        parsed = _parse_peft_key(rest.replace(".processor.", ".").removeprefix("processor."), component)
        if parsed is None:
            problems.unmatched.append(key)
            continue
        if component not in params:
            problems.no_component.setdefault(component, []).append(key)
            continue
        module_key, role = parsed
        path = convert.torch_key_to_path(convert.rename_key(module_key, _RENAMES[component]))
        if component != "unet" and _has_text_model(params[component]):  # CLIPTextModelWithProjection
            path = (TEXT_MODEL,) + path
        if not _has_kernel(params[component], path):
            problems.unmatched.append(key)
            continue
        add(component, path, role, key)
    return groups, problems


def _has_kernel(tree, path) -> bool:
    """Whether the params tree has a layer (a `kernel`) at this module path."""
    node = tree
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return False
        node = node[k]
    return isinstance(node, Mapping) and "kernel" in node


def _parse_peft_key(rest: str, component: str):
    """`down_blocks.0...to_q.lora_A.weight` -> (module key, role), or None."""
    m = _OLD_ATTN.match(rest)
    if m:
        names = _OLD_ATTN_UNET if component == "unet" else _OLD_ATTN_TEXT
        module = names[m[2]] if not m[1] else f"{m[1]}.{names[m[2]]}"
        return module, "down" if m[3] == "down" else "up"
    for suffix, role in _PEFT_ROLES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], role
    return None


def _kohya_names(tree, component) -> dict[str, tuple[str, ...]]:
    """Kohya's layer names for every kernel in a params tree: the PyTorch module name with '.' -> '_'
    (`down_blocks_0_attentions_0_proj_in`; text encoders with and without `text_model_`)."""
    names: dict[str, tuple[str, ...]] = {}
    for p in convert.flat_params(tree):
        if p[-1] != "kernel":
            continue
        flat = convert.path_to_torch_key(p[:-1]).replace(".", "_")
        spellings = [flat] + ([f"text_model_{flat}"] if component != "unet" else [])
        for s in spellings:
            if s in names and names[s] != p[:-1]:
                raise AdapterError(f"Kohya name {s!r} is ambiguous in {component}: {_torch_name(names[s])} and "
                                   f"{_torch_name(p[:-1])}")
            names[s] = p[:-1]
    return names


def _torch_name(path) -> str:
    return convert.path_to_torch_key(tuple(path))


# ---------------------------------------------------------------------------------------------- one layer
def _build_layer(state, roles, kernel, tree, path, config, component, dtype) -> LoraLayer:
    if "down" not in roles or "up" not in roles:
        have = ", ".join(sorted(roles.values()))
        missing = "down (lora_A / lora_down)" if "down" not in roles else "up (lora_B / lora_up)"
        raise _Incomplete(f"has {have} but no {missing} tensor")
    down = np.asarray(state[roles["down"]], dtype=np.float32)
    up = np.asarray(state[roles["up"]], dtype=np.float32)
    kshape = tuple(kernel.shape)
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        raise _Mismatch(f"unsupported LoRA shapes: {roles['down']} {down.shape}, {roles['up']} {up.shape} (expected "
                        "down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1])")
    if down.shape[0] != up.shape[1]:
        raise _RankError(f"{roles['down']} has rank {down.shape[0]} (shape {down.shape}) but {roles['up']} has rank "
                         f"{up.shape[1]} (shape {up.shape})")
    rank = down.shape[0]
    up2 = up[:, :, 0, 0] if up.ndim == 4 else up                  # [out, r]
    expected_torch = kshape[::-1] if len(kshape) == 2 else (kshape[3], kshape[2], kshape[0], kshape[1])
    if len(kshape) == 2:  # Dense: [in, out]
        if down.ndim == 4 and down.shape[2:] != (1, 1):
            raise _Mismatch(f"a {down.shape[2]}x{down.shape[3]} conv LoRA ({roles['down']} {down.shape}) on a linear "
                            f"layer (weight {expected_torch})")
        down2 = down[:, :, 0, 0] if down.ndim == 4 else down          # [r, in]
        lora_shape = (up2.shape[0], down2.shape[1])
        flax_down = down2.T                                           # [in, r]
    else:  # Conv: [kh, kw, in, out]
        down4 = down[:, :, None, None] if down.ndim == 2 else down    # [r, in, kh, kw]
        lora_shape = (up2.shape[0], down4.shape[1], down4.shape[2], down4.shape[3])
        flax_down = down4.transpose(2, 3, 1, 0)                       # [kh, kw, in, r]
    if tuple(lora_shape) != tuple(expected_torch):
        raise _Mismatch(f"the LoRA makes a weight of shape {tuple(lora_shape)} (from {roles['down']} {down.shape} and "
                        f"{roles['up']} {up.shape}), the layer's weight is {tuple(expected_torch)}")
    bias = None
    if "bias" in roles:
        b = np.asarray(state[roles["bias"]], dtype=np.float32)
        target_bias = _node(tree, path).get("bias")
        if target_bias is None:
            raise _Mismatch(f"{roles['bias']} is a bias for a layer without one")
        if b.shape != tuple(target_bias.shape):
            raise _Mismatch(f"{roles['bias']} has shape {b.shape}, the layer's bias {tuple(target_bias.shape)}")
        bias = jnp.asarray(b, dtype)
    alpha, rslora = _alpha_for(state, roles, rank, config, component, path)
    return LoraLayer(down=jnp.asarray(flax_down, dtype), up=jnp.asarray(up2.T, dtype),
                     alpha=jnp.asarray(alpha, jnp.float32), bias=bias, rslora=rslora)


def _node(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _alpha_for(state, roles, rank, config, component, path) -> tuple[float, bool]:
    """(alpha, rslora) of one layer: the file's metadata (PEFT LoraConfig), else its `alpha` tensor, else rank."""
    if config is not None:
        names = _pattern_names(component, path)
        r = _pattern_value(config.get("rank_pattern") or {}, names, config.get("r", rank))
        if int(r) != rank:
            raise _Mismatch(f"the file's metadata gives rank {r}, its tensors have rank {rank}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, names, config.get("lora_alpha", r))
        return float(alpha), bool(config.get("use_rslora", False))
    if "alpha" in roles:
        alpha = float(np.asarray(state[roles["alpha"]]).reshape(-1)[0])
        return (alpha if alpha != 0 else float(rank)), False
    return float(rank), False


def _pattern_names(component, path) -> list[str]:
    name = _torch_name(path)
    if component == "unet":
        return [name]
    bare = name.removeprefix(f"{TEXT_MODEL}.")
    return [f"{TEXT_MODEL}.{bare}", bare]


def _has_text_model(tree) -> bool:
    """A CLIPTextModelWithProjection params tree (SDXL's text_encoder_2): its CLIP tower is under `text_model`."""
    return isinstance(tree, Mapping) and TEXT_MODEL in tree


def _save_name(component, path) -> str:
    """The PyTorch module name a layer is saved under: text encoders with transformers 4's `text_model.`."""
    name = _torch_name(path)
    if component == "unet" or path[0] == TEXT_MODEL:
        return name
    return f"{TEXT_MODEL}.{name}"


def _pattern_value(patterns: Mapping[str, Any], names, default):
    """PEFT's `get_pattern_key`: the first pattern P with re.match(rf'(.*\\.)?({P})$', name)."""
    for pattern, value in patterns.items():
        try:
            if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
                return value
        except re.error as e:
            raise AdapterError(f"the LoRA metadata's pattern {pattern!r} is not a regular expression: {e}") from None
    return default


def _component_configs(metadata, source) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` ({"unet.r": 4, "unet.lora_alpha": 8, ...}) -> {component: LoraConfig dict}."""
    if not metadata:
        return {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{source}: {METADATA_KEY} in the header is not valid JSON: {e}") from None
    out: dict[str, dict] = {}
    for key, value in metadata.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = value
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise AdapterError(f"{source}: the {component} adapter is a DoRA (use_dora in its metadata); sdjax merges "
                               "plain LoRA only")
    return out


def _problem_message(source, params, problems: _Problems, mismatched, ranks, incomplete) -> str:
    def listed(items):
        items = list(items)
        more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        return "".join(f"\n    {x}" for x in items[:MAX_LISTED]) + more

    lines = [f"LoRA {source} does not fit the model:"]
    if problems.unsupported:
        lines.append(f"  {len(problems.unsupported)} tensors of an adapter type sdjax does not merge (plain LoRA / "
                     "LoCon only):" + listed(problems.unsupported))
    for component, keys in problems.no_component.items():
        lines.append(f"  {len(keys)} keys are for {component}, which the params do not have (params has: "
                     f"{', '.join(params)}):" + listed(keys))
    if problems.unmatched:
        lines.append(f"  {len(problems.unmatched)} keys match no layer of the model (a LoRA for another architecture, "
                     "or a key layout sdjax does not know):" + listed(sorted(problems.unmatched)))
        if any(b in k for k in problems.unmatched for b in _SGM_BLOCKS):
            lines.append("  (input_blocks/middle_block/output_blocks are the original LDM/SGM UNet's names, which Kohya "
                         "uses for SDXL; sdjax reads the diffusers UNet names only)")
    if mismatched:
        lines.append(f"  {len(mismatched)} layers with the wrong shape (PyTorch layout; a LoRA for another "
                     "architecture?):" + listed(mismatched))
    if ranks:
        lines.append(f"  {len(ranks)} layers whose down and up ranks differ:" + listed(ranks))
    if incomplete:
        lines.append(f"  {len(incomplete)} incomplete layers:" + listed(incomplete))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files
def _read_lora_file(path_or_file, allow_pickle: bool, weight_name: str | None):
    """-> (state: Mapping[str, array], metadata: dict | None, source: str)."""
    if isinstance(path_or_file, Mapping):
        return path_or_file, None, "state dict"
    name = os.fspath(path_or_file)
    path = Path(name)
    if path.is_dir():
        path = _find_in_folder(path, weight_name, allow_pickle)
    elif not path.exists():
        if looks_like_repo_id(name):
            folder = resolve_folder(name, allow_patterns=(weight_name or "*.safetensors",))
            path = _find_in_folder(folder, weight_name, allow_pickle)
        else:
            raise AdapterError(f"LoRA file not found: {name!r} (neither a file, a folder nor a hub repo id)")
    return read_weights_file(path, allow_pickle, what="LoRA") + (str(path),)


def read_weights_file(path: Path, allow_pickle: bool, what: str = "adapter"):
    """A safetensors file (read tensor by tensor) with its header metadata, or a pickle if allowed:
    -> (state, lora metadata dict or None). Shared by LoRA and textual inversion."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(
                f"{what} file {path} is a pickle ({path.suffix}). Pickle files can run arbitrary code when loaded, so "
                "sdjax refuses them by default. If you trust this file, pass allow_pickle=True (it is then read with "
                "torch.load(weights_only=True), which needs torch), or convert it to safetensors.")
        return _read_pickle(path), None
    if path.suffix != ".safetensors":
        raise AdapterError(f"{what} file {path}: expected a .safetensors file (or, with allow_pickle=True, one of "
                           f"{', '.join(PICKLE_SUFFIXES)})")
    state = SafetensorsFiles([path])
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata() or {}
    raw = header.get(METADATA_KEY)
    metadata = None
    if raw:
        try:
            metadata = json.loads(raw)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: {METADATA_KEY} in the header is not valid JSON: {e}") from None
    return state, metadata


def _find_in_folder(folder: Path, weight_name: str | None, allow_pickle: bool) -> Path:
    """diffusers' choice of file in a LoRA folder: `weight_name`, else pytorch_lora_weights.safetensors, else the only
    .safetensors file (not a scheduler/optimizer/checkpoint), else pytorch_lora_weights.bin (pickle rules apply)."""
    if weight_name:
        path = folder / weight_name
        if not path.is_file():
            raise AdapterError(f"{weight_name} not found in {folder} (has: {listing(folder)})")
        return path
    if (folder / LORA_WEIGHT_NAME_SAFE).is_file():
        return folder / LORA_WEIGHT_NAME_SAFE
    candidates = sorted(p for p in folder.glob("*.safetensors")
                        if not any(s in p.name for s in ("scheduler", "optimizer", "checkpoint")))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise AdapterError(f"{folder} has several .safetensors files ({', '.join(p.name for p in candidates)}) and no "
                           f"{LORA_WEIGHT_NAME_SAFE}: pass weight_name= to say which one is the LoRA")
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    raise AdapterError(f"no LoRA weights in {folder}: expected {LORA_WEIGHT_NAME_SAFE} (has: {listing(folder)})")


# ---------------------------------------------------------------------------------------------- merging (traced)
def merge_lora(params: Mapping[str, Any], adapters: Mapping[str, LoraAdapter], scales=None) -> dict:
    """params with every adapter merged in: W + sum_i scale_i * alpha_i/rank_i * up_i @ down_i. Pure and jit-able.

    adapters: {name: LoraAdapter}. scales: {name: scale}, where a scale is a number or array (traced under jit, so
        changing it does not recompile) or {component: number}; a component it does not name has scale 1.0, as in
        diffusers' `set_adapters`. None: 1.0 for every adapter. A scale of 0 gives the params exactly.
    Parameters keep their dtype (the sum is computed in float32). Components no adapter touches are returned as
    they are (the same arrays).
    """
    scales = _resolve_scales(adapters, scales)
    out = dict(params)
    touched = dict.fromkeys(c for a in adapters.values() for c in a.components)
    for component in touched:
        if component not in params:
            names = [n for n, a in adapters.items() if a.layers.get(component)]
            raise AdapterError(f"LoRA adapter(s) {names} change {component}, which the params do not have "
                               f"(params has: {', '.join(params)})")
        flat = convert.flat_params(params[component])
        sums: dict[tuple[str, ...], Any] = {}
        for name, adapter in adapters.items():
            scale = scales[name][component]
            for key, layer in adapter.layers.get(component, {}).items():
                path = tuple(key.split("/"))
                kernel = flat.get(path + ("kernel",))
                if kernel is None:
                    raise AdapterError(f"LoRA adapter {name!r}: {component}.{_torch_name(path)} is not a layer of "
                                       "these params")
                if tuple(kernel.shape) != layer.kernel_shape():
                    raise AdapterError(f"LoRA adapter {name!r}: {component}.{_torch_name(path)} has kernel shape "
                                       f"{tuple(kernel.shape)} (Flax layout), the adapter's is {layer.kernel_shape()}")
                s = jnp.asarray(scale, jnp.float32) * layer.factor()
                _accumulate(sums, path + ("kernel",), s * layer.delta())
                if layer.bias is not None:
                    _accumulate(sums, path + ("bias",), s * layer.bias.astype(jnp.float32))
        new = {p: (v if p not in sums else (jnp.asarray(v, jnp.float32) + sums[p]).astype(v.dtype))
               for p, v in flat.items()}
        out[component] = convert.unflatten(new)
    return out


def _accumulate(sums, path, value):
    sums[path] = value if path not in sums else sums[path] + value


def _resolve_scales(adapters, scales) -> dict[str, dict[str, Any]]:
    if scales is None:
        scales = {}
    if not isinstance(scales, Mapping):
        raise AdapterError(f"scales must be a dict {{adapter name: scale}}, got {type(scales).__name__}")
    unknown = [n for n in scales if n not in adapters]
    if unknown:
        raise AdapterError(f"scales name adapters that are not loaded: {unknown} (loaded: {list(adapters)})")
    out = {}
    for name, adapter in adapters.items():
        if not isinstance(adapter, LoraAdapter):
            raise AdapterError(f"adapter {name!r} is a {type(adapter).__name__}, not a LoraAdapter (use load_lora)")
        scale = scales.get(name)
        if isinstance(scale, Mapping):
            bad = [c for c in scale if c not in COMPONENTS]
            if bad:
                raise AdapterError(f"scales[{name!r}] names unknown components {bad} (components: "
                                   f"{', '.join(COMPONENTS)})")
            per = {c: _scale_value(scale.get(c), f"scales[{name!r}][{c!r}]") for c in COMPONENTS}
        else:
            per = dict.fromkeys(COMPONENTS, _scale_value(scale, f"scales[{name!r}]"))
        out[name] = per
    return out


def _scale_value(scale, where):
    """None -> 1.0 (diffusers' default); a number or a scalar array stays as it is (traced under jit)."""
    if scale is None:
        return 1.0
    if isinstance(scale, Mapping):
        raise AdapterError(f"{where} is a dict: per-block scales are not supported; give one number per component")
    if np.ndim(scale) != 0:
        raise AdapterError(f"{where} must be a scalar, got shape {np.shape(scale)}")
    return scale


def fuse_lora(params: Mapping[str, Any], adapter: LoraAdapter, scale=1.0) -> dict:
    """Bake one adapter into the params at `scale` (a number, or {component: number}); jit-able."""
    return merge_lora(params, {"fused": adapter}, {"fused": scale})


def unfuse_lora(params: Mapping[str, Any], adapter: LoraAdapter, scale=1.0) -> dict:
    """Take out what `fuse_lora(params, adapter, scale)` baked in (to float rounding)."""
    neg = ({c: -v for c, v in scale.items()} if isinstance(scale, Mapping) else -scale)
    if isinstance(scale, Mapping):  # components the fuse left at the default 1.0
        neg = {**{c: -1.0 for c in adapter.layers}, **neg}
    return merge_lora(params, {"fused": adapter}, {"fused": neg})


# ---------------------------------------------------------------------------------------------- saving
def save_lora(path, adapter: LoraAdapter, weight_name: str = LORA_WEIGHT_NAME_SAFE) -> Path:
    """Write the adapter in diffusers/PEFT format: `unet.<module>.lora_A.weight` / `lora_B.weight` (PyTorch layouts;
    text encoders under `text_encoder.text_model.`), alphas and ranks in the `lora_adapter_metadata` header as a
    PEFT LoraConfig per component, so diffusers' `load_lora_weights` (and `load_lora`) applies the same scales.

    path: a folder (the file is `weight_name` in it) or a path ending in .safetensors. Returns the file written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / weight_name
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    for component, layers in adapter.layers.items():
        if not layers:
            continue
        if component not in COMPONENTS:
            raise AdapterError(f"save_lora: unknown component {component!r} (components: {', '.join(COMPONENTS)})")
        prefix = f"{component}."
        ranks, alphas, rslora, biased = {}, {}, set(), False
        for key, layer in layers.items():
            name = _save_name(component, tuple(key.split("/")))
            down = np.asarray(jax.device_get(layer.down))
            up = np.asarray(jax.device_get(layer.up))
            if down.ndim == 2:
                a, b = down.T, up.T                                               # [r, in], [out, r]
            else:
                a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]         # [r, in, kh, kw], [out, r, 1, 1]
            tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(b)
            if layer.bias is not None:
                tensors[f"{prefix}{name}.lora_B.bias"] = np.asarray(jax.device_get(layer.bias))
                biased = True
            meta = name if component == "unet" else name.removeprefix(f"{TEXT_MODEL}.")
            ranks[meta], alphas[meta] = layer.rank, _number(float(jax.device_get(layer.alpha)))
            rslora.add(layer.rslora)
        if len(rslora) > 1:
            raise AdapterError(f"save_lora: {component} mixes rsLoRA and plain LoRA layers, which one PEFT LoraConfig "
                               "cannot describe")
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": alpha,
            # names without `text_model.`: PEFT matches them as suffixes, which fits transformers 4 and 5 alike
            "target_modules": sorted(ranks),
            "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
            "use_rslora": rslora.pop(), "lora_bias": biased,
        }
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    if not tensors:
        raise AdapterError("save_lora: the adapter has no layers")
    write_safetensors(path, tensors, metadata={METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return path


def _number(x: float):
    return int(x) if float(x).is_integer() else x

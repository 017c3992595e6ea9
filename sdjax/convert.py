"""The one table of rules between PyTorch state dicts and Flax params.

Flax modules in sdjax are named after the PyTorch attributes, so a tensor's place in the params tree
follows from its PyTorch key by two generic rules:

* path: a list index joins the segment before it (`down_blocks.0.resnets.1` <-> `down_blocks_0/resnets_1`);
* leaf: the PyTorch leaf name and tensor rank decide the Flax leaf and the layout change (`LEAF_RULES`).

Each model adds only a few key renames of its own (old attention names, the text encoder's
`text_model.` prefix), applied to the PyTorch key before these rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# Real PyTorch attribute names that end in _<digits> (not list indices); they stay as they are on save.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})


def torch_key_to_path(module_key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1' -> ('down_blocks_0', 'resnets_1', 'conv1')."""
    path: list[str] = []
    for part in module_key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """('down_blocks_0', 'resnets_1', 'conv1') -> 'down_blocks.0.resnets.1.conv1'."""
    parts = []
    for seg in path:
        m = re.fullmatch(r"(.+?)_(\d+)", seg)
        parts.append(f"{m[1]}.{m[2]}" if m and seg not in LITERAL_NAMES else seg)
    return ".".join(parts)


@dataclass(frozen=True)
class LeafRule:
    torch_leaf: str
    flax_leaf: str
    flax_ndim: int | None  # rank of the Flax leaf this rule applies to (None: any)
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    what: str


def _identity(x):
    return x


def _linear_to_flax(w):
    # A Linear stored as a 1x1 conv [O, I, 1, 1] (very old VAE attention checkpoints) is squeezed first.
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    return w.T


LEAF_RULES: tuple[LeafRule, ...] = (
    LeafRule("weight", "kernel", 4, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1),
             "conv: OIHW <-> HWIO"),
    LeafRule("weight", "kernel", 2, _linear_to_flax, lambda k: k.T, "linear: [out, in] <-> [in, out]"),
    LeafRule("weight", "scale", 1, _identity, _identity, "norm: weight <-> scale"),
    LeafRule("weight", "embedding", 2, _identity, _identity, "embedding: weight <-> embedding"),
    LeafRule("bias", "bias", None, _identity, _identity, "bias"),
)


def _rules_for_torch_leaf(leaf: str):
    return [r for r in LEAF_RULES if r.torch_leaf == leaf]


def _rule_for_flax_leaf(leaf: str, ndim: int) -> LeafRule:
    for r in LEAF_RULES:
        if r.flax_leaf == leaf and (r.flax_ndim is None or r.flax_ndim == ndim):
            return r
    raise KeyError(f"no conversion rule for Flax leaf {leaf!r} of rank {ndim}")


def rename_key(key: str, renames) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def flat_params(tree, prefix=()) -> dict[tuple[str, ...], object]:
    """Nested dict -> {path: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flat_params(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


@dataclass
class ConversionReport:
    missing: list[str]       # expected params (as PyTorch keys) that no tensor filled
    unexpected: list[str]    # tensors in the file that no param takes
    mismatched: list[tuple[str, tuple, tuple]]  # (key, shape in file, shape expected, PyTorch layout)
    wrong_dtype: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, dtype): ints/bools
    non_finite: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (key, count of NaN/inf)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype or self.non_finite)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], expected: dict, renames=(), ignored=(),
                  materialize: Callable[[np.ndarray], Any] = np.asarray, max_workers: int = 1,
                  check_finite: bool = True):
    """Convert a PyTorch-named state dict into a Flax params tree shaped like `expected`.

    state_dict: key -> array; any Mapping, read one key at a time (e.g. `SafetensorsFiles`, which reads
        a tensor only when asked), so a checkpoint never has to be in memory twice.
    expected: params tree of shapes (e.g. from `jax.eval_shape(model.init_weights, key)`).
    renames: (regex, replacement) pairs applied to every key first; ignored: regexes of keys to drop.
    materialize: applied to each converted (possibly transposed) view, e.g. `jnp.asarray` to place it on
        the device; max_workers threads run the reads, layout changes and copies (numpy and safetensors
        release the GIL, so this is parallel).
    check_finite: report tensors holding NaN or inf (one extra pass over each tensor, while it is in cache).
    Integer and boolean tensors are reported too: every parameter is a float, and casting one silently
    would hide a broken or foreign file.
    Returns (params, report); the caller decides how strict to be.
    """
    want = flat_params(expected)
    jobs: dict[tuple[str, ...], tuple[str, LeafRule]] = {}
    unexpected = []
    for raw_key in state_dict.keys():  # match by names and ranks only: nothing is read yet
        key = rename_key(raw_key, renames)
        if any(re.search(p, key) for p in ignored):
            continue
        module_key, _, leaf = key.rpartition(".")
        module_path = torch_key_to_path(module_key)
        for rule in _rules_for_torch_leaf(leaf):
            path = module_path + (rule.flax_leaf,)
            target = want.get(path)
            if target is None or (rule.flax_ndim is not None and len(target.shape) != rule.flax_ndim):
                continue
            jobs[path] = (raw_key, rule)
            break
        else:
            unexpected.append(raw_key)

    def convert_one(item):
        path, (raw_key, rule) = item
        tensor = np.asarray(state_dict[raw_key])
        if tensor.dtype.kind not in "fc" and tensor.dtype.name != "bfloat16":
            return path, None, ("dtype", (raw_key, tensor.dtype.name))
        value = rule.to_flax(tensor)
        target = want[path]
        if tuple(value.shape) != tuple(target.shape):
            expected_torch = tuple(rule.to_torch(np.empty(target.shape, dtype=np.uint8)).shape)
            return path, None, ("shape", (raw_key, tuple(np.shape(tensor)), expected_torch))
        if check_finite:
            bad = value.size - int(np.count_nonzero(np.isfinite(value)))
            if bad:
                return path, None, ("finite", (raw_key, bad))
        return path, materialize(value), None

    # In batches of about RELEASE_BYTES: after each, the source's file pages are released (if it can), so the
    # peak is the converted params plus one batch of source pages, not twice the checkpoint.
    results = []
    release = getattr(state_dict, "release", None)
    with ThreadPoolExecutor(max(max_workers, 1)) as pool:
        for batch in _batches(list(jobs.items()), want):
            results += list(pool.map(convert_one, batch)) if max_workers > 1 else [convert_one(j) for j in batch]
            if release is not None:
                release()
    params = {path: value for path, value, bad in results if bad is None}
    problems = {kind: [] for kind in ("shape", "dtype", "finite")}
    for _, _, bad in results:
        if bad is not None:
            problems[bad[0]].append(bad[1])
    missing = [_display_key(p, want[p]) for p in want if p not in jobs]
    return unflatten(params), ConversionReport(sorted(missing), sorted(unexpected), problems["shape"],
                                               sorted(problems["dtype"]), sorted(problems["finite"]))


RELEASE_BYTES = 64 * 2**20


def _batches(jobs, want, limit: int | None = None):
    limit = RELEASE_BYTES if limit is None else limit
    batch, size = [], 0
    for job in jobs:
        batch.append(job)
        size += 4 * int(np.prod(want[job[0]].shape))
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _display_key(path, target) -> str:
    rule = _rule_for_flax_leaf(path[-1], len(target.shape))
    return f"{path_to_torch_key(path[:-1])}.{rule.torch_leaf}"


def flax_to_torch(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params tree -> PyTorch-named state dict in PyTorch layouts (the inverse of `torch_to_flax`)."""
    out = {}
    for path, value in flat_params(params).items():
        value = np.asarray(value)
        rule = _rule_for_flax_leaf(path[-1], value.ndim)
        out[f"{prefix}{path_to_torch_key(path[:-1])}.{rule.torch_leaf}"] = np.ascontiguousarray(rule.to_torch(value))
    return out


def flax_tree_to_torch_named(tree: dict) -> dict[str, np.ndarray]:
    """A legacy Flax params tree (old diffusers-Flax / transformers-Flax msgpack) keyed like a PyTorch state dict,
    without layout changes: leaves keep their Flax names ('kernel', 'scale', ...)."""
    out = {}
    for path, value in flat_params(tree).items():
        out[path_to_torch_key(path)] = np.asarray(value)
    return out


def legacy_flax_to_flax(tree: dict, expected: dict, renames=(), ignored=(), check_finite: bool = True):
    """Legacy Flax msgpack params -> our params tree, via the same path rules and model renames."""
    want = flat_params(expected)
    params, unexpected, mismatched, wrong_dtype, non_finite = {}, [], [], [], []
    for raw_key, value in flax_tree_to_torch_named(tree).items():
        key = rename_key(raw_key, renames)
        if any(re.search(p, key) for p in ignored):
            continue
        module_key, _, leaf = key.rpartition(".")
        path = torch_key_to_path(module_key) + (leaf,)
        target = want.get(path)
        if target is None:
            unexpected.append(raw_key)
        elif tuple(value.shape) != tuple(target.shape):
            mismatched.append((raw_key, tuple(value.shape), tuple(target.shape)))
        elif value.dtype.kind not in "fc" and value.dtype.name != "bfloat16":
            wrong_dtype.append((raw_key, value.dtype.name))
        elif check_finite and not np.isfinite(value).all():
            non_finite.append((raw_key, int(value.size - np.count_nonzero(np.isfinite(value)))))
        else:
            params[path] = value
    missing = [path_to_torch_key(p) for p in want if p not in params]
    return unflatten(params), ConversionReport(sorted(missing), sorted(unexpected), mismatched, wrong_dtype,
                                               non_finite)

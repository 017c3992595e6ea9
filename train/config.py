"""Configs are Python files with `get_config()` returning a plain dict (Flax-examples style).

    cfg = load_config(autoencoder.Config, "shapes_autoencoder", overrides=["num_steps=100"])

`configs/*.py` (installed as `sdjax.configs`) are the only place defaults live: a stage's `Config`
dataclass declares the keys and their types, with no default values, and every key must be given by
the file (or an override). `--config NAME` finds `configs/NAME.py`; a path finds that file.
Unknown keys, missing keys and values of the wrong type are refused with the key, the value and what
was expected. Resuming compares the saved config with the current one (`config_changes`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.resources
import json
import runpy
import typing
from pathlib import Path
from typing import Any

from sdjax.errors import ConfigError
from sdjax.validation import json_type, matches, type_name

CONFIG_PACKAGE = "sdjax.configs"


def config_path(name_or_path) -> Path:
    """A config file: an existing path, or the name of one of the shipped configs (`shapes_ldm`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config {name_or_path}: not a file")
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    if path.parent == Path(".") and stem.isidentifier():
        shipped = importlib.resources.files(CONFIG_PACKAGE) / f"{stem}.py"
        if shipped.is_file():
            return Path(str(shipped))
    raise ConfigError(f"config file not found: {name_or_path} (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    return sorted(p.name[:-3] for p in importlib.resources.files(CONFIG_PACKAGE).iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def read_config_file(name_or_path) -> dict:
    path = config_path(name_or_path)
    try:
        module = runpy.run_path(str(path))
    except Exception as e:  # a syntax or runtime error in the user's config file
        raise ConfigError(f"config file {path} could not be run: {type(e).__name__}: {e}") from None
    if "get_config" not in module:
        raise ConfigError(f"{path} has no get_config() function")
    cfg = module["get_config"]()
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: get_config() must return a dict, got {type(cfg).__name__}")
    return cfg


def parse_overrides(items) -> dict:
    """["num_steps=100", "unet.layers_per_block=2"] (or a dict) -> {"num_steps": 100, "unet": {"layers_per_block": 2}}."""
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            try:
                value = json.loads(raw)  # JSON's true / false / null, as in '{"mid_block_add_attention": false}'
            except ValueError:
                value = raw  # a bare string
        *parents, leaf = key.split(".")
        d = out
        for i, p in enumerate(parents):
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override {item!r}: another override sets {'.'.join(parents[:i + 1])!r} to "
                                  f"{d!r}, not a dict")
        if leaf in d:  # the same key twice, or a dict's key both inside a dict value and on its own
            raise ConfigError(f"override {item!r}: {key!r} is already set by another override; set each key once")
        d[leaf] = value
    return out


def merge(base: dict, overrides: dict) -> dict:
    """Overrides over base; a dict value merges into a dict value (model configs: change some keys)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_config(schema, values: dict, source: str = "config"):
    """A `schema` dataclass from `values`: every field given, no unknown key, each value of its declared type."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) in {source}: {', '.join(hints)}; "
                          f"known keys: {', '.join(sorted(fields))}")
    missing = [k for k in fields if k not in values]
    if missing:
        raise ConfigError(f"config key(s) {', '.join(map(repr, missing))} missing in {source} "
                          f"(configs/*.py give every key; see configs/ for the shipped ones)")
    hints = typing.get_type_hints(schema)
    for name in fields:
        check_type(name, values[name], hints[name], source)
    cfg = schema(**{k: values[k] for k in fields})
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def check_type(key: str, value, tp, source: str) -> None:
    if not matches(value, tp):
        raise ConfigError(f"config key {key!r} = {value!r} in {source}: expected {type_name(tp)}, "
                          f"got {json_type(value)}")


def load_config(schema, path=None, overrides=None):
    """The config file (a path or a shipped config's name) with overrides (["k=v", ...] or a dict) applied."""
    values = read_config_file(path) if path else {}
    values = merge(values, parse_overrides(overrides))
    return build_config(schema, values, source=str(path or "overrides"))


def to_jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts ("key: saved -> current")."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def check_ranges(cfg, at_least_one=(), non_negative=(), positive=(), unit_interval=()) -> None:
    """Range checks of numeric config keys, each failure naming the key and its value."""
    for keys, ok, want in ((at_least_one, lambda v: v >= 1, ">= 1"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (positive, lambda v: v > 0, "> 0"), (unit_interval, lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            value = getattr(cfg, key)
            if value is not None and not ok(value):
                raise ConfigError(f"config key {key!r} = {value!r}: must be {want}")


def check_choice(cfg, key: str, choices) -> None:
    value = getattr(cfg, key)
    if value not in choices:
        raise ConfigError(f"config key {key!r} = {value!r}: use one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass
class LoopConfig:
    """The keys every training stage has (the shared loop's): seeds, batch, steps, optimiser, bookkeeping."""

    seed: int
    batch_size: int
    num_steps: int
    learning_rate: float
    warmup_steps: int
    checkpoint_every: int  # 0: only at the end
    keep_checkpoints: int
    log_every: int

    def validate(self) -> None:
        check_ranges(self, at_least_one=("batch_size", "num_steps", "keep_checkpoints", "log_every"),
                     non_negative=("warmup_steps", "checkpoint_every"), positive=("learning_rate",))

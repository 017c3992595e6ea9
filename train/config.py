"""Configs are Python files with `get_config()` returning a plain dict (Flax-examples style).

    cfg = load_config(Config, "configs/shapes_autoencoder.py", overrides=["num_steps=100"])

A stage declares its keys and defaults as a dataclass; any other key is refused with an error that
names it. Resuming compares the saved config with the current one (`config_changes`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import runpy
from pathlib import Path
from typing import Any

from sdjax.errors import ConfigError


def read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    module = runpy.run_path(str(path))
    if "get_config" not in module:
        raise ConfigError(f"{path} has no get_config() function")
    cfg = module["get_config"]()
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: get_config() must return a dict, got {type(cfg).__name__}")
    return cfg


def parse_overrides(items) -> dict:
    """["num_steps=100", "unet.layers_per_block=2"] -> {"num_steps": 100, "unet": {"layers_per_block": 2}}."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string
        *parents, leaf = key.strip().split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def build_config(schema, values: dict, source: str = "config"):
    """A `schema` dataclass from `values`; unknown keys raise ConfigError naming them (and close matches)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) in {source}: {', '.join(hints)}; "
                          f"known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name in values:
            value = values[name]
            if isinstance(default, dict) and isinstance(value, dict):
                value = {**default, **value}  # model configs: the file overrides some keys
            kwargs[name] = value
        elif default is dataclasses.MISSING:
            raise ConfigError(f"config key {name!r} is required ({source})")
    return schema(**kwargs)


def load_config(schema, path=None, overrides=None):
    values = read_config_file(path) if path else {}
    for key, value in parse_overrides(overrides).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return build_config(schema, values, source=str(path or "defaults"))


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

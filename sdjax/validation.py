"""Checking config values against their declared types, with messages that name the key, the value and what
was expected. Models (`FlaxModelMixin`), training configs (`sdjax.train.config`) and pipeline folders use it.

    check_fields("UNet2DConditionModel", {"block_out_channels": None}, typing.get_type_hints(UNet2DConditionModel))
    # ConfigError: UNet2DConditionModel: config key 'block_out_channels' = None: expected a list of int, got null
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from .errors import ConfigError

_JSON_NAMES = {bool: "true/false", int: "int", float: "number", str: "string", dict: "object", type(None): "null"}


def json_type(value) -> str:
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite number"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def type_name(tp) -> str:
    """A reader's name for an annotation: 'int or a list of int', 'null or string'."""
    if tp is Any:
        return "anything"
    if tp in _JSON_NAMES:
        return _JSON_NAMES[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not args:
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if origin is dict or tp is dict:
        return "an object"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def matches(value, tp) -> bool:
    """Does a JSON-like value (lists for tuples) fit the annotation?"""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # annotations we do not check (e.g. jnp.dtype)


def check_value(owner: str, key: str, value, tp, source: str | None = None) -> None:
    if not matches(value, tp):
        where = f" in {source}" if source else ""
        raise ConfigError(f"{owner}: config key {key!r} = {value!r}{where}: expected {type_name(tp)}, "
                          f"got {json_type(value)}")


def check_fields(owner: str, config: dict, hints: dict, source: str | None = None) -> None:
    """Every key of `config` that has an annotation in `hints` must match it."""
    for key, value in config.items():
        if key in hints:
            check_value(owner, key, value, hints[key], source)


def wrong_values(tp) -> list:
    """Values that do not fit `tp` (for generated tests of the checks above)."""
    candidates = [{"wrong": "type"}, "wrong", [["nested"]], 1.5, -1, True, None]
    return [v for v in candidates if not matches(v, tp)]

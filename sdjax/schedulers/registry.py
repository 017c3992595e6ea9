"""Building schedulers by short name, by diffusers config dict, or from a folder / hub repo."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import SdjaxError
from ..hub import looks_like_repo_id, resolve_folder
from ..io import read_json
from .base import ConfigError, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverPP2MScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .heun import HeunScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerScheduler, EulerAncestralScheduler, LMSScheduler,
        DPMSolverPP2MScheduler, HeunScheduler,
    )
}

# diffusers class name -> sdjax scheduler
DIFFUSERS_CLASSES: dict[str, type[Scheduler]] = {cls.diffusers_class: cls for cls in SCHEDULERS.values()}

# extra spellings accepted by get_scheduler(name): alias -> (name, config overrides)
ALIASES: dict[str, tuple[str, dict]] = {
    "plms": ("pndm", {"skip_prk_steps": True}),
    "dpmpp_2m": ("dpm_solver_pp_2m", {}),
    "dpm++_2m": ("dpm_solver_pp_2m", {}),
    "dpm_solver_pp_2m_karras": ("dpm_solver_pp_2m", {"use_karras_sigmas": True}),
    "dpmpp_2m_karras": ("dpm_solver_pp_2m", {"use_karras_sigmas": True}),
    "k_euler": ("euler", {}),
    "k_euler_ancestral": ("euler_ancestral", {}),
    "k_lms": ("lms", {}),
    "k_heun": ("heun", {}),
}


def _names():
    return ", ".join(sorted(SCHEDULERS)) + " (or a diffusers class name: " + ", ".join(sorted(DIFFUSERS_CLASSES)) + ")"


def _resolve_name(name: str) -> tuple[type[Scheduler], dict]:
    if name in DIFFUSERS_CLASSES:
        return DIFFUSERS_CLASSES[name], {}
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in SCHEDULERS:
        return SCHEDULERS[key], {}
    if key in ALIASES:
        target, overrides = ALIASES[key]
        return SCHEDULERS[target], dict(overrides)
    raise ConfigError(f"unknown scheduler {name!r}; known: {_names()}")


def _explicit_keys(config: Mapping | None) -> dict:
    """The non-bookkeeping keys of a config that were really given (not filled-in defaults)."""
    config = dict(config or {})
    used_defaults = set(config.get("_use_default_values") or ())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in used_defaults}


def get_scheduler(name_or_config_or_instance, base_config: Mapping | None = None, **overrides) -> Scheduler:
    """Build a scheduler.

    - an sdjax ``Scheduler`` instance: returned as is (``overrides`` rebuild it with those keys changed).
    - a name (``ddpm, ddim, pndm, euler, euler_ancestral, lms, dpm_solver_pp_2m, heun``, an alias like
      ``plms`` / ``dpm_solver_pp_2m_karras``, or a diffusers class name like ``"EulerDiscreteScheduler"``):
      that method, configured from ``base_config`` (e.g. the loaded folder's scheduler config), like
      diffusers' ``X.from_config(pipe.scheduler.config)``: every key of ``base_config`` the method
      has is reused (training schedule: num_train_timesteps, beta_start/end, beta_schedule,
      prediction_type, steps_offset, timestep_spacing, ...), the rest is dropped; keys the base
      config only holds as its own class's defaults (listed in ``_use_default_values``) get the new
      method's defaults, as in diffusers.
    - a config dict (a diffusers ``scheduler_config.json``): the method named by its ``_class_name``
      (``_class_name`` is required).

    ``overrides`` are config keys applied last (e.g. ``eta=0.5`` for ddim, ``use_karras_sigmas=True``).
    Unsupported values raise ``ConfigError`` (a ``ValueError``) naming the key and the supported values.
    """
    obj = name_or_config_or_instance
    if isinstance(obj, Scheduler):
        if not overrides:
            return obj
        return type(obj).from_config(obj.config.to_dict(), **overrides)
    if isinstance(obj, str):
        cls, alias_overrides = _resolve_name(obj)
        base = _explicit_keys(base_config)
        base.update(alias_overrides)
        return cls.from_config(base, **overrides)
    if isinstance(obj, Mapping):
        cfg = dict(obj)
        class_name = cfg.get("_class_name")
        if class_name is None:
            raise ConfigError(
                "scheduler config has no '_class_name'; supported values for '_class_name': "
                + ", ".join(sorted(DIFFUSERS_CLASSES))
                + " (or pass a scheduler name: get_scheduler('euler', base_config=config))"
            )
        if class_name not in DIFFUSERS_CLASSES:
            raise ConfigError(
                f"unsupported value _class_name={class_name!r}; supported values for '_class_name': "
                + ", ".join(sorted(DIFFUSERS_CLASSES))
            )
        cls = DIFFUSERS_CLASSES[class_name]
        if base_config:
            merged = _explicit_keys(base_config)
            merged.update(_explicit_keys(cfg))
            merged["_class_name"] = class_name
            cfg = merged
        return cls.from_config(cfg, **overrides)
    raise TypeError(
        f"get_scheduler expects a scheduler name, a config dict or a Scheduler, got {type(obj).__name__}"
    )


CONFIG_NAME = "scheduler_config.json"


def load_scheduler_config(folder_or_repo: str | os.PathLike, subfolder: str | None = "scheduler") -> dict:
    """The dict in ``<folder_or_repo>/<subfolder>/scheduler_config.json`` (local folder, the json file
    itself, or a hub repo id)."""
    path = os.fspath(folder_or_repo)
    if os.path.isfile(path):
        return read_json(path)
    if os.path.isdir(path):
        candidates = []
        if subfolder:
            candidates.append(os.path.join(path, subfolder, CONFIG_NAME))
        candidates.append(os.path.join(path, CONFIG_NAME))
        for c in candidates:
            if os.path.isfile(c):
                return read_json(c)
        raise SdjaxError(f"no {CONFIG_NAME} in {path!r} (looked for: {', '.join(candidates)})")
    if not looks_like_repo_id(path):
        raise SdjaxError(f"no {CONFIG_NAME}: folder not found: {path!r}")
    folder = resolve_folder(path, subfolder or None, allow_patterns=(CONFIG_NAME,))  # bounded, offline-aware
    return read_json(folder / CONFIG_NAME)


def load_scheduler(folder_or_repo: str | os.PathLike, subfolder: str | None = "scheduler", **overrides) -> Scheduler:
    """The scheduler of a diffusers pipeline folder / hub repo (``scheduler/scheduler_config.json``)."""
    cfg = load_scheduler_config(folder_or_repo, subfolder)
    try:
        return get_scheduler(cfg, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{folder_or_repo} ({CONFIG_NAME}): {e}") from None

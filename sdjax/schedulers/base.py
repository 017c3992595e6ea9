"""The scheduler contract shared by every sampling method, and the numpy schedule arithmetic.

A scheduler is an immutable object (frozen dataclass) holding its config and the numpy training
schedule (``betas``, ``alphas_cumprod``). Everything that depends on the number of inference steps is
computed in numpy by ``set_timesteps`` and returned as a ``flax.struct.dataclass`` state of fixed-shape
jnp arrays: the model-evaluation timesteps, per-step coefficient tables, and (for multistep methods)
fixed-size history buffers. ``step`` is then a pure function of (state, model_output, step_index,
sample, noise) that indexes those tables with a possibly traced ``step_index``, so a whole denoising
loop runs inside one ``jax.lax.scan``.

Numerics: the schedule arrays and per-step coefficients are computed in float32 with the same
operation order as diffusers' PyTorch schedulers (which compute them with float32 torch scalars), so
that trajectories agree to float32 rounding.

Every ``step`` returns ``(new_state, prev_sample, x0)`` where ``x0`` is the one-step prediction of the
clean sample (diffusers' ``pred_original_sample``), in the same space as the latents.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError  # an SdjaxError and a ValueError
from ..io import write_json

F32 = np.float32




class SchedulerConfig(Mapping):
    """Read-only dict-like scheduler config; keys are also attributes (``cfg.beta_schedule``)."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __getattr__(self, key):
        if key == "_data" or key.startswith("__"):  # unpickling / copying before _data exists
            raise AttributeError(key)
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        raise AttributeError("SchedulerConfig is read-only; build a new scheduler with get_scheduler(..., key=value)")

    def __reduce__(self):
        return (SchedulerConfig, (self._data,))

    def to_dict(self) -> dict:
        return dict(self._data)

    def __repr__(self):
        return f"SchedulerConfig({self._data!r})"


# ----------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# key -> (predicate, description of what is accepted)
_TYPE_CHECKS = {
    "num_train_timesteps": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
    "beta_start": (lambda v: _is_num(v) and v >= 0, "a float >= 0"),
    "beta_end": (lambda v: _is_num(v) and v > 0, "a float > 0"),
    "steps_offset": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "clip_sample_range": (lambda v: _is_num(v) and v > 0, "a float > 0"),
    "dynamic_thresholding_ratio": (lambda v: _is_num(v) and 0 < v <= 1, "a float in (0, 1]"),
    "sample_max_value": (lambda v: _is_num(v) and v > 0, "a float > 0"),
    "eta": (lambda v: _is_num(v) and v >= 0, "a float >= 0"),
    "sigma_min": (lambda v: v is None or (_is_num(v) and v > 0), "null or a float > 0"),
    "sigma_max": (lambda v: v is None or (_is_num(v) and v > 0), "null or a float > 0"),
    "lambda_min_clipped": (lambda v: _is_num(v), "a float (may be -inf)"),
    "trained_betas": (
        lambda v: v is None or (isinstance(v, (list, tuple, np.ndarray)) and all(_is_num(b) for b in np.ravel(v))),
        "null or a list of floats",
    ),
}

_BOOL_KEYS = (
    "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "thresholding", "skip_prk_steps",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "lower_order_final", "euler_at_final", "use_dynamic_shifting", "use_clipped_model_output",
)


def validate_config(scheduler_name: str, defaults: Mapping, allowed: Mapping, given: Mapping) -> dict:
    """Merge ``given`` over ``defaults`` and check every value.

    Keys starting with ``_`` are bookkeeping (``_class_name``, ``_diffusers_version``...) and kept.
    Keys the method does not have are dropped, as diffusers does. Like diffusers, the result records
    in ``_use_default_values`` the keys that were not given (so that swapping the method of a loaded
    config gives those keys the new method's defaults), and keys listed there in ``given`` are
    treated as not given. ``allowed`` maps a key to the tuple
    of values sdjax supports for it; any other value raises ``ConfigError`` naming key and values.
    """
    cfg = dict(defaults)
    extra = {}
    # as diffusers: keys a config only holds because its class filled in a default are not "given"
    used_defaults = set(given.get("_use_default_values") or ())
    explicit = set()
    for key, value in given.items():
        if key == "_use_default_values" or key in used_defaults:
            continue
        if isinstance(value, np.generic):  # numpy scalars -> Python (np.bool_ -> bool)
            value = value.item()
        if key.startswith("_"):
            extra[key] = value
        elif key in cfg:
            cfg[key] = value
            explicit.add(key)
    # diffusers types some booleans `bool | None`; None means False.
    for key in _BOOL_KEYS:
        if key in cfg and cfg[key] is None:
            cfg[key] = False
    for key, value in cfg.items():
        if key in allowed:
            ok = allowed[key]
            if isinstance(value, (list, dict)) or value not in ok or (isinstance(value, bool) != isinstance(ok[0], bool)):
                raise ConfigError(
                    f"{scheduler_name} scheduler: unsupported value {key}={value!r}; "
                    f"supported values for {key!r}: {', '.join(repr(o) for o in ok)}"
                )
        elif key in _BOOL_KEYS:
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{scheduler_name} scheduler: {key}={value!r} must be true or false")
        elif key in _TYPE_CHECKS:
            pred, desc = _TYPE_CHECKS[key]
            if not pred(value):
                raise ConfigError(f"{scheduler_name} scheduler: {key}={value!r} must be {desc}")
    if cfg.get("trained_betas") is not None:
        tb = list(np.ravel(np.asarray(cfg["trained_betas"], np.float64)).tolist())
        if len(tb) != cfg["num_train_timesteps"]:
            raise ConfigError(
                f"{scheduler_name} scheduler: trained_betas has {len(tb)} values but "
                f"num_train_timesteps={cfg['num_train_timesteps']}"
            )
        cfg["trained_betas"] = tb
    cfg.update(extra)
    cfg["_use_default_values"] = sorted(k for k in defaults if k not in explicit)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Training schedule (numpy, float32, bit-compatible with torch on CPU)
# ----------------------------------------------------------------------------------------------------


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as torch computes it on CPU: a
    float32 step, then ``start + step*i`` (first half) / ``end - step*(steps-1-i)`` (second half) with a
    single rounding (fused multiply-add)."""
    a, b = np.float64(F32(start)), np.float64(F32(end))
    if steps == 1:
        return np.array([a], F32)
    step = np.float64((F32(b) - F32(a)) / F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, a + step * i, b - step * (steps - 1 - i))
    return out.astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (diffusers ``betas_for_alpha_bar``, ``squaredcos_cap_v2``)."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.asarray(betas, F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's CPU cumprod of a float32 tensor (accumulates in float64, stores float32)."""
    return np.cumprod(np.asarray(x, F32).astype(np.float64)).astype(F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), float32 like diffusers."""
    alphas = (F32(1.0) - betas).astype(F32)
    alphas_bar_sqrt = np.sqrt(cumprod_f32(alphas))
    a0, aT = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = alphas_bar_sqrt - aT
    alphas_bar_sqrt = alphas_bar_sqrt * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = np.concatenate([alphas_bar[0:1], alphas])
    return (F32(1.0) - alphas).astype(F32)


def make_betas(cfg: Mapping, scheduler_name: str) -> np.ndarray:
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], F32)
    elif cfg["beta_schedule"] == "linear":
        betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:  # validate_config already refuses these; kept for direct callers
        raise ConfigError(
            f"{scheduler_name} scheduler: unsupported value beta_schedule={cfg['beta_schedule']!r}; "
            f"supported values for 'beta_schedule': {', '.join(map(repr, BETA_SCHEDULES))}"
        )
    if cfg.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(F32)


# ----------------------------------------------------------------------------------------------------
# Shared step helpers (jnp)
# ----------------------------------------------------------------------------------------------------


def bcast(coef, ndim: int):
    """A scalar or [B] coefficient broadcast against a [B, ...] sample."""
    coef = jnp.asarray(coef)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def threshold_sample(x, ratio: float, max_value: float):
    """Dynamic thresholding (Imagen): per-sample quantile of |x| clamped to [1, max_value]."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x.shape)


def clip_or_threshold(x0, cfg: Mapping):
    if cfg.get("thresholding", False):
        return threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
    if cfg.get("clip_sample", False):
        r = cfg["clip_sample_range"]
        return jnp.clip(x0, -r, r)
    return x0


def get_noise(name: str, shape, key, noise):
    """The Gaussian noise an ancestral step adds: ``noise`` if given, else drawn from ``key``."""
    if noise is not None:
        return jnp.asarray(noise, jnp.float32)
    if key is None:
        raise ValueError(f"the {name} scheduler is stochastic: step() needs `key` (a PRNG key) or `noise`")
    return jax.random.normal(key, shape, jnp.float32)


def take(table, step_index):
    """``table[step_index]`` for a possibly traced scalar index."""
    return jnp.take(table, jnp.asarray(step_index, jnp.int32), axis=0)


# ----------------------------------------------------------------------------------------------------
# The scheduler base class
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Scheduler:
    """Base of every sdjax scheduler. Build one with ``Cls.from_config(dict_or_None, **overrides)`` or
    ``sdjax.schedulers.get_scheduler``.

    Public API (all of it pure and jit-able; ``step_index`` may be traced):
      state = sched.set_timesteps(num_inference_steps, shape)
      n = sched.num_model_calls(state)                   # == len(state.timesteps), the scan length
      x_in = sched.scale_model_input(state, sample, step_index)
      state, prev_sample, x0 = sched.step(state, model_output, step_index, sample, key=None, noise=None)
      sched.init_noise_sigma(state), sched.sigma_or_noise_level(state, step_index)
      sched.add_noise(x0, noise, timesteps), sched.get_velocity(x0, noise, timesteps)
    """

    config: SchedulerConfig
    betas: np.ndarray
    alphas_cumprod: np.ndarray

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    ALLOWED: ClassVar[dict] = {}
    #: True for methods that add fresh noise at each step (they need `key` or `noise` in `step`).
    stochastic: ClassVar[bool] = False
    #: True for methods whose samples live in sigma space (x0 + sigma * eps), False for alpha space.
    sigma_space: ClassVar[bool] = False
    #: model calls per inference step (Heun: 2); image-to-image starts at call `t_start * order`, as diffusers.
    order: ClassVar[int] = 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping | None = None, **overrides) -> "Scheduler":
        given = dict(config or {})
        if overrides and given.get("_use_default_values"):
            given["_use_default_values"] = [k for k in given["_use_default_values"] if k not in overrides]
        given.update(overrides)
        cfg = validate_config(cls.name, cls.DEFAULTS, cls.ALLOWED, given)
        cfg["_class_name"] = cls.diffusers_class
        check_one_sigma_schedule(cls.name, cfg)  # a no-op for schedulers without sigma-schedule keys
        cls._check_config(cfg)
        betas = make_betas(cfg, cls.name)
        alphas_cumprod = cumprod_f32(F32(1.0) - betas)
        alphas_cumprod = cls._patch_alphas_cumprod(cfg, alphas_cumprod)
        betas.setflags(write=False)
        alphas_cumprod.setflags(write=False)
        return cls(config=SchedulerConfig(cfg), betas=betas, alphas_cumprod=alphas_cumprod)

    @classmethod
    def _check_config(cls, cfg: dict) -> None:
        """Cross-key checks of a merged config (override per method)."""

    @classmethod
    def _patch_alphas_cumprod(cls, cfg: dict, alphas_cumprod: np.ndarray) -> np.ndarray:
        return alphas_cumprod

    # Equal (and hashed) by method and config: a scheduler is a static argument of compiled programs, so
    # two schedulers built from the same config share JAX's compiled program.
    def _identity(self):
        return type(self), json.dumps(self.config.to_dict(), sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._identity())

    def __eq__(self, other):
        return isinstance(other, Scheduler) and self._identity() == other._identity()

    def __repr__(self):
        keys = ("num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing")
        body = ", ".join(f"{k}={self.config[k]!r}" for k in keys if k in self.config)
        return f"{type(self).__name__}(name={self.name!r}, {body})"

    def save_pretrained(self, save_directory) -> None:
        """Write ``scheduler_config.json`` (diffusers' format) into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        cfg = {k: v for k, v in self.config.to_dict().items() if k != "_use_default_values"}
        cfg["_class_name"] = self.diffusers_class
        cfg.setdefault("_diffusers_version", "0.35.0")
        write_json(Path(save_directory) / "scheduler_config.json", cfg)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    # ------------------------------------------------------------------ the per-method parts
    def set_timesteps(self, num_inference_steps: int, shape=None, dtype=jnp.float32):
        raise NotImplementedError

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        raise NotImplementedError

    def _check_steps(self, num_inference_steps):
        n = int(num_inference_steps)
        if n != num_inference_steps or n < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if n > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={n} cannot be larger than num_train_timesteps={self.num_train_timesteps}"
            )
        return n

    # ------------------------------------------------------------------ starting midway (image-to-image)
    def check_start(self, start: int) -> None:
        """Refuse a start index this method cannot begin at (override)."""

    def begin_at(self, state, start):
        """The state for a run whose first model call is `start` (traced): multistep methods begin their
        history there, as diffusers' schedulers do after `set_begin_index` (history-free methods: unchanged)."""
        if hasattr(state, "start"):
            return state.replace(start=jnp.asarray(start, jnp.int32))
        return state

    def start_index(self, num_inference_steps: int, strength: float) -> int:
        """The first model call of an image-to-image run: diffusers' `get_timesteps` (init_timestep =
        min(int(steps * strength), steps), t_start = steps - init_timestep, times the method's order)."""
        init = min(int(num_inference_steps * strength), num_inference_steps)
        return max(num_inference_steps - init, 0) * self.order

    # ------------------------------------------------------------------ shared API
    def num_model_calls(self, state) -> int:
        return int(state.timesteps.shape[0])

    def scale_model_input(self, state, sample, step_index):
        """The model's input at this step: the sample itself for alpha-space methods."""
        return sample

    def init_noise_sigma(self, state):
        """Standard deviation of the initial noise (the first sample is ``noise * init_noise_sigma``)."""
        return jnp.float32(1.0)

    def sigma_or_noise_level(self, state, step_index):
        """Noise level at a step: sigma for sigma-space methods, sqrt(1 - alpha_bar_t) otherwise."""
        return take(state.noise_levels, step_index)

    def _train_coefs(self, timesteps, ndim):
        ac = jnp.asarray(self.alphas_cumprod)
        t = jnp.asarray(timesteps).reshape(-1).astype(jnp.int32)
        a = jnp.take(ac, t)
        sqrt_a = bcast(a**0.5, ndim)
        sqrt_1ma = bcast((1.0 - a) ** 0.5, ndim)
        return sqrt_a, sqrt_1ma

    def add_noise(self, original_samples, noise, timesteps):
        """Closed-form forward process q(x_t | x_0) at integer training timesteps (scalar or [B]):
        sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise (diffusers' DDPM ``add_noise``).
        Sigma-space schedulers override this with x0 + sigma(t) * noise, their own sample space."""
        sqrt_a, sqrt_1ma = self._train_coefs(timesteps, jnp.ndim(original_samples))
        return sqrt_a * original_samples + sqrt_1ma * noise

    def get_velocity(self, sample, noise, timesteps):
        """v-prediction target at integer training timesteps:
        sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0."""
        sqrt_a, sqrt_1ma = self._train_coefs(timesteps, jnp.ndim(sample))
        return sqrt_a * noise - sqrt_1ma * sample

    def add_noise_at_step(self, state, original_samples, noise, step_index):
        """Noise ``original_samples`` to the level the sampler expects *at* ``step_index`` (img2img:
        start the loop at that step from this sample). Alpha space: sqrt(a) x0 + sqrt(1-a) noise with
        the noise level of that step; sigma space: x0 + sigma_k * noise."""
        s = take(state.noise_levels, step_index)
        if self.sigma_space:
            return original_samples + s * noise
        return (1.0 - s * s) ** 0.5 * original_samples + s * noise


# ----------------------------------------------------------------------------------------------------
# Shared timestep spacings and sigma conversions (numpy)
# ----------------------------------------------------------------------------------------------------


def spacing_error(name, value):
    return ConfigError(
        f"{name} scheduler: unsupported value timestep_spacing={value!r}; "
        f"supported values for 'timestep_spacing': {', '.join(map(repr, TIMESTEP_SPACINGS))}"
    )


def int_timesteps(cfg: Mapping, n: int, name: str) -> np.ndarray:
    """DDPM/DDIM spacing (descending int64), diffusers ``set_timesteps``."""
    T = cfg["num_train_timesteps"]
    sp = cfg["timestep_spacing"]
    if sp == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if sp == "leading":
        step_ratio = T // n
        ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
        return ts + cfg["steps_offset"]
    if sp == "trailing":
        step_ratio = T / n
        return np.round(np.arange(T, 0, -step_ratio)).astype(np.int64) - 1
    raise spacing_error(name, sp)


def float_timesteps(cfg: Mapping, n: int, name: str) -> np.ndarray:
    """Euler/LMS/Heun spacing (descending float32), diffusers ``set_timesteps``."""
    T = cfg["num_train_timesteps"]
    sp = cfg["timestep_spacing"]
    if sp == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if sp == "leading":
        step_ratio = T // n
        ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(cfg["steps_offset"])
    if sp == "trailing":
        step_ratio = T / n
        ts = (np.arange(T, 0, -step_ratio)).round().copy().astype(np.float32)
        return ts - np.float32(1)
    raise spacing_error(name, sp)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) in float32 (ascending in t)."""
    ac = np.asarray(alphas_cumprod, F32)
    return (((F32(1.0) - ac) / ac) ** F32(0.5)).astype(F32)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma by log-linear interpolation (diffusers ``_sigma_to_t``)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending (float64)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


SIGMA_KEYS_ALLOWED = {"use_beta_sigmas": (False,)}  # beta sigmas need scipy.stats: not supported


def check_one_sigma_schedule(name: str, cfg: Mapping) -> None:
    on = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
    if len(on) > 1:
        raise ConfigError(f"{name} scheduler: only one of {', '.join(on)} can be true")


# ----------------------------------------------------------------------------------------------------
# Sigma-space (k-diffusion style) schedulers: Euler, Euler ancestral, LMS, Heun
# ----------------------------------------------------------------------------------------------------


class SigmaScheduler(Scheduler):
    """Samples live in sigma space: x = x0 + sigma * eps (= the VP sample / sqrt(alpha_bar)); the model
    sees x / sqrt(sigma^2 + 1). States carry ``sigmas`` (one per model call, plus the final one) and
    ``noise_levels`` (= the sigma of each model call)."""

    sigma_space = True

    def _schedule_sigmas(self, n: int):
        """Timesteps (float) and sigmas (float64, without the final one) as diffusers' Euler/LMS/Heun
        ``set_timesteps`` compute them, including the karras / exponential conversions."""
        cfg = self.config
        timesteps = float_timesteps(cfg, n, self.name)
        sig = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sig)
        sigmas = np.interp(timesteps, np.arange(0, len(sig)), sig)
        smin = cfg.get("sigma_min") if self._uses_config_sigma_range else None
        smax = cfg.get("sigma_max") if self._uses_config_sigma_range else None
        smin = smin if smin is not None else sigmas[-1].item()
        smax = smax if smax is not None else sigmas[0].item()
        if cfg.get("use_karras_sigmas"):
            sigmas = karras_sigmas(smin, smax, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        elif cfg.get("use_exponential_sigmas"):
            sigmas = exponential_sigmas(smin, smax, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        return timesteps, sigmas

    #: whether config sigma_min / sigma_max bound the karras/exponential schedules (Euler only)
    _uses_config_sigma_range: ClassVar[bool] = False

    def _log_interp(self) -> bool:
        return bool(self.config.get("use_karras_sigmas") or self.config.get("use_exponential_sigmas"))

    def scale_model_input(self, state, sample, step_index):
        return sample / take(state.input_scale, step_index).astype(sample.dtype)

    def init_noise_sigma(self, state):
        max_sigma = jnp.max(state.sigmas)
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def sigma_at_timesteps(self, timesteps):
        """sigma(t) at (possibly fractional) training timesteps: linear interpolation of the training
        sigmas, or log-linear when karras/exponential sigmas are used (the inverse of how those
        schedules pick their timesteps), so it reproduces the schedule's sigma at its own timesteps."""
        sig = jnp.asarray(train_sigmas(self.alphas_cumprod))
        t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
        grid = jnp.arange(sig.shape[0], dtype=jnp.float32)
        if self._log_interp():
            return jnp.exp(jnp.interp(t, grid, jnp.log(sig)))
        return jnp.interp(t, grid, sig)

    def add_noise(self, original_samples, noise, timesteps):
        """x0 + sigma(t) * noise: the forward process in this sampler's (sigma) space, at training
        timesteps (scalar or [B], fractional allowed)."""
        sigma = bcast(self.sigma_at_timesteps(timesteps), jnp.ndim(original_samples))
        return original_samples + noise * sigma


def finish_sigmas(sigmas, sigma_last=0.0) -> np.ndarray:
    return np.concatenate([sigmas, [sigma_last]]).astype(F32)


def input_scale(sigmas: np.ndarray) -> np.ndarray:
    """(sigma^2 + 1) ** 0.5 in float32, the divisor of scale_model_input."""
    s = np.asarray(sigmas, F32)
    return ((s**2 + F32(1.0)) ** F32(0.5)).astype(F32)


def x0_from_sigma_space(prediction_type, model_output, sample, sigma, c_out, c_skip_div):
    """x̂0 at noise level sigma (k-diffusion parameterisation, as diffusers' Euler/LMS/Heun):
    epsilon: x - sigma eps;  v: v * (-sigma / sqrt(sigma^2+1)) + x / (sigma^2+1);  sample: the output."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * c_out + sample / c_skip_div
    if prediction_type == "sample":
        return model_output
    raise ValueError(prediction_type)


def v_coefs(sigmas: np.ndarray):
    """(-sigma / (sigma^2+1)**0.5, sigma^2+1) in float32, the v-prediction coefficients."""
    s = np.asarray(sigmas, F32)
    return (-s / (s**2 + F32(1.0)) ** F32(0.5)).astype(F32), (s**2 + F32(1.0)).astype(F32)

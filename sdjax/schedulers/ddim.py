"""DDIM (Song et al. 2020), with the stochasticity parameter eta (0: deterministic)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import (
    BETA_SCHEDULES,
    F32,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    Scheduler,
    clip_or_threshold,
    get_noise,
    int_timesteps,
    take,
)
from .ddpm import x0_from_alpha_space


@struct.dataclass
class DDIMState:
    timesteps: jnp.ndarray  # [N] int32
    noise_levels: jnp.ndarray  # [N] sqrt(1 - alpha_bar_t)
    sqrt_alpha_prod: jnp.ndarray  # [N]
    sqrt_beta_prod: jnp.ndarray  # [N]
    sqrt_alpha_prod_prev: jnp.ndarray  # [N]
    direction_coef: jnp.ndarray  # [N] sqrt(1 - alpha_bar_prev - std**2)
    noise_std: jnp.ndarray  # [N] eta * sigma_t


class DDIMScheduler(Scheduler):
    """DDIM. Besides diffusers' config keys it takes two sdjax keys that diffusers passes to ``step``:
    ``eta`` (default 0.0; > 0 makes it stochastic) and ``use_clipped_model_output`` (default False)."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
        thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False,
        # sdjax extensions (step arguments in diffusers)
        eta=0.0, use_clipped_model_output=False,
    )
    ALLOWED = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)

    @property
    def stochastic(self):  # type: ignore[override]
        return float(self.config["eta"]) > 0

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        ts = int_timesteps(self.config, n, self.name)
        ac = self.alphas_cumprod
        final = F32(1.0) if self.config["set_alpha_to_one"] else ac[0]
        # diffusers' DDIM steps back by T // N whatever the spacing
        prev = ts - self.num_train_timesteps // n
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(F32)
        beta_t = F32(1.0) - a_t
        beta_prev = F32(1.0) - a_prev
        variance = (beta_prev / beta_t) * (F32(1.0) - a_t / a_prev)
        std = F32(self.config["eta"]) * variance ** F32(0.5)
        direction = (F32(1.0) - a_prev - std**2) ** F32(0.5)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return DDIMState(
            timesteps=jnp.asarray(ts.astype(np.int32)),
            noise_levels=f(beta_t ** F32(0.5)),
            sqrt_alpha_prod=f(a_t ** F32(0.5)),
            sqrt_beta_prod=f(beta_t ** F32(0.5)),
            sqrt_alpha_prod_prev=f(a_prev ** F32(0.5)),
            direction_coef=f(direction),
            noise_std=f(std),
        )

    def state_from_levels(self, timesteps, alpha_bars):
        """A deterministic (eta = 0) DDIM state for any decreasing sequence of noise levels, traced or not:
        call k evaluates the model at timesteps[k] (may be fractional) where alpha_bar = alpha_bars[k] and
        steps to alpha_bars[k + 1]; alpha_bars has one entry more than timesteps (the last 1.0: clean).
        (Song et al. 2020, eq. 12 with sigma = 0.) Used by sdjax.viz to finish a trajectory from any x_t."""
        a = jnp.asarray(alpha_bars, jnp.float32)
        a_t, a_prev = a[:-1], a[1:]
        zeros = jnp.zeros_like(a_t)
        return DDIMState(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            noise_levels=(1.0 - a_t) ** 0.5,
            sqrt_alpha_prod=a_t ** 0.5,
            sqrt_beta_prod=(1.0 - a_t) ** 0.5,
            sqrt_alpha_prod_prev=a_prev ** 0.5,
            direction_coef=(1.0 - a_prev) ** 0.5,
            noise_std=zeros,
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        mo = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        sqrt_a = take(state.sqrt_alpha_prod, step_index)
        sqrt_b = take(state.sqrt_beta_prod, step_index)
        x0, eps = x0_from_alpha_space(self.config["prediction_type"], mo, x, sqrt_a, sqrt_b)
        x0 = clip_or_threshold(x0, self.config)
        if self.config["use_clipped_model_output"]:
            eps = (x - sqrt_a * x0) / sqrt_b
        prev = take(state.sqrt_alpha_prod_prev, step_index) * x0 + take(state.direction_coef, step_index) * eps
        if self.stochastic:
            z = get_noise(self.name, x.shape, key, noise)
            prev = prev + take(state.noise_std, step_index) * z
        return state, prev.astype(out_dtype), x0.astype(out_dtype)

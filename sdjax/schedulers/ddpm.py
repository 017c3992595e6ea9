"""DDPM (Ho et al. 2020): ancestral sampling of the posterior q(x_{t-1} | x_t, x̂0)."""

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


@struct.dataclass
class DDPMState:
    timesteps: jnp.ndarray  # [N] int32, model-evaluation timesteps
    noise_levels: jnp.ndarray  # [N] sqrt(1 - alpha_bar_t)
    sqrt_alpha_prod: jnp.ndarray  # [N]
    sqrt_beta_prod: jnp.ndarray  # [N]
    coef_x0: jnp.ndarray  # [N] posterior-mean coefficient of x̂0
    coef_xt: jnp.ndarray  # [N] posterior-mean coefficient of x_t
    noise_std: jnp.ndarray  # [N] std of the added noise (0 where diffusers adds none)


def x0_from_alpha_space(prediction_type, model_output, sample, sqrt_a, sqrt_b):
    """x̂0 and ε̂ from a model output at a point with alpha_bar = sqrt_a**2, 1 - alpha_bar = sqrt_b**2."""
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    raise ValueError(prediction_type)


class DDPMScheduler(Scheduler):
    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    stochastic = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
        thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
        timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS,
        # "learned"/"learned_range" need a model that also outputs its variance; "fixed_large_log" is
        # a log-variance diffusers then uses as a std.
        variance_type=("fixed_small", "fixed_small_log", "fixed_large"),
    )

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        ts = int_timesteps(self.config, n, self.name)
        ac = self.alphas_cumprod
        # previous_timestep: the next entry of the schedule, -1 after the last one
        prev = np.concatenate([ts[1:], [-1]])
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], F32(1.0)).astype(F32)
        beta_t = F32(1.0) - a_t
        beta_prev = F32(1.0) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = F32(1.0) - cur_alpha
        coef_x0 = (a_prev ** F32(0.5) * cur_beta) / beta_t
        coef_xt = cur_alpha ** F32(0.5) * beta_prev / beta_t
        variance = np.maximum(beta_prev / beta_t * cur_beta, F32(1e-20)).astype(F32)
        vt = self.config["variance_type"]
        if vt == "fixed_small":
            std = variance ** F32(0.5)
        elif vt == "fixed_small_log":
            std = np.exp(F32(0.5) * np.log(variance))
        else:  # fixed_large
            std = cur_beta ** F32(0.5)
        std = np.where(ts > 0, std, F32(0.0)).astype(F32)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return DDPMState(
            timesteps=jnp.asarray(ts.astype(np.int32)),
            noise_levels=f(beta_t ** F32(0.5)),
            sqrt_alpha_prod=f(a_t ** F32(0.5)),
            sqrt_beta_prod=f(beta_t ** F32(0.5)),
            coef_x0=f(coef_x0),
            coef_xt=f(coef_xt),
            noise_std=f(std),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        mo = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        x0, _ = x0_from_alpha_space(
            self.config["prediction_type"], mo, x, take(state.sqrt_alpha_prod, step_index),
            take(state.sqrt_beta_prod, step_index),
        )
        x0 = clip_or_threshold(x0, self.config)
        prev = take(state.coef_x0, step_index) * x0 + take(state.coef_xt, step_index) * x
        z = get_noise(self.name, x.shape, key, noise)
        prev = prev + take(state.noise_std, step_index) * z
        return state, prev.astype(out_dtype), x0.astype(out_dtype)

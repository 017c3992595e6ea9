"""Euler (Karras et al. 2022, Algorithm 2 with s_churn = 0): one explicit Euler step of the
probability-flow ODE in sigma space per model call."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import (
    BETA_SCHEDULES,
    F32,
    PREDICTION_TYPES,
    SIGMA_KEYS_ALLOWED,
    TIMESTEP_SPACINGS,
    SigmaScheduler,
    finish_sigmas,
    input_scale,
    take,
    train_sigmas,
    v_coefs,
    x0_from_sigma_space,
)


@struct.dataclass
class SigmaState:
    """State of the single-step sigma-space methods (Euler, Euler ancestral)."""

    timesteps: jnp.ndarray  # [N] float32
    sigmas: jnp.ndarray  # [N + 1] float32, the last one is the final sigma (0)
    noise_levels: jnp.ndarray  # [N] sigma of each call
    input_scale: jnp.ndarray  # [N] sqrt(sigma^2 + 1)
    c_out: jnp.ndarray  # [N] -sigma / sqrt(sigma^2 + 1)  (v-prediction)
    c_skip_div: jnp.ndarray  # [N] sigma^2 + 1             (v-prediction)
    dt: jnp.ndarray  # [N] sigma_next - sigma (Euler) / sigma_down - sigma (ancestral)
    sigma_up: jnp.ndarray  # [N] std of the added noise (0 for Euler)


class EulerScheduler(SigmaScheduler):
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    _uses_config_sigma_range = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS,
        interpolation_type=("linear",), timestep_type=("discrete",), final_sigmas_type=("zero", "sigma_min"),
        **SIGMA_KEYS_ALLOWED,
    )

    @classmethod
    def _patch_alphas_cumprod(cls, cfg, alphas_cumprod):
        if cfg.get("rescale_betas_zero_snr"):
            # close to 0 without being 0 so the first sigma is finite (as diffusers)
            alphas_cumprod = alphas_cumprod.copy()
            alphas_cumprod[-1] = 2.0**-24
        return alphas_cumprod

    def _final_sigma(self):
        if self.config.get("final_sigmas_type", "zero") == "sigma_min":
            return train_sigmas(self.alphas_cumprod)[0]
        return 0.0

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        timesteps, sigmas = self._schedule_sigmas(n)
        sigmas = finish_sigmas(sigmas, self._final_sigma())
        return self._state(timesteps, sigmas)

    def _state(self, timesteps, sigmas):
        s, s_next = sigmas[:-1], sigmas[1:]
        c_out, c_skip_div = v_coefs(s)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return SigmaState(
            timesteps=f(timesteps),
            sigmas=f(sigmas),
            noise_levels=f(s),
            input_scale=f(input_scale(s)),
            c_out=f(c_out),
            c_skip_div=f(c_skip_div),
            dt=f(s_next - s),
            sigma_up=f(np.zeros_like(s)),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        prev, x0 = euler_update(self.config["prediction_type"], state, model_output, step_index, sample)
        return state, prev.astype(sample.dtype), x0.astype(sample.dtype)


def euler_update(prediction_type, state: SigmaState, model_output, k, sample):
    """One Euler step of the probability-flow ODE from sigma_k by state.dt[k]: (prev, x̂0), float32.
    Shared with Euler ancestral, whose dt goes down to sigma_down and which then adds fresh noise."""
    x = sample.astype(jnp.float32)
    sigma = take(state.noise_levels, k)
    x0 = x0_from_sigma_space(
        prediction_type, model_output.astype(jnp.float32), x, sigma, take(state.c_out, k), take(state.c_skip_div, k)
    )
    derivative = (x - x0) / sigma
    return x + derivative * take(state.dt, k), x0
